"""Pairs from the policy's own answers: judges, pairing, resuming, the `pairs` stage and iterated DPO."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lowvram.errors import UserError
from lowvram.pairs.build import NoPairs, make_pairs, read_prompts, split_prompts, write_pairs
from lowvram.pairs.judges import Answer, LLMJudge, RulesJudge, judged, load_callable, parse_verdict, rubric_problem
from lowvram.recipe import JudgeConfig, PairsConfig, load_recipe, parse_recipe

SAMPLES = Path(__file__).resolve().parents[1] / "recipes" / "data"


def _recipe(**over) -> dict:
    base = {
        "use_samples": True,
        "model": {"name": "builtin:tiny-llama"},
        "sft": {"data": {"sample": "chat_sft.jsonl"}},
        "pairs": {"enabled": True, "judge": {"kind": "rules", "max_words": 5}},
        "rounds": 2,
    }
    for k, v in over.items():
        base[k] = v
    return base


def _a(text: str, stopped: bool = True) -> Answer:
    return Answer(text, len(text.split()), stopped)


# ------------------------------------------------------------------ recipe


def test_a_loop_recipe_needs_no_dpo_data_and_ships():
    r = parse_recipe(_recipe())
    assert r.pairs.enabled and r.rounds == 2 and r.sample_file(r.dpo.data) is None
    shipped, _ = load_recipe("self-pairs")
    assert shipped.pairs.enabled and shipped.rounds >= 2


def test_pairs_mistakes_are_listed_at_once():
    bad = _recipe(
        pairs={
            "enabled": True,
            "judge": {"kind": "rules", "callable": "no_colon", "rubric": "Which is better? {answer_a}"},
        },
        dpo={"method": "orpo"},
    )
    with pytest.raises(UserError) as e:
        parse_recipe(bad)
    text = str(e.value)
    assert "'no_colon' is not 'module:function'" in text
    assert "lacks {prompt}, {answer_b}" in text
    assert "dpo.method=dpo" in text
    with pytest.raises(UserError, match="need pairs.enabled=true"):
        parse_recipe(
            {"rounds": 3, "use_samples": True, "sft": {"data": {"sample": "chat_sft.jsonl"}}, "dpo": {"enabled": False}}
        )
    with pytest.raises(UserError, match="names no rule"):
        parse_recipe(_recipe(pairs={"enabled": True, "judge": {"kind": "rules"}}))


# ------------------------------------------------------------------ judges


def test_rule_judge_scores_each_named_rule():
    cfg = JudgeConfig(max_words=4, must_match=(r"\d",), must_not_match=("sorry",), valid_json=False, stops=True)
    j = RulesJudge(cfg)
    s = j.score("q", [_a("It is 4."), _a("sorry, it is four or so, I think maybe"), _a("It is 4.", stopped=False)])
    assert s[0] == 0.0
    assert s[1] == pytest.approx(-(5 / 4) - 1 - 1)  # 9 words (5 past 4), no digit, says sorry
    assert s[2] == -1.0  # ran to the cap
    assert "max_words=4" in j.name and "stops" in j.name
    assert RulesJudge(JudgeConfig(valid_json=True)).score("q", [_a('{"a": 1}'), _a("{a: 1}")]) == [0.0, -1.0]


def test_callable_judge_is_imported_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "my_judge.py").write_text("def score(prompt, answer):\n    return float(answer.count('!'))\n")
    monkeypatch.chdir(tmp_path)
    j = RulesJudge(JudgeConfig(callable="my_judge:score"))
    assert j.score("q", [_a("a!"), _a("b!!")]) == [1.0, 2.0]
    with pytest.raises(UserError, match="cannot import module 'not_there'"):
        load_callable("not_there:score")
    with pytest.raises(UserError, match="has no function 'missing'"):
        load_callable("my_judge:missing")


def test_a_judge_that_raises_or_returns_nan_names_the_prompt(tmp_path, monkeypatch):
    (tmp_path / "bad_judge.py").write_text(
        "def boom(prompt, answer):\n    raise ValueError('no score for you')\n"
        "def nan(prompt, answer):\n    return float('nan')\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"failed on the prompt 'What is two plus two\?': ValueError: no score"):
        judged(RulesJudge(JudgeConfig(callable="bad_judge:boom")), "What is two plus two?", [_a("4")])
    with pytest.raises(UserError, match=r"returned nan on the prompt 'Name a colour\.'"):
        judged(RulesJudge(JudgeConfig(callable="bad_judge:nan")), "Name a colour.", [_a("red")])


def test_rubric_placeholders_and_verdicts():
    assert rubric_problem("{prompt} {answer_a} {answer_b}") is None
    assert "lacks {answer_b}" in rubric_problem("{prompt} {answer_a}")
    assert "brace" in rubric_problem("{prompt} {answer_a} {answer_b} {score}")
    assert [parse_verdict(x) for x in ("A", " b.", "Tie", "Answer A", "")] == ["A", "B", "tie", None, None]


def test_llm_judge_asks_both_orders_and_records_position_bias():
    asked = []

    def always_first(text: str) -> str:  # a judge that only ever prefers position A
        asked.append(text)
        return "A"

    j = LLMJudge(always_first, "fixed", None)
    scores = j.score("Say hi", [_a("hi"), _a("hello there")])
    assert len(asked) == 2 and "Answer A:\nhi" in asked[0] and "Answer A:\nhello there" in asked[1]
    assert scores == [0.5, 0.5]  # the position decided both times: no preference survives
    assert j.stats["order_disagreements"] == 1 and j.stats["comparisons"] == 2

    def shorter(text: str) -> str:  # a consistent judge: the shorter answer, wherever it stands
        a = text.split("Answer A:\n")[1].split("\n\nAnswer B:")[0]
        b = text.split("Answer B:\n")[1].split("\n\n")[0]
        return "A" if len(a) < len(b) else "B" if len(b) < len(a) else "tie"

    j = LLMJudge(shorter, "fixed", None)
    assert j.score("Say hi", [_a("hello there"), _a("hi"), _a("hey you")]) == [0.0, 1.0, 0.5]
    assert j.stats["order_disagreements"] == 0
    with pytest.raises(UserError, match="lacks {answer_b}"):
        LLMJudge(shorter, "fixed", "Compare {prompt}: {answer_a}")


# ------------------------------------------------------------------ pairing


def _rec(i, texts, scores):
    return {
        "index": i,
        "prompt": [{"role": "user", "content": f"q{i}"}],
        "seed": 7 + i,
        "answers": [{"text": t, "tokens": len(t.split()), "stopped": True} for t in texts],
        "scores": scores,
    }


def test_pairs_keep_only_a_real_gap():
    records = [
        _rec(0, ["short", "a much longer answer", "mid answer"], [0.0, -2.0, -1.0]),
        _rec(1, ["same", "same", "same"], [0.0, 0.0, 0.0]),  # chosen == rejected
        _rec(2, ["one", "two"], [-1.0, -1.0]),  # tie
        _rec(3, ["one", "two words"], [0.0, -0.1]),  # gap below min_gap
        _rec(4, ["Same ", "same"], [0.0, -3.0]),  # equal after spacing and case
    ]
    rows, dropped = make_pairs(records, 0.5, {"run": "r", "judge": "j"})
    assert len(rows) == 1
    assert rows[0]["chosen"][0]["content"] == "short" and rows[0]["rejected"][0]["content"] == "a much longer answer"
    assert rows[0]["provenance"] == {"run": "r", "judge": "j", "seed": 7}
    assert rows[0]["score_chosen"] == 0.0 and rows[0]["score_rejected"] == -2.0
    assert dropped == {
        "all answers identical (chosen == rejected)": 2,
        "tie: every answer scored alike": 1,
        "gap below min_gap 0.5": 1,
    }


def test_no_gap_anywhere_is_said_with_counts(tmp_path):
    records = [_rec(i, ["a", "b", "c"], [1.0, 1.0, 1.0]) for i in range(3)]
    with pytest.raises(NoPairs, match="no pairs with a gap: 3 prompts, 9 answers.*3 tie"):
        write_pairs(tmp_path, records, PairsConfig(), {}, "[t]")
    assert not (tmp_path / "pairs.jsonl").exists()


def test_written_pairs_pass_the_data_check_and_load(tmp_path):
    from lowvram.cli import main
    from lowvram.data import load_preference_data
    from lowvram.recipe import DataConfig

    records = [_rec(i, [f"ok {i}", f"a far longer answer number {i}"], [0.0, -1.0]) for i in range(12)]
    summary = write_pairs(tmp_path, records, PairsConfig(), {"run": "x", "judge": "rules"}, "[t]")
    assert summary["pairs_kept"] == 12
    assert summary["length_bias"] and "chosen is shorter" in summary["length_bias"]  # the data check's own rule
    data = load_preference_data(DataConfig(path=str(tmp_path / "pairs.jsonl")))
    assert len(data.train) == 12 and data.format
    assert main(["data", "check", str(tmp_path / "pairs.jsonl")]) == 0


# ------------------------------------------------------------------ prompts


def test_prompts_from_a_text_file_a_prompt_jsonl_and_datasets(tmp_path):
    (tmp_path / "p.txt").write_text("Say hi.\n\nName a colour.\nSay hi.\n")
    r = parse_recipe(
        _recipe(
            use_samples=False,
            sft={"enabled": False},
            pairs={"enabled": True, "prompts": {"path": "p.txt"}, "judge": {"max_words": 3}},
        )
    )
    prompts, source = read_prompts(r, tmp_path)
    assert prompts == [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Name a colour."}]]
    assert "2 prompts" in source
    (tmp_path / "p.jsonl").write_text('{"prompt": "One?"}\n{"prompt": "Two?"}\n')
    r = parse_recipe(
        _recipe(
            use_samples=False,
            sft={"enabled": False},
            pairs={"enabled": True, "prompts": {"path": "p.jsonl"}, "judge": {"max_words": 3}},
        )
    )
    assert [p[0]["content"] for p in read_prompts(r, tmp_path)[0]] == ["One?", "Two?"]
    src = (SAMPLES / "chat_sft.jsonl").read_bytes()
    chat, _ = read_prompts(parse_recipe(_recipe()), None)  # the SFT sample: conversations up to the last answer
    assert len(chat) > 50 and all(p[-1]["role"] == "user" for p in chat)
    prefs = parse_recipe(
        _recipe(pairs={"enabled": True, "prompts": {"sample": "chat_prefs.jsonl"}, "judge": {"max_words": 3}})
    )
    assert read_prompts(prefs, None)[0][0] == [{"role": "user", "content": "What is the capital of Australia?"}]
    assert (SAMPLES / "chat_sft.jsonl").read_bytes() == src  # source files are only read
    train, held = split_prompts(chat, 8, 42)
    assert len(held) == 8 and len(train) == len(chat) - 8 and split_prompts(chat, 8, 42) == (train, held)
    with pytest.raises(UserError, match="cannot spare 8 held out"):
        split_prompts(chat[:5], 8, 42)


def test_nan_check_rejects_non_numbers():
    class J(RulesJudge):
        def score(self, prompt, answers):
            return [None for _ in answers]

    j = J(JudgeConfig(max_words=1))
    with pytest.raises(UserError, match="returned None on the prompt"):
        judged(j, "p", [_a("x")])
    assert math.isfinite(judged(RulesJudge(JudgeConfig(max_words=1)), "p", [_a("x y")])[0])


# ------------------------------------------------------------------ sampling, resuming


def test_killed_sampling_resumes_without_resampling_finished_prompts(tiny_init_model_dir, tmp_path, monkeypatch):
    from lowvram.pairs.build import load_policy, sample_and_judge
    from lowvram.pairs.sampler import HFSampler

    recipe = parse_recipe(
        _recipe(
            model={"name": str(tiny_init_model_dir)},
            pairs={"enabled": True, "samples": 2, "max_new_tokens": 6, "judge": {"max_words": 3}},
        )
    )
    prompts = read_prompts(recipe, None)[0][:5]
    model, tok = load_policy(str(tiny_init_model_dir), {"policy": None}, recipe)
    judge = RulesJudge(recipe.pairs.judge)
    calls = []

    class Killed(Exception):
        pass

    def dying(prompt, answers):
        calls.append(prompt)
        if len(calls) == 3:
            raise Killed  # a kill between two prompts: the third was sampled but not written
        return RulesJudge.score(judge, prompt, answers)

    monkeypatch.setattr(judge, "score", dying)
    out = tmp_path / "resumed"
    with pytest.raises(UserError):  # the judge's fault is reported, naming the prompt
        sample_and_judge(HFSampler(model, tok, None), tok, prompts, judge, recipe.pairs, 11, out, "[t]")
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2
    with (out / "samples.jsonl").open("a") as fh:
        fh.write('{"index": 2, "prompt": [{"ro')  # a line cut short by kill -9
    monkeypatch.undo()
    seen = []
    monkeypatch.setattr(judge, "score", lambda p, a: (seen.append(p), RulesJudge.score(judge, p, a))[1])
    resumed = sample_and_judge(HFSampler(model, tok, None), tok, prompts, judge, recipe.pairs, 11, out, "[t]")
    assert len(seen) == 3  # only the three unfinished prompts were sampled again
    monkeypatch.undo()
    fresh = sample_and_judge(
        HFSampler(model, tok, None), tok, prompts, judge, recipe.pairs, 11, tmp_path / "fresh", "[t]"
    )
    assert [r["answers"] for r in resumed] == [r["answers"] for r in fresh]  # seeded per prompt: the same answers
    assert len((out / "samples.jsonl").read_text().splitlines()) == 5
    other = parse_recipe(
        _recipe(
            model={"name": str(tiny_init_model_dir)},
            pairs={"enabled": True, "samples": 3, "max_new_tokens": 6, "judge": {"max_words": 3}},
        )
    )
    with pytest.raises(UserError, match="other settings"):
        sample_and_judge(HFSampler(model, tok, None), tok, prompts, judge, other.pairs, 11, out, "[t]")


# ------------------------------------------------------------------ the command and the loop


def test_pairs_command_writes_checked_pairs_and_resumes(tiny_init_model_dir, tmp_path, capsys):
    from lowvram.cli import main

    out = tmp_path / "made"
    args = [
        "pairs",
        "self-pairs",
        f"model.name={tiny_init_model_dir}",
        "pairs.max_prompts=6",
        "pairs.samples=3",
        "pairs.max_new_tokens=8",
        "pairs.min_gap=0.01",
        "pairs.judge.max_words=2",
        "pairs.judge.stops=false",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "policy: the recipe's model" in said and "judge: rules(max_words=2)" in said
    rows = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert rows and summary["pairs_kept"] == len(rows) and summary["prompts"] == 6
    assert summary["pairs_kept"] + summary["pairs_dropped"] == 6
    assert summary["sampling"] == {"samples": 3, "max_new_tokens": 8, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    for r in rows:
        assert r["score_chosen"] - r["score_rejected"] >= 0.01
        assert r["provenance"]["judge"] == "rules(max_words=2)" and isinstance(r["provenance"]["seed"], int)
    assert main(["data", "check", str(out / "pairs.jsonl")]) == 0
    before = (out / "pairs.jsonl").read_bytes()
    assert main(args) == 0  # again: every prompt is already sampled; nothing is drawn twice
    assert "6 of 6 prompts already sampled" in capsys.readouterr().out
    assert (out / "pairs.jsonl").read_bytes() == before


def test_two_rounds_make_answers_shorter_on_heldout_prompts(tiny_model_dir, tmp_path):
    """DONE WHEN of issue 24: on CPU, the tiny model and a rule judge (brevity), two rounds of sample -> judge ->
    pair -> DPO move the judged property the wanted way on prompts no round sampled."""
    from lowvram.cli import main

    run = tmp_path / "run"
    code = main(
        [
            "run",
            "self-pairs",
            "--run-dir",
            str(run),
            "--no-export",
            "eval.enabled=false",
            "pairs.stop_below_win_rate=0",  # both rounds run: the test measures the second one too
        ]
    )
    assert code == 0
    summary = json.loads((run / "rounds" / "summary.json").read_text())
    r1, r2 = summary["rounds"]
    sft_words = r1["compare"]["previous"]["mean_words"]  # round 1's previous policy is the SFT adapter
    final_words = r2["compare"]["new"]["mean_words"]
    assert final_words < sft_words, (sft_words, final_words)
    # the judged property over the two rounds (what the issue asks); one round alone moves the 1M-parameter model
    # by less than its sampling noise: round 1 gained with one draw of the samples and lost with another
    sft_score, final_score = r1["compare"]["previous"]["mean_judge_score"], r2["compare"]["new"]["mean_judge_score"]
    assert final_score > sft_score, (sft_score, final_score)
    for r in (r1, r2):
        assert r["pairs"]["pairs_kept"] > 0 and r["compare"]["kl_to_previous"] is not None
    assert summary["kept_round"] == 2
    assert (run / "dpo" / "DONE").is_file() and (run / "dpo" / "adapter" / "adapter_config.json").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r.get("stage") == "rounds"] == [1, 2]
    assert "Rounds of sampled pairs" in (run / "report.html").read_text()
    assert main(["data", "check", str(run / "rounds" / "round-2" / "pairs.jsonl")]) == 0
    # round 2 started from round 1's policy, and DPO's frozen reference was that policy
    prov = json.loads((run / "rounds" / "round-2" / "pairs.jsonl").read_text().splitlines()[0])["provenance"]
    assert prov["policy"] == str(run / "rounds" / "round-1" / "dpo" / "adapter") and prov["round"] == 2


def test_llm_judge_runs_a_gguf_through_llama_cpp_in_both_orders(tiny_init_model_dir, tmp_path):
    """The (b) judge on a real GGUF: every pair asked twice, answers swapped; ties and flips recorded."""
    from lowvram.export.llamacpp import convert
    from lowvram.pairs.judges import make_judge

    gguf = tmp_path / "judge-f16.gguf"
    convert(tiny_init_model_dir, gguf, "f16", tmp_path / "convert.log")
    recipe = parse_recipe(_recipe(pairs={"enabled": True, "judge": {"kind": "llm", "model": str(gguf)}}))
    judge = make_judge(recipe.pairs.judge, recipe)
    try:
        assert judge.name == f"llm({gguf}, default rubric)"
        scores = judged(judge, "What is two plus two?", [_a("Four."), _a("It is four, I believe."), _a("Five.")])
        again = judged(judge, "What is two plus two?", [_a("Four."), _a("It is four, I believe."), _a("Five.")])
    finally:
        judge.close()
    assert scores == again  # greedy: a verdict is repeatable
    assert all(0.0 <= s <= 1.0 for s in scores) and sum(scores) == pytest.approx(1.5)  # 3 pairs, 1 point each / 2
    assert judge.stats["comparisons"] == 12  # 3 pairs x 2 orders, twice
    assert judge.stats["readable"] + judge.stats["unreadable"] == 12
    first = judge.log[0]
    assert first["x"] == "Four." and first["y"] == "It is four, I believe." and {"x_as_A", "x_as_B"} <= first.keys()
    # a tiny random model mostly answers something else than A, B or tie: those count as ties, recorded
    assert judge.stats["ties"] + judge.stats["order_disagreements"] <= 6
    assert judge.stats["ties"] >= judge.stats["unreadable"] // 2


def test_a_judge_that_cannot_fit_beside_the_policy_is_refused_before_loading(tmp_path, capsys):
    from lowvram.cli import main

    judge = tmp_path / "big-judge"  # a 7B transformers folder: its size read from config.json, nothing loaded
    judge.mkdir()
    (judge / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 4096,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "intermediate_size": 11008,
                "vocab_size": 32000,
            }
        )
    )
    with (judge / "model.safetensors").open("wb") as fh:
        fh.truncate(13 * 2**30)  # sparse: the size of its 16-bit weights, no disk used
    base = ["pairs", "self-pairs", "--gpu", "t4", "model.name=null", "model.family=llama", "--out", str(tmp_path / "o")]
    code = main([*base, "pairs.judge.kind=llm", f"pairs.judge.model={judge}"])
    assert code != 0
    err = capsys.readouterr().err
    assert "The pairs loop does not fit this card: generate + judge needs" in err
    assert "What would fit: a judge of at most" in err and "as a GGUF" in err
    assert not (tmp_path / "o").exists()  # refused before sampling anything
    assert main(["plan", "self-pairs", "--gpu", "t4", "model.name=null", "model.family=llama"]) == 0
    out = capsys.readouterr().out
    assert "generate + judge:" in out and "KV cache (4 x 288 tokens)" in out and "train (dpo):" in out


def test_llama_cpp_sampler_on_a_gguf_of_the_policy(tiny_init_model_dir, tmp_path, capsys):
    """pairs.sampler=llamacpp: the policy exported to an f16 GGUF, seeded answers as token ids, EOS-stopped."""
    from lowvram.cli import main

    out = tmp_path / "lc"
    args = [
        "pairs",
        "self-pairs",
        f"model.name={tiny_init_model_dir}",
        "pairs.max_prompts=4",
        "pairs.samples=3",
        "pairs.max_new_tokens=12",
        "pairs.min_gap=0.01",
        "pairs.judge.max_words=2",
        "pairs.sampler=llamacpp",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "sampler: llama.cpp on an f16 GGUF of the policy: set by the recipe" in said
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and {r["sampler"] for r in recs} == {"llama.cpp (f16 GGUF)"}
    assert all(1 <= a["tokens"] <= 12 and (a["stopped"] or a["tokens"] == 12) for r in recs for a in r["answers"])
    from lowvram.pairs.build import load_policy
    from lowvram.pairs.sampler import LlamaCppSampler

    recipe, _ = load_recipe("self-pairs", [f"model.name={tiny_init_model_dir}"])
    _, tok = load_policy(str(tiny_init_model_dir), {"policy": None}, recipe)
    s = LlamaCppSampler(out / "gguf" / "policy-f16.gguf", tok, 256)
    try:
        text = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
        a, b, c = s.sample(text, 3, 5, 12), s.sample(text, 3, 5, 12), s.sample(text, 3, 6, 12)
    finally:
        s.close()
    assert a == b and a != c  # seeded: the same seed draws the same answers, another seed others
    assert len({tuple(x) for x in a}) > 1  # temperature 1: a prompt's answers differ


@pytest.mark.slow
def test_reward_model_judge_of_another_run_scores_a_runs_policy(tiny_init_model_dir, tmp_path, capsys):
    """(a): the rm stage of a finished run judges; --policy RUN samples from that run's final adapter."""
    from lowvram.cli import main

    run = tmp_path / "run"
    steps = ["sft.max_steps=1", "dpo.max_steps=1", "rm.max_steps=2", "eval.enabled=false"]
    assert main(["run", "demo", f"model.name={tiny_init_model_dir}", *steps, "--run-dir", str(run), "--no-export"]) == 0
    assert (run / "rm" / "DONE").is_file()
    capsys.readouterr()
    out = tmp_path / "rm-pairs"
    args = ["pairs", "self-pairs", f"model.name={tiny_init_model_dir}", "--policy", str(run), "--out", str(out)]
    args += ["pairs.max_prompts=3", "pairs.samples=3", "pairs.max_new_tokens=8", "pairs.min_gap=0.000001"]
    args += ["pairs.judge.kind=reward_model", f"pairs.judge.run={run}", "pairs.sampler=transformers"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert f"policy: the final adapter of {run}" in said and f"judge: reward_model({run / 'rm' / 'adapter'})" in said
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    scores = [s for r in recs for s in r["scores"]]
    assert len(scores) == 9 and len(set(scores)) > 1 and all(math.isfinite(s) for s in scores)


SMOLLM2 = Path("/work/models/smollm2-hf")  # SmolLM2-135M-Instruct as a plain HF folder (FIELD_NOTES.md)


@pytest.mark.slow
@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(), reason=f"no SmolLM2-135M-Instruct folder at {SMOLLM2}")
def test_the_loop_runs_end_to_end_on_smollm2(tmp_path):
    """The real default-sized model: an instruct model, no SFT stage, one round with a rule judge."""
    from lowvram.cli import main

    run = tmp_path / "run"
    over = [
        f"model.name={SMOLLM2}",
        "sft.enabled=false",
        "rounds=1",
        "pairs.max_prompts=6",
        "pairs.samples=3",
        "pairs.max_new_tokens=24",
        "pairs.heldout_prompts=2",
        "pairs.heldout_samples=1",
        "pairs.judge.max_words=8",
        "pairs.min_gap=0.1",
        "dpo.max_steps=2",
        "dpo.batch_size=2",
        "dpo.data.eval_fraction=0",
        "eval.enabled=false",
    ]
    assert main(["run", "self-pairs", *over, "--run-dir", str(run), "--no-export"]) == 0
    summary = json.loads((run / "rounds" / "summary.json").read_text())
    (r1,) = summary["rounds"]
    assert r1["pairs"]["pairs_kept"] > 0 and r1["compare"]["comparisons"] == 2
    assert (run / "dpo" / "DONE").is_file() and (run / "dpo" / "adapter" / "adapter_config.json").is_file()
    rows = [json.loads(x) for x in (run / "rounds" / "round-1" / "pairs.jsonl").read_text().splitlines()]
    assert all(r["provenance"]["policy"] == f"base {SMOLLM2}" for r in rows)

"""What DPO did, measured from real generations on the tiny Llama: KL to the reference, lowvram eval,
the reward model, best-of-N, and report.html rendered in a real headless browser."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lowvram.cli import main

pytestmark = pytest.mark.slow

# the demo recipe (rm on, best-of-4), shortened; DPO's step is larger so that 13 steps move the policy clearly
QUICK = [
    "sft.epochs=1",
    "dpo.epochs=1",
    "dpo.learning_rate=1e-3",
    "rm.max_steps=12",
    "eval.prompts=6",
    "eval.max_new_tokens=24",
]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    rdir = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["run", "tiny", "--run-dir", str(rdir), "--no-export", *QUICK]) == 0
    return rdir


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_kl_is_zero_when_the_policy_is_the_reference_and_positive_against_another(tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowvram.evaluate.kl import kl_to_reference

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
        LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    )  # random A and B: the adapter changes the model
    model.add_adapter("ref", model.peft_config["default"])
    for name, p in model.named_parameters():  # what TRL does: the reference is a copy of the policy adapter
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(p.data)
    prompts = ["What is the capital of France?", "Name a primary colour."]
    same = kl_to_reference(model, tok, prompts, samples=3, max_new_tokens=16, seed=1)
    assert same["kl_answers"] == 6 and same["kl_mean_tokens"] > 0
    assert abs(same["kl"]) < 1e-5
    base = kl_to_reference(model, tok, prompts, reference=None, samples=3, max_new_tokens=16, seed=1)
    assert base["kl"] > 0.05  # against the base (adapters off) the same samples are more likely under the policy
    assert [n for n, p in model.named_parameters() if p.requires_grad] and all(
        ".default." in n for n, p in model.named_parameters() if p.requires_grad
    )  # trainability left as it was


def test_kl_is_logged_zero_before_dpo_and_positive_after(run):
    rows = [r for r in _jsonl(run / "metrics.jsonl") if r.get("stage") == "dpo" and "eval" in r]
    by = {r["eval"]: r for r in rows}
    # the reference is a copy of the SFT policy: 0 exactly, with no answers sampled to show it
    assert by["before"]["kl"] == 0.0 and by["before"]["kl_answers"] == 0
    assert by["after"]["kl"] > 0.05
    assert by["after"]["kl_answers"] == 6 * 2  # eval.prompts x eval.kl_samples
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dpo"]["heldout_after"]["kl"] == by["after"]["kl"]
    assert summary["dpo"]["kl_warn_nats"] == 10.0
    assert summary["dpo"]["kl_too_high"] == (by["after"]["kl"] > 10)
    assert (run / "plots" / "kl_to_reference.png").is_file() and (run / "plots" / "answer_length.png").is_file()


def test_kl_warning_follows_the_recipe_threshold(run, tmp_path, capsys):
    from lowvram.evaluate.report import summarize, summary_lines

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("*adapter*", "checkpoints", "eval", "plots"))
    recipe = (copy / "recipe.yaml").read_text()
    after = json.loads((copy / "summary.json").read_text())["dpo"]["heldout_after"]["kl"]
    (copy / "recipe.yaml").write_text(re.sub(r"kl_warn_nats: .*", f"kl_warn_nats: {after / 2}", recipe))
    lines = summary_lines(summarize(copy))
    assert any(x.startswith("WARNING: the policy drifted") for x in lines)


def test_eval_answers_every_prompt_with_every_model(run):
    answers = _jsonl(run / "eval" / "answers.jsonl")
    greedy = [a for a in answers if a["mode"] == "greedy"]
    assert {a["model"] for a in greedy} == {"base", "sft", "final"}
    assert len(greedy) == 3 * 6 and all(a["tokens"] > 0 for a in greedy)
    sampled = [a for a in answers if a["mode"] == "sample"]
    assert len(sampled) == 2 * 6 * 2 and {a["model"] for a in sampled} == {"base", "final"}
    models = {m["model"]: m for m in _jsonl(run / "eval" / "models.jsonl")}
    # the reference is the SFT model: its KL to itself is 0 exactly, so it is not sampled for it
    assert models["sft"]["kl"] == 0.0 and models["sft"]["kl_answers"] == 0
    assert models["final"]["kl"] > 0.05
    assert models["sft"]["implicit_margin_vs_sft"] == pytest.approx(0.0, abs=1e-6)
    assert models["sft"]["rm_win_rate_vs_sft"] == 0.5  # ties with itself on every prompt
    mean_len = sum(a["tokens"] for a in greedy if a["model"] == "final") / 6
    assert models["final"]["mean_answer_tokens"] == pytest.approx(mean_len)
    # the margin is the mean of per-answer implicit rewards, final minus SFT, prompt by prompt
    reward = {(a["model"], a["prompt"]): a["implicit_reward"] for a in greedy}
    prompts = {a["prompt"] for a in greedy}
    margin = sum(reward["final", p] - reward["sft", p] for p in prompts) / len(prompts)
    assert models["final"]["implicit_margin_vs_sft"] == pytest.approx(margin, abs=1e-3)


def test_reward_model_and_best_of_n(run):
    from lowvram.data import load_preference_data
    from lowvram.recipe import load_recipe
    from lowvram.train.reward import load_scorer, rm_data_config

    held_out = json.loads((run / "rm" / "eval_after.json").read_text())["accuracy"]
    assert 0 <= held_out <= 1
    # the scorer lowvram eval uses reads pairs as the RewardTrainer did: it ranks the training pairs it learned
    recipe, _ = load_recipe("tiny")
    data = load_preference_data(rm_data_config(recipe), recipe.sample_file(rm_data_config(recipe)), seed=recipe.seed)
    score = load_scorer(run)
    prompts = [r["prompt"] for r in data.train]
    chosen = score(prompts, [r["chosen"][-1]["content"] for r in data.train])
    rejected = score(prompts, [r["rejected"][-1]["content"] for r in data.train])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(chosen) >= 0.7
    b = json.loads((run / "eval" / "summary.json").read_text())["best_of_n"]
    assert b["n"] == 4 and b["scorer"] == "reward model"
    rows = _jsonl(run / "eval" / "best_of_n.jsonl")
    assert len(rows) == 6
    for r in rows:
        assert len(r["candidate_scores"]) == 4 and r["best_of_n_score"] == max(r["candidate_scores"])
    assert b["generated_tokens_best_of_n"] > b["generated_tokens_final"]
    assert b["generation_cost_ratio"] == pytest.approx(
        b["generated_tokens_best_of_n"] / b["generated_tokens_final"], abs=0.01
    )


def test_sampling_is_seeded(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowvram.evaluate.kl import generate

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    prompts = ["What is the capital of Peru?", "What sound does a cow make?"]
    a = generate(model, tok, prompts, sample=True, n=3, seed=7, max_new_tokens=12)
    assert a == generate(model, tok, prompts, sample=True, n=3, seed=7, max_new_tokens=12)
    assert a != generate(model, tok, prompts, sample=True, n=3, seed=8, max_new_tokens=12)
    assert len(a) == 2 and all(len(group) == 3 for group in a)


def test_eval_command_reruns_on_a_run_directory(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    assert main(["eval", str(copy), "--best-of", "2", "--prompts", "2"]) == 0
    out = capsys.readouterr().out
    assert "Best-of-2 SFT vs final, by the reward model" in out and "Report:" in out
    assert json.loads((copy / "eval" / "summary.json").read_text())["best_of_n"]["n"] == 2
    assert len(_jsonl(copy / "eval" / "best_of_n.jsonl")) == 2
    assert "best-of-2 (SFT)" in (copy / "report.html").read_text()


def test_each_answer_gets_its_own_scores_when_two_prompts_end_in_the_same_user_turn(run, tmp_path):
    """The answers table is keyed by the last user turn; two prompts that share it are still two rows,
    each with the scores of its own answer (they were found by label, so the second got the first's)."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    question = {"role": "user", "content": "What is the capital of France?"}
    prompts = [[question], [{"role": "system", "content": "Answer like a pirate, at length."}, question]]
    (copy / "eval" / "heldout_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    assert main(["eval", str(copy), "--best-of", "0", "--prompts", "2"]) == 0
    greedy = [a for a in _jsonl(copy / "eval" / "answers.jsonl") if a["mode"] == "greedy"]
    models = {m["model"]: m for m in _jsonl(copy / "eval" / "models.jsonl")}
    for name in ("sft", "final"):
        rows = [a for a in greedy if a["model"] == name]
        assert [a["prompt"] for a in rows] == [question["content"]] * 2
        for key in ("implicit_reward", "rm_score"):  # the model's score is the mean of its answers' scores
            assert sum(a[key] for a in rows) / 2 == pytest.approx(models[name][key], abs=1e-3), (name, key)
        assert rows[0]["rm_score"] != rows[1]["rm_score"]  # two prompts, two answers, two scores


def test_eval_and_report_refuse_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert main(["report", str(tmp_path)]) == 2
    assert "not a lowvram run directory" in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


CHROME_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
]


@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_renders_in_a_real_browser(run, tmp_path):
    from PIL import Image

    assert main(["report", str(run)]) == 0
    page = run / "report.html"
    text = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # self-contained: nothing to fetch
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [_chromium(), *CHROME_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for heading in (
        "Plan and memory",
        "Data check",
        "Training curves",
        "Base vs SFT vs final",
        "Answers side by side",
        "Reward model and best-of-N",
        "Export verification",
    ):
        assert f">{heading}</h2>" in dom, heading
    models = {m["model"]: m for m in _jsonl(run / "eval" / "models.jsonl")}
    assert f"{models['final']['kl_per_token']:.3f} ± " in dom  # the numbers on the page are the eval's
    first = next(a for a in _jsonl(run / "eval" / "answers.jsonl") if a["model"] == "final" and a["mode"] == "greedy")
    assert first["answer"][:20].replace("&", "&amp;").replace("<", "&lt;") in dom
    assert "best-of-4 (SFT)" in dom and "held-out pair accuracy" in dom and "Extra cost" in dom
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', dom)
    assert len(images) >= 6  # loss, margin, accuracy, rewards, KL, answer length
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            _chromium(),
            *CHROME_FLAGS,
            f"--user-data-dir={profile}",
            "--window-size=1200,2400",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 2400)
    assert len(set(img.resize((60, 120)).getdata())) > 20  # text and plots drawn, not a blank page

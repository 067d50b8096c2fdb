"""Training data: each format becomes TRL's rows, each bad line is named, nothing touches the source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowvram.cli import main
from lowvram.data import LoadedData, load_preference_data, load_sft_data
from lowvram.data.check import add_token_budget, check_data, length_bias
from lowvram.data.load import parse_records
from lowvram.data.sources import read_local
from lowvram.errors import UserError
from lowvram.recipe import SAMPLES_DIR, DataConfig


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def sft(path: Path, **kw) -> LoadedData:
    return load_sft_data(DataConfig(path=str(path), **kw))


def prefs(path: Path, **kw) -> LoadedData:
    return load_preference_data(DataConfig(path=str(path), **kw))


def problems_of(path: Path, kind: str, **kw) -> list[tuple[int | None, int | None, str]]:
    parsed = parse_records(read_local(path), str(path), kind, **kw)
    return [(p.location.line, p.location.record, p.code) for p in parsed.problems]


USER, BOT = "user", "assistant"


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# ------------------------------------------------------------------ SFT formats


def test_chat_messages(tmp_path):
    rows = [{"messages": [msg("system", "Be brief."), msg(USER, "Hi"), msg(BOT, "Hello.")]}] * 2
    data = sft(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert data.format == "chat" and "messages" in data.reason and "2 of the first 2" in data.reason
    assert data.train[0] == rows[0] and data.eval is None and data.dropped == 0


def test_sharegpt_becomes_messages(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"},
        ]
    }
    data = sft(write_jsonl(tmp_path / "sg.jsonl", [row]))
    assert data.format == "sharegpt"
    assert data.train == [{"messages": [msg("system", "S"), msg(USER, "Q"), msg(BOT, "A")]}]


def test_alpaca_becomes_user_assistant(tmp_path):
    rows = [
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"instruction": "Say hi.", "input": "", "output": "Hi."},
    ]
    data = sft(write_jsonl(tmp_path / "alpaca.jsonl", rows))
    assert data.format == "alpaca"
    assert data.train == [
        {"messages": [msg(USER, "Translate.\n\nchat"), msg(BOT, "cat")]},
        {"messages": [msg(USER, "Say hi."), msg(BOT, "Hi.")]},
    ]


def test_prompt_completion_and_text(tmp_path):
    pc = sft(write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": "4"}]))
    assert pc.format == "prompt-completion" and pc.train == [{"prompt": "2+2=", "completion": "4"}]
    tx = sft(write_jsonl(tmp_path / "tx.jsonl", [{"text": "Once upon a time."}]))
    assert tx.format == "text" and tx.train == [{"text": "Once upon a time."}]


# ------------------------------------------------------------------ preference formats


def test_string_pairs(tmp_path):
    row = {"prompt": "P", "chosen": "good", "rejected": "bad"}
    data = prefs(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert data.format == "prompt-chosen-rejected" and data.train == [row]


def test_conversational_pairs_with_prompt(tmp_path):
    row = {"prompt": [msg(USER, "Q")], "chosen": [msg(BOT, "good")], "rejected": [msg(BOT, "bad")]}
    data = prefs(write_jsonl(tmp_path / "c.jsonl", [row]))
    assert data.format == "chat-preference" and data.train == [row]


def test_conversational_transcripts_without_prompt(tmp_path):
    shared = [msg("system", "S"), msg(USER, "Q1"), msg(BOT, "A1"), msg(USER, "Q2")]
    row = {"chosen": shared + [msg(BOT, "good")], "rejected": shared + [msg(BOT, "bad")]}
    data = prefs(write_jsonl(tmp_path / "t.jsonl", [row]))
    assert data.format == "chat-transcripts"
    assert data.train == [{"prompt": shared, "chosen": [msg(BOT, "good")], "rejected": [msg(BOT, "bad")]}]


def test_hh_rlhf_prompt_is_the_shared_prefix(tmp_path):
    prefix = "\n\nHuman: How do I boil an egg?\n\nAssistant: In water.\n\nHuman: For how long?\n\nAssistant:"
    row = {"chosen": prefix + " About nine minutes.", "rejected": prefix + " Forever."}
    data = prefs(write_jsonl(tmp_path / "hh.jsonl", [row]))
    assert data.format == "hh-rlhf" and "HH-RLHF" in data.reason
    assert data.train == [
        {
            "prompt": [msg(USER, "How do I boil an egg?"), msg(BOT, "In water."), msg(USER, "For how long?")],
            "chosen": [msg(BOT, "About nine minutes.")],
            "rejected": [msg(BOT, "Forever.")],
        }
    ]


def test_hh_rlhf_rows_that_diverge_early_are_named(tmp_path):
    good = {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"}
    bad = {
        "chosen": "\n\nHuman: Q\n\nAssistant: A\n\nHuman: more\n\nAssistant: C",
        "rejected": "\n\nHuman: Q\n\nAssistant: X\n\nHuman: more\n\nAssistant: D",
    }
    path = write_jsonl(tmp_path / "hh.jsonl", [good, bad, good])
    assert problems_of(path, "preference") == [(2, None, "bad_value")]


def test_ranked_answers_and_column_mapping(tmp_path):
    row = {"qid": 7, "question": "Why?", "response_j": "Because.", "response_k": "No idea."}
    path = write_jsonl(tmp_path / "se.jsonl", [row])
    auto = prefs(path)
    assert auto.format == "ranked-answers" and "response_j is preferred" in auto.reason
    assert auto.train == [{"prompt": "Why?", "chosen": "Because.", "rejected": "No idea."}]
    mapped = prefs(path, columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"})
    assert mapped.format == "prompt-chosen-rejected" and "prompt <- question" in mapped.reason
    assert mapped.train == auto.train


def test_column_mapping_names_a_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "se.jsonl", [{"question": "Q", "good": "A", "bad": "B"}])
    with pytest.raises(UserError) as e:
        prefs(path, columns={"prompt": "question", "chosen": "good", "rejected": "response_k"})
    assert "'response_k' is not a column" in e.value.render()
    with pytest.raises(UserError) as e:
        prefs(path, columns={"promt": "question"})
    assert "did you mean 'prompt'" in e.value.render()


def test_argilla_dpo_mix_and_ultrafeedback(tmp_path):
    chosen = [msg(USER, "Q"), msg(BOT, "good")]
    rejected = [msg(USER, "Q"), msg(BOT, "bad")]
    want = [{"prompt": [msg(USER, "Q")], "chosen": [msg(BOT, "good")], "rejected": [msg(BOT, "bad")]}]
    argilla = {
        "dataset": "x",
        "chosen": chosen,
        "rejected": rejected,
        "chosen_rating": 5,
        "rejected_rating": 2,
        "chosen_model": "a",
        "rejected_model": "b",
    }
    data = prefs(write_jsonl(tmp_path / "mix.jsonl", [argilla]))
    assert data.format == "argilla-dpo-mix" and data.train == want
    uf = {
        "prompt": "Q",
        "prompt_id": "abc",
        "chosen": chosen,
        "rejected": rejected,
        "messages": chosen,
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }
    data = prefs(write_jsonl(tmp_path / "uf.jsonl", [uf]))
    assert data.format == "ultrafeedback-binarized" and data.train == want
    # the prompt column must agree with the dialogue it summarises
    path = write_jsonl(tmp_path / "uf_bad.jsonl", [uf, {**uf, "prompt": "Something else"}])
    assert problems_of(path, "preference") == [(2, None, "bad_value")]


def test_declared_format_must_fit_the_stage(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "P", "chosen": "a", "rejected": "b"}])
    with pytest.raises(UserError, match="is preference data, but this stage needs sft"):
        sft(path, format="prompt-chosen-rejected")


def test_unrecognised_columns_say_what_was_seen(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(UserError) as e:
        prefs(path)
    assert "columns seen: bar, foo" in e.value.render() and "data.columns" in e.value.render()


# ------------------------------------------------------------------ errors, with their lines


def test_each_error_is_named_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "P", "chosen": "a", "rejected": "b"})
    path.write_bytes(
        "\n".join(
            [
                good,  # 1
                '{"prompt": "P", "chosen": "a", "rejected": ',  # 2 invalid JSON
                json.dumps({"prompt": "P", "chosen": "a"}),  # 3 missing rejected
                "",  # 4 blank: skipped
                json.dumps({"prompt": "P", "chosen": "  ", "rejected": "b"}),  # 5 empty chosen
                json.dumps({"prompt": "P", "chosen": 3, "rejected": "b"}),  # 6 wrong type
                good,  # 7
                "[1, 2]",  # 8 not an object
            ]
        ).encode()
        + b"\n"
        + b'{"prompt": "P\xff", "chosen": "a", "rejected": "b"}\n'
        + good.encode()
        + b"\n"
    )
    assert problems_of(path, "preference") == [
        (2, None, "invalid_json"),
        (3, None, "missing_field"),
        (5, None, "empty_field"),
        (6, None, "wrong_type"),
        (8, None, "not_an_object"),
        (9, None, "undecodable"),
    ]
    before = path.read_bytes()
    with pytest.raises(UserError) as e:
        prefs(path)
    text = e.value.render()
    assert "6 invalid rows" in text and f"{path} line 2: invalid JSON" in text
    assert f"{path} line 3: missing field 'rejected'" in text and "line 9: undecodable bytes: 0xff" in text
    assert "drop_invalid" in text
    data = prefs(path, drop_invalid=True)
    assert data.dropped == 6 and len(data.train) == 3 and data.dropped_problems[0].location.line == 2
    assert path.read_bytes() == before  # the source is never modified


def test_one_invalid_row_is_one_row(tmp_path, capsys):
    """The refusal and the run's 'dropped' line count in words that agree with the number."""
    good = json.dumps({"prompt": "P", "chosen": "a", "rejected": "b"})
    path = tmp_path / "p.jsonl"
    path.write_text(good + "\n{not json\n" + good.replace("a", "c") + "\n")
    with pytest.raises(UserError) as e:
        prefs(path)
    assert "p.jsonl: 1 invalid row (" in e.value.render() and "3 rows in all" in e.value.render()
    from lowvram.pipeline import load_stage_data
    from lowvram.recipe import load_recipe

    recipe, _ = load_recipe(
        "tiny",
        [
            "use_samples=false",
            "sft.enabled=false",
            f"dpo.data.path={path}",
            "dpo.data.drop_invalid=true",
            "dpo.data.eval_fraction=0",
        ],
    )
    load_stage_data(recipe, None, ["dpo"])
    assert ", 1 invalid row dropped from" in capsys.readouterr().out


def test_message_level_errors(tmp_path):
    rows = [
        {"messages": [msg(USER, "Q"), msg(BOT, "A")]},
        {"messages": [msg(USER, "Q"), {"role": "assistant"}]},  # 2 missing content
        {"messages": [msg(USER, "Q"), msg("robot", "A")]},  # 3 unknown role
        {"messages": "Q: hi A: hello"},  # 4 wrong type
        {"messages": [msg(USER, "Q")]},  # 5 no assistant turn
        {"messages": []},  # 6 empty
        {"messages": [msg(USER, "Q"), {"role": "assistant", "content": ["A"]}]},  # 7 content not a string
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    assert problems_of(path, "sft") == [
        (2, None, "missing_field"),
        (3, None, "bad_value"),
        (4, None, "wrong_type"),
        (5, None, "bad_value"),
        (6, None, "empty_field"),
        (7, None, "wrong_type"),
    ]


def test_all_rows_invalid_is_refused_even_when_dropping(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "P", "chosen": "", "rejected": "b"}] * 2)
    with pytest.raises(UserError, match="no valid rows"):
        prefs(path, drop_invalid=True)


# ------------------------------------------------------------------ files, folders, CSV, Parquet


def test_json_array_records_know_their_lines(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(
        '[\n  {"prompt": "P", "chosen": "a", "rejected": "b"},\n'
        '  {"prompt": "P",\n   "chosen": "a"},\n'
        '  {"prompt": "P", "chosen": "a", "rejected": "b"}\n]\n'
    )
    assert problems_of(path, "preference") == [(3, 2, "missing_field")]
    with pytest.raises(UserError) as e:
        prefs(path)
    assert f"{path} record 2 (line 3): missing field 'rejected'" in e.value.render()


def test_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n {"prompt": "P", "chosen": "a", "rejected": "b"},\n {"prompt": "P", "chosen" "a"}\n]\n')
    with pytest.raises(UserError, match="line 3: invalid JSON"):
        prefs(path)


def test_jsonl_named_json_and_column_oriented_json(tmp_path):
    row = {"prompt": "P", "chosen": "a", "rejected": "b"}
    assert prefs(write_jsonl(tmp_path / "lines.json", [row, row])).train == [row, row]
    cols = tmp_path / "cols.json"
    cols.write_text(json.dumps({"prompt": ["P", "Q"], "chosen": ["a", "c"], "rejected": ["b", "d"]}))
    assert prefs(cols).train[1] == {"prompt": "Q", "chosen": "c", "rejected": "d"}


def test_csv_rows_are_named_by_their_first_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(
        b"prompt,chosen,rejected\n"  # 1 header
        b"P,a,b\n"  # 2
        b'"multi\nline prompt",a,b\n'  # 3-4
        b"P,,b\n"  # 5 empty chosen
        b"P,a,b,extra\n"  # 6 too many fields
        b"P\xfe,a,b\n"  # 7 undecodable
        b"P,a,b\n"
    )  # 8
    assert problems_of(path, "preference") == [
        (5, None, "empty_field"),
        (6, None, "wrong_field_count"),
        (7, None, "undecodable"),
    ]
    data = prefs(path, drop_invalid=True)
    assert data.dropped == 3 and data.train[1]["prompt"] == "multi\nline prompt"


def test_csv_with_json_messages_column(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "chat.csv"
    pd.DataFrame({"messages": [json.dumps([msg(USER, "Q"), msg(BOT, "A")])]}).to_csv(path, index=False)
    data = sft(path)
    assert data.format == "chat" and data.train == [{"messages": [msg(USER, "Q"), msg(BOT, "A")]}]


def test_parquet_records_are_numbered(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "data.parquet"
    pd.DataFrame({"instruction": ["Do it.", "Do that.", None], "output": ["Done.", "Done too.", "x"]}).to_parquet(path)
    assert problems_of(path, "sft") == [(None, 3, "missing_field")]
    with pytest.raises(UserError) as e:
        sft(path)
    assert f"{path} record 3: missing field 'instruction'" in e.value.render()


def test_folder_of_mixed_files(tmp_path):
    pd = pytest.importorskip("pandas")
    folder = tmp_path / "prefs"
    (folder / "more").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", [{"prompt": "P1", "chosen": "a", "rejected": "b"}])
    pd.DataFrame({"prompt": ["P2"], "chosen": ["a"], "rejected": ["b"]}).to_parquet(folder / "more" / "b.parquet")
    (folder / "notes.txt").write_text("ignored")
    data = prefs(folder)
    assert [r["prompt"] for r in data.train] == ["P1", "P2"]
    (folder / "empty").mkdir()
    with pytest.raises(UserError, match="holds no data files"):
        prefs(folder / "empty")


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "P", "chosen": "a", "rejected": "b"}])
    monkeypatch.chdir(tmp_path.parent)
    data = load_preference_data(DataConfig(path="p.jsonl"), base_dir=tmp_path)
    assert data.source == str(tmp_path / "p.jsonl")
    with pytest.raises(UserError, match="No such data file"):
        load_preference_data(DataConfig(path="missing.jsonl"), base_dir=tmp_path)


# ------------------------------------------------------------------ splits, samples, the Hub


def test_hub_dataset_rows_and_eval_split(monkeypatch):
    # The Hub cannot be reached from tests: a real in-memory Dataset is what datasets.load_dataset would return.
    import datasets

    splits = {
        "train": [{"prompt": f"P{i}", "chosen": "a", "rejected": "b"} for i in range(5)] + [{"prompt": "P"}],
        "test": [{"prompt": "T", "chosen": "a", "rejected": "b"}],
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_list(splits[split]))
    cfg = DataConfig(path="someone/prefs", split="train", eval_split="test", drop_invalid=True)
    data = load_preference_data(cfg)
    assert data.source == "someone/prefs[train]" and len(data.train) == 5 and data.eval == [splits["test"][0]]
    assert data.dropped == 1 and str(data.dropped_problems[0]).startswith("someone/prefs[train] record 6: missing")


def test_eval_fraction_is_deterministic_and_max_examples_caps_train(tmp_path):
    rows = [{"prompt": f"P{i}", "chosen": "a", "rejected": "b"} for i in range(20)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    a, b = prefs(path, eval_fraction=0.25), prefs(path, eval_fraction=0.25)
    assert len(a.eval) == 5 and len(a.train) == 15 and a.eval == b.eval
    assert not {r["prompt"] for r in a.eval} & {r["prompt"] for r in a.train}
    other = load_preference_data(DataConfig(path=str(path), eval_fraction=0.25), seed=7)
    assert other.eval != a.eval
    capped = prefs(path, eval_fraction=0.25, max_examples=4)
    assert len(capped.train) == 4 and capped.eval == a.eval


def test_every_shipped_sample_loads():
    assert load_sft_data(DataConfig(sample="chat_sft.jsonl"), SAMPLES_DIR / "chat_sft.jsonl").format == "chat"
    prefs = load_preference_data(DataConfig(sample="chat_prefs.jsonl"), SAMPLES_DIR / "chat_prefs.jsonl")
    assert prefs.format == "chat-preference"
    concise = load_preference_data(DataConfig(sample="concise_prefs.jsonl"), SAMPLES_DIR / "concise_prefs.jsonl")
    assert concise.format == "prompt-chosen-rejected" and len(concise.train) > 50


def test_offline_hub_name_gives_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        load_preference_data(DataConfig(path="someone/not-cached-prefs"))
    text = e.value.render()
    assert "offline" in text and "use_samples=true" in text and "local" in text


def test_a_hub_eval_split_on_local_data_holds_out_a_fraction_and_says_so(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"P{i}", "chosen": "a", "rejected": "b"} for i in range(30)])
    data = prefs(path, eval_split="test")
    assert len(data.eval) == 3 and len(data.train) == 27
    assert "10% held out" in data.reason and "'test'" in data.reason


@pytest.mark.parametrize("name", ["tiny", "chat-assistant", "concise", "orpo-tight"])
def test_every_recipe_reads_its_samples_offline(name):
    from lowvram.recipe import load_recipe

    recipe, path = load_recipe(name, ["use_samples=true"])
    for stage in recipe.stages():
        loader = load_sft_data if stage == "sft" else load_preference_data
        cfg = getattr(recipe, stage).data
        data = loader(cfg, recipe.sample_file(cfg), base_dir=path.parent, seed=recipe.seed)
        assert data.train and data.dropped == 0
        assert data.eval is None or len(data.eval) >= 1


# ------------------------------------------------------------------ data check: warnings


def check(path: Path, kind: str | None = None, **kw):
    return check_data(DataConfig(path=str(path), **kw), kind)


def warned(report) -> dict[str, list[int | None]]:
    """warning code -> the lines (or record numbers) it names."""
    return {w.code: [loc.line or loc.record for loc in w.locations] for w in report.warnings}


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_each_preference_warning_names_its_lines(tmp_path):
    rows = [
        pair("What is 2+2?", "It is four.", "It is five."),  # 1 fine
        pair("Capital of France?", "Paris.", "paris. "),  # 2 identical (case, space)
        pair("Spell it", "The word is 'necessary'.", "The word is 'neccessary'."),  # 3 nearly identical
        pair("Say hello", "Say hello", "Goodbye."),  # 4 chosen = prompt
        pair("Any answer?", "Yes, here it is.", "..."),  # 5 empty answer
        pair("What is 2+2?", "It is four.", "It is five."),  # 6 duplicate of 1
        pair("What is 2+2?", "It is five.", "It is four."),  # 7 swapped 1
    ]
    report = check(write_jsonl(tmp_path / "p.jsonl", rows))
    assert report.errors == [] and report.rows_valid == 7
    assert warned(report) == {
        "identical_pair": [2],
        "near_identical_pair": [3],
        "chosen_equals_prompt": [4],
        "empty_answer": [5],
        "duplicate_pair": [6],
        "swapped_pair": [7],
    }
    assert report.exit_code() == 0 and report.exit_code(strict=True) == 1


def test_long_answers_are_compared_word_by_word(tmp_path):
    words = [f"w{i}" for i in range(60)]
    one_word_changed = " ".join(words[:30] + ["changed"] + words[31:])
    unrelated = " ".join(f"x{i}" for i in range(60))
    rows = [pair("Q", " ".join(words), one_word_changed), pair("Q", " ".join(words), unrelated)]
    assert warned(check(write_jsonl(tmp_path / "long.jsonl", rows))) == {"near_identical_pair": [1]}


def test_empty_answer_in_an_hh_transcript_is_a_warning_not_an_error(tmp_path):
    rows = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there.", "rejected": "\n\nHuman: Hi\n\nAssistant:"}]
    report = check(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert report.format == "hh-rlhf" and report.errors == [] and warned(report) == {"empty_answer": [1]}


def test_length_bias_the_verbosity_trap(tmp_path):
    padded = [
        pair(f"Q{i}", f"Answer {i}. " + "More detail that pads the reply. " * 3, f"Answer {i}.") for i in range(12)
    ]
    report = check(write_jsonl(tmp_path / "long.jsonl", padded))
    bias = [w for w in report.warnings if w.code == "length_bias"]
    assert len(bias) == 1 and "verbosity trap" in bias[0].message and ">= 75%" in bias[0].message
    assert report.stats["chosen_longer_share"] == 1.0 and report.stats["median_length_ratio"] > 4
    swapped = [pair(r["prompt"], r["rejected"], r["chosen"]) for r in padded]
    shorter = check(write_jsonl(tmp_path / "short.jsonl", swapped))
    assert [w.code for w in shorter.warnings] == ["length_bias"] and "shorter wins" in shorter.warnings[0].message
    balanced = padded[:6] + swapped[6:]
    assert check(write_jsonl(tmp_path / "mixed.jsonl", balanced)).warnings == []


def test_length_bias_thresholds():
    assert length_bias(100, 0.80, 0.20, 1.30) is not None
    assert length_bias(100, 0.80, 0.20, 1.10) is None  # mostly longer, but only slightly: no trap
    assert length_bias(100, 0.60, 0.40, 2.00) is None  # long when longer, but not systematic
    assert length_bias(9, 1.0, 0.0, 3.0) is None  # too few pairs to call it a trend


def test_sft_warnings(tmp_path):
    rows = [
        {"messages": [msg(USER, "Q"), msg(BOT, "A")]},
        {"messages": [msg(USER, "Q2"), msg(BOT, "")]},
        {"messages": [msg(USER, "Q"), msg(BOT, "A")]},
    ]
    report = check(write_jsonl(tmp_path / "chat.jsonl", rows))
    assert report.kind == "sft" and warned(report) == {"empty_answer": [2], "duplicate_example": [3]}


def test_token_budget_without_a_tokenizer_is_labelled_approximate(tmp_path):
    rows = [pair("Q", "short", "short too"), pair("Q", "word " * 200, "no")]
    report = check(write_jsonl(tmp_path / "p.jsonl", rows))
    add_token_budget(report, max_seq_len=100, budget_from="test")
    assert report.tokens.approximate and "approximation" in report.tokens.counted_with
    assert [loc.line for loc in report.tokens.over] == [2]
    assert warned(report)["over_token_budget"] == [2]
    assert "~" in "\n".join(report.lines())


# ------------------------------------------------------------------ data check: the command


def test_data_check_exit_codes_and_json(tmp_path, capsys):
    clean = write_jsonl(tmp_path / "clean.jsonl", [pair("What is 2+2?", "Four.", "Five.")])
    assert main(["data", "check", str(clean)]) == 0
    assert "result    OK" in capsys.readouterr().out
    warn = write_jsonl(tmp_path / "warn.jsonl", [pair("Q", "Same.", "Same.")])
    assert main(["data", "check", str(warn)]) == 0
    assert main(["data", "check", str(warn), "--strict"]) == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", [pair("Q", "A", "B"), "{not json", {"prompt": "Q", "chosen": "A"}])
    capsys.readouterr()
    assert main(["data", "check", str(bad), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["exit_code"] == 1
    rep = out["reports"][0]
    assert rep["format"] == "prompt-chosen-rejected" and rep["rows"] == {"read": 3, "valid": 1, "invalid": 2}
    assert [(e["line"], e["code"]) for e in rep["errors"]] == [(2, "invalid_json"), (3, "missing_field")]
    # usage mistakes: exit 2, one message, no traceback
    assert main(["data", "check", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["data", "check"]) == 2
    assert main(["data", "check", str(clean), "--kind", "sft"]) == 2  # a preference file is no SFT data
    assert main(["data", "check", str(clean), "--recipe", "concise", "--kind", "sft"]) == 2  # no SFT stage
    assert "Traceback" not in capsys.readouterr().err


def test_data_check_with_format_and_kind(tmp_path, capsys):
    path = write_jsonl(tmp_path / "se.jsonl", [{"question": "Q", "response_j": "good", "response_k": "bad"}])
    assert main(["data", "check", str(path), "--format", "ranked-answers", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reports"][0]["reason"].startswith("set by data.format")
    assert main(["data", "check", str(path), "--format", "chatml"]) == 2
    assert "not a format lowvram reads" in capsys.readouterr().err


def test_broken_file_is_a_data_error_with_its_line(tmp_path, capsys):
    path = tmp_path / "b.json"
    path.write_text('[{"prompt": "P", "chosen": "a", "rejected": "b"},\n {"prompt" "P"}]')
    assert main(["data", "check", str(path), "--json"]) == 1
    err = json.loads(capsys.readouterr().out)["reports"][0]["errors"]
    assert [(e["line"], e["code"]) for e in err] == [(2, "unreadable_file")]


def test_data_check_against_a_recipe_counts_tokens_with_the_model_tokenizer(tmp_path, tiny_tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    rows = [
        {"messages": [msg(USER, "What is the capital of France?"), msg(BOT, "Paris.")]},
        {"messages": [msg(USER, "Tell me everything. " * 20), msg(BOT, "The capital of China is Beijing.")]},
        {"messages": [msg(USER, "Hi"), msg(BOT, "Hello.")]},
    ]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    (tmp_path / "r.yaml").write_text(
        "use_samples: false\nmodel:\n  name: builtin:tiny-llama\n"
        "sft:\n  max_seq_len: 64\n  data:\n    path: chat.jsonl\ndpo:\n  enabled: false\n"
    )
    assert main(["data", "check", "--recipe", str(tmp_path / "r.yaml"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["reports"][0]
    budget = rep["token_budget"]
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    want = [len(tok.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in rows]
    assert (
        budget["approximate"] is False and "builtin:tiny-llama's tokenizer and chat template" in budget["counted_with"]
    )
    assert budget["max_seq_len"] == 64 and budget["longest_tokens"] == max(want) > 64
    assert [loc["line"] for loc in budget["over_locations"]] == [i + 1 for i, n in enumerate(want) if n > 64] == [2]
    assert rep["stage"] == "sft" and "set by the recipe" in budget["budget_from"]

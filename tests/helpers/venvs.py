"""A fresh virtual environment in seconds: the test's own packages, minus the ones a test must do without.

    python = venv_without(tmp_path / "env", hide=("xllamacpp",))   # .../env/bin/python: no llama.cpp runtime

`python -m venv --without-pip` makes the environment; one .pth file adds a folder of symlinks to the
running environment's site-packages, less the hidden packages (their modules and .dist-info), so
everything else is importable without reinstalling torch. pip runs there too (its symlink), and installs
into the new environment's own site-packages: a package installed there is really installed, not mocked.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path


def _dist_name(entry: str) -> str:
    """'llama_cpp_python-0.3.36.dist-info' -> 'llama_cpp_python'; a module folder or file -> its name."""
    return re.sub(r"-[^-]*\.(dist|egg)-info$", "", entry).split(".")[0].replace("-", "_").lower()


def venv_without(dest: Path, hide: tuple[str, ...] = ("xllamacpp",)) -> Path:
    """A new environment at `dest` seeing this one's packages except `hide` (module or distribution names)."""
    site = Path(sysconfig.get_paths()["purelib"])
    env = dest / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    # Inside the environment's own folder: libraries that ask whether a module is part of the installation
    # (dill, which datasets uses to hash, pickles modules outside sys.prefix by value) get the usual answer.
    overlay = env / "overlay"
    overlay.mkdir()
    hidden = {h.replace("-", "_").lower() for h in hide}
    for entry in site.iterdir():
        if _dist_name(entry.name) not in hidden:
            (overlay / entry.name).symlink_to(entry)
    python = env / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # addsitedir (not a bare path line) so the overlay's own .pth files run: editable installs among them
    (Path(own) / "_test_overlay.pth").write_text(f"import site; site.addsitedir({str(overlay)!r})\n")
    return python

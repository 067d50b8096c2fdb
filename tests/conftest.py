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


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: without a CUDA device torch can see, they are skipped, saying so."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU; torch {torch.__version__} sees none "
                                   "(on a GPU machine: python scripts/gpu_check.py --tests)")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_simulated_card(monkeypatch):
    """A developer's LOWVRAM_VRAM_GIB / LOWVRAM_GPU must not leak into tests."""
    monkeypatch.delenv("LOWVRAM_VRAM_GIB", raising=False)
    monkeypatch.delenv("LOWVRAM_GPU", raising=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The built-in tiny Llama, built once per test session in a private cache.

    LOWVRAM_TEST_CACHE names a cache folder to reuse across sessions instead (the tiny model is
    rebuilt there only when its recipe version changes): for developers running tests repeatedly.
    """
    reuse = os.environ.get("LOWVRAM_TEST_CACHE")
    cache = Path(reuse) if reuse else tmp_path_factory.mktemp("lowvram-cache")
    old = os.environ.get("LOWVRAM_CACHE")
    os.environ["LOWVRAM_CACHE"] = str(cache)
    from lowvram.tiny import ensure_tiny_model

    path = ensure_tiny_model()
    yield path
    if old is None:
        os.environ.pop("LOWVRAM_CACHE", None)
    else:
        os.environ["LOWVRAM_CACHE"] = old

"""Verification's cost on a shared machine: llama.cpp gets only the cores other processes leave free."""

from __future__ import annotations

import os

import pytest

from lowvram import llamacpp


@pytest.mark.parametrize("load, cores, threads", [(1.0, 2, 2), (0.2, 2, 2), (6.0, 2, 1), (3.0, 16, 14), (40.0, 16, 1)])
def test_llama_cpp_threads_leave_busy_cores_alone(monkeypatch, load, cores, threads):
    """Its threads spin at a barrier after every operation: one descheduled thread stalls them all (8-13x
    slower verification measured on 2 cores under a load of 6, BENCHMARKS.md)."""
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert llamacpp._threads() == threads

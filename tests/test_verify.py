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

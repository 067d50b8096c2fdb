"""`lowvram run` on local model and data makes no network lookup: not DNS, not a connection, not telemetry.

The demo runs in a network namespace with only a loopback device that is down (`unshare -n`), so
nothing could reach the network anyway; to see that nothing even tried, a `sitecustomize` module
records every name lookup and connection attempt Python makes (huggingface_hub, requests, httpx
and urllib3 all resolve names through `socket.getaddrinfo`). Libraries' own switches are removed
from the environment first, as on a user's machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowvram.offline import hub_uses
from lowvram.recipe import load_recipe

GUARD = """
import os, socket

_log = os.environ["LOWVRAM_NET_LOG"]


def _record(what):
    with open(_log, "a") as f:
        f.write(repr(what) + "\\n")


_getaddrinfo = socket.getaddrinfo
_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def getaddrinfo(host, port, *args, **kwargs):
    _record(("getaddrinfo", host, port))
    return _getaddrinfo(host, port, *args, **kwargs)


def _check(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        _record(("connect", address))


def connect(self, address):
    _check(self, address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(self, address)
    return _connect_ex(self, address)


socket.getaddrinfo = getaddrinfo
socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
"""

SWITCHES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK")


def _no_network_prefix() -> list[str]:
    """A command prefix that runs in a fresh network namespace, or skip the test saying why not."""
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is not installed")
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):  # as root; else in a user namespace
        probe = subprocess.run([*prefix, "true"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    pytest.skip(f"cannot create a network namespace here: {probe.stderr.decode().strip()}")


def test_hub_is_allowed_only_for_what_names_it(tmp_path):
    demo, _ = load_recipe("tiny")
    assert hub_uses(demo, demo.model.name) == []
    hub, _ = load_recipe("tiny", ["model.name=someone/some-model"])
    assert hub_uses(hub, hub.model.name) == ["model someone/some-model"]
    data = tmp_path / "sft.jsonl"
    data.write_text("")
    local, _ = load_recipe("tiny", ["use_samples=false", f"sft.data.path={data}", "dpo.data.path=org/prefs"])
    assert hub_uses(local, local.model.name) == ["dpo dataset org/prefs"]


@pytest.mark.slow
def test_demo_run_makes_no_network_lookup(tiny_model_dir, tmp_path):
    prefix = _no_network_prefix()
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log = tmp_path / "net.log"
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    env["PYTHONPATH"] = os.pathsep.join([str(guard), *filter(None, [env.get("PYTHONPATH")])])
    env["LOWVRAM_NET_LOG"] = str(log)
    # the guard itself works: a lookup is recorded (and fails: there is no network in the namespace)
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import socket; socket.getaddrinfo('huggingface.co', 443)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.returncode != 0 and "huggingface.co" in log.read_text()
    log.unlink()

    run = tmp_path / "run"
    res = subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "lowvram",
            "run",
            "tiny",
            "--run-dir",
            str(run),
            "--no-export",
            "sft.max_steps=2",
            "dpo.max_steps=2",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "network: off" in res.stdout
    assert (run / "dpo" / "DONE").is_file()
    attempts = log.read_text().splitlines() if log.exists() else []
    assert attempts == [], attempts
    assert Path(run / "metrics.jsonl").is_file()

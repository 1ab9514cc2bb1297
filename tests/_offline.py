"""Helpers for the integration tests: no network, tiny local models, a subprocess without network."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))


@pytest.fixture
def no_network(monkeypatch):
    """Fail any attempt to open a network connection in this process (and keep the hubs offline)."""
    attempts: list = []

    def refuse(self, address, *a, **k):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network disabled in this test (tried {address!r})")
        return real_connect(self, address, *a, **k)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield attempts
    assert attempts == [], f"a network request was made: {attempts}"


def _unshare_works() -> bool:
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        return subprocess.run([exe, "--net", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


UNSHARE = _unshare_works()


def run_offline(cmd: list[str], cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` with the network unavailable: in a new network namespace (``unshare --net``) where
    possible, always with HF_HUB_OFFLINE=1; PYTHONPATH puts this checkout first."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HYDRA_FULL_ERROR="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python_api"), os.environ.get("PYTHONPATH", "")]))
    full = (["unshare", "--net"] if UNSHARE else []) + cmd
    res = subprocess.run(full, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(full)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res

"""Fixtures for the SGLang HiCache backend's tests: "SGLang processes" built from SGLang's own classes.

Each is a `python -m polarkvd.bench.sglang_rig` process (SGLang's device and host pools, a
`HybridCacheController` and the storage backend SGLang's factory builds: see sglang_rig.py), driven
with JSON commands; the pytest process never imports SGLang. SGLang comes from its own folder
(scripts/setup-sglang.sh: $POLARKV_SGLANG or ~/.cache/polarkvd/sglang), put on the rig's PYTHONPATH
only, or from the environment itself where SGLang is installed normally.
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, clean_env, show_logs_on_failure

MARK = "@@sglang "
SGLANG_DIR = Path(os.environ.get("POLARKV_SGLANG") or Path.home() / ".cache" / "polarkvd" / "sglang")
HAVE_SGLANG = importlib.util.find_spec("sglang") is not None or (SGLANG_DIR / "sglang").is_dir()


@pytest.fixture(scope="session", autouse=True)
def _sglang_installed() -> None:
    if not HAVE_SGLANG:
        pytest.skip(
            f"SGLang is not installed here or in {SGLANG_DIR} "
            "(./scripts/bootstrap.sh --with-sglang installs it: scripts/setup-sglang.sh)"
        )


class RigError(AssertionError):
    """A command the rig answered with an error (SGLang's or the backend's exception)."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(f"{reply.get('type')}: {reply.get('message')}\n{reply.get('trace', '')}")
        self.reply = reply


class Rig:
    """One "SGLang process" (sglang_rig.py), its log kept for assertions and failure reports."""

    def __init__(self, name: str) -> None:
        self.name = name
        path = str(SGLANG_DIR) + (
            os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""
        )
        env = clean_env(PYTHONPATH=path, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", POLARKV_RIG_LOG="DEBUG")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "polarkvd.bench.sglang_rig"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=REPO_ROOT, env=env, start_new_session=True,
        )  # fmt: skip
        self.log: list[str] = []
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(MARK):
                self._replies.put(json.loads(line[len(MARK) :]))
            else:
                self.log.append(line)
        self._replies.put(None)

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"rig {self.name}: no answer in {timeout}s") from None
        if reply is None:
            raise AssertionError(f"rig {self.name} exited ({self.proc.poll()})")
        return reply

    def wait_ready(self, timeout: float = 240.0) -> None:
        assert self._reply(timeout)["event"] == "ready"

    def send(self, op: str, timeout: float = 120.0, **kw: Any) -> dict[str, Any]:
        """A command's answer; RigError when the rig answered with an error."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        reply = self._reply(timeout)
        if reply["event"] == "error":
            raise RigError(reply)
        return reply

    def stack(self, name: str, socket: str | Path, **spec: Any) -> dict[str, Any]:
        """A stack whose backend is polarkvd at `socket` (timeouts short: tests wait for outages)."""
        extra = {"socket": str(socket), "timeout": 5.0, "retry_seconds": 0.5, **spec.pop("extra", {})}
        return self.send("stack", name=name, spec={"extra": extra, **spec})

    def lines(self, text: str, since: int = 0) -> list[str]:
        return [line for line in self.log[since:] if text in line]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit", timeout=30)
            except AssertionError:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def rigs() -> Iterator[collections.OrderedDict[str, Rig]]:
    """Two "SGLang processes", A and B, for the module (each costs 10-20 s to import SGLang)."""
    started = collections.OrderedDict((name, Rig(name)) for name in ("A", "B"))
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(r.wait_ready) for r in started.values()]:
                f.result()
        yield started
    finally:
        for r in started.values():
            r.close()


@pytest.fixture
def a(rigs: collections.OrderedDict[str, Rig], request: pytest.FixtureRequest) -> Rig:
    rig = rigs["A"]
    start = len(rig.log)
    show_logs_on_failure(request.node, "SGLang process A", lambda: "\n".join(rig.log[start:]))
    return rig


@pytest.fixture
def b(rigs: collections.OrderedDict[str, Rig], request: pytest.FixtureRequest) -> Rig:
    rig = rigs["B"]
    start = len(rig.log)
    show_logs_on_failure(request.node, "SGLang process B", lambda: "\n".join(rig.log[start:]))
    return rig


def unique(prefix: str) -> str:
    """A stack name (and seed salt) no other test uses."""
    return f"{prefix}-{time.monotonic_ns()}"

"""Shared fixtures: real daemons as real processes on real sockets, in a private directory per test."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

from polarkvd.client import ControlClient, EngineClient
from polarkvd.config import load_config
from polarkvd.config.machine import resolve
from polarkvd.errors import DaemonUnavailable
from polarkvd.manager import Manager
from polarkvd.tiers.dram import SlabAllocator
from polarkvd.types import Namespace

# Property-based tests (tests/test_engine_model.py, tests/fuzz/): the default run draws the same cases
# every time, so CI never fails on a case that an unrelated change happened to draw; `pytest
# --hypothesis-profile=explore` draws new ones, more of them, and remembers failures in .hypothesis/.
settings.register_profile("polarkvd", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", deadline=None, max_examples=1000, stateful_step_count=80)
settings.load_profile("polarkvd")

#: A small namespace for tests: 4 layers x 2 KV heads x 64 dims x 16 tokens, bf16 = 32 KiB pages.
TEST_NS = Namespace(
    "test-model@0", "bfloat16", "test/v1", num_layers=4, num_kv_heads=2, head_dim=64, page_tokens=16
)


#: The page-key seed of in-process managers (`make_manager`); daemons make their own seed files.
TEST_SEED = bytes(range(32))


def page_bytes_for(key: bytes, size: int) -> np.ndarray:
    """Deterministic page content derived from its key, so any process can check what it reads."""
    seed = int.from_bytes(key[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


@dataclasses.dataclass
class DaemonProc:
    root: Path
    sets: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def engine_socket(self) -> Path:
        return self.root / "run" / "engine.sock"

    @property
    def control_socket(self) -> Path:
        return self.root / "run" / "control.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "daemon.log"

    def start(self, timeout: float = 30.0) -> DaemonProc:
        args = [sys.executable, "-m", "polarkvd", "serve"]
        for key, value in self.sets.items():
            args += ["--set", f"{key}={value}"]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with ControlClient(self.control_socket, timeout=2) as c:
                    c.ping()
                return self
            except DaemonUnavailable:
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not come up in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def control(self) -> ControlClient:
        return ControlClient(self.control_socket, timeout=60)

    def engine(
        self, ns: Namespace = TEST_NS, engine_id: str = "test", lookup_table: bool = True
    ) -> EngineClient:
        return EngineClient(ns, engine_id, self.engine_socket, timeout=60, lookup_table=lookup_table)

    def stats(self) -> dict:
        with self.control() as c:
            return c.stats()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    @property
    def arena_path(self) -> Path:
        """The daemon's shared-memory arena file (named after its engine socket, see daemon.py)."""
        from polarkvd.daemon import Daemon

        return Daemon(resolve(load_config(env={}, overrides=self.sets))).arena_path()


#: Lines of each log a failing test's report shows (see `show_logs_on_failure`).
FAILURE_LOG_LINES = 60


def show_logs_on_failure(node: pytest.Item, title: str, read: Callable[[], str]) -> None:
    """If the test `node` fails, its report ends with the last lines of `read()` (a daemon's or an
    engine's log) under `title`: a CI failure in a multi-process test then says what the other
    processes saw, not only what the test asserted."""
    node.stash.setdefault(_FAILURE_LOGS, []).append((title, read))


_FAILURE_LOGS = pytest.StashKey[list[tuple[str, Callable[[], str]]]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and call.when in ("setup", "call"):
        for title, read in item.stash.get(_FAILURE_LOGS, []):
            try:
                tail = "\n".join(read().splitlines()[-FAILURE_LOG_LINES:])
            except Exception as e:  # noqa: BLE001 - a report never fails for its extras
                tail = f"(could not read: {e!r})"
            report.sections.append((f"{title}, last {FAILURE_LOG_LINES} lines", tail))
    return report


def daemon_sets(root: Path) -> dict[str, str]:
    """The settings of a test daemon living under `root`: small tiers, debug logs, an index saved
    every second and metrics on any free port (daemons run side by side)."""
    return {
        "daemon.runtime_dir": str(root / "run"),
        "daemon.state_dir": str(root / "state"),
        "dram.capacity": "64MiB",
        "dram.slab_bytes": "1MiB",
        "disk.capacity": "256MiB",
        "disk.index_flush_seconds": "1s",
        "daemon.log_level": "debug",
        "metrics.address": "127.0.0.1:0",
    }


def _factory(
    base: Path, node: pytest.Item | None = None
) -> tuple[Callable[..., DaemonProc], Callable[[], None]]:
    """A daemon factory over `base` and the cleanup that SIGKILLs whatever it started; with `node`
    (the test), a failure report of that test shows the daemons' logs."""
    started: list[DaemonProc] = []

    def make(sets: dict[str, str] | None = None, name: str = "d") -> DaemonProc:
        root = base / name
        root.mkdir(exist_ok=True)
        cfg = daemon_sets(root)
        cfg.update(sets or {})
        d = DaemonProc(root, cfg)
        if node is not None:
            show_logs_on_failure(node, f"daemon {name!r} log", d.log)
        started.append(d)
        return d.start()

    def cleanup() -> None:
        for d in started:
            if d.proc is not None and d.proc.poll() is None:
                os.killpg(d.proc.pid, signal.SIGKILL)
                d.proc.wait()
            # A killed daemon cannot unlink its arena: without this every test would leave up to
            # 64 MiB behind in /dev/shm.
            d.arena_path.unlink(missing_ok=True)

    return make, cleanup


@pytest.fixture
def daemon_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator:
    """daemon_factory(**sets) starts a daemon with `--set` overrides (dots as in the config: use a dict)."""
    make, cleanup = _factory(tmp_path, request.node)
    yield make
    cleanup()


@pytest.fixture
def daemon(daemon_factory) -> DaemonProc:
    return daemon_factory()


@pytest.fixture(scope="module")
def module_daemon_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Like `daemon_factory`, but its daemons live for the whole test module (for many cheap cases)."""
    make, cleanup = _factory(tmp_path_factory.mktemp("mod"))
    yield make
    cleanup()


# ---------------------------------------------------------------------------------------- helpers

#: The repository root: `python -c` children run here so `tests.conftest` imports.
REPO_ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child process, without POLARKV_* variables that would change its config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLARKV_")}
    env.update(extra)
    return env


def skip_without_cuda_torch(why_torch: str) -> None:
    """Skip the calling test unless this machine has a usable CUDA device (the daemon's own probe,
    with its reason) and this Python has CUDA torch (`why_torch`: what the test needs it for)."""
    from polarkvd.config import VramConfig
    from polarkvd.tiers.vram import probe

    choice = probe(VramConfig(enabled=True, capacity=64 << 20, slab_bytes=1 << 20))
    if not choice.enabled:
        pytest.skip(f"no usable CUDA device: {choice.reason}")
    try:
        import torch
    except ImportError:
        pytest.skip(f"no torch in this Python: {why_torch}")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `predicate` (which watches another process) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def chain_tokens(seed: int, pages: int, page_tokens: int = TEST_NS.page_tokens) -> list[int]:
    """Token ids of `pages` full pages, distinct per seed (so chains never share a prefix)."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(0, 50_000, pages * page_tokens)]


def store_chain(kv: EngineClient, tokens: Sequence[int]) -> list[bytes]:
    """Store every full page of `tokens` (content from `page_bytes_for`); returns the keys."""
    keys = kv.page_keys(tokens)
    kv.store(keys, [page_bytes_for(k, kv.page_bytes) for k in keys])
    return keys


def bad_pages(kv: EngineClient, keys: Sequence[bytes], views: Sequence[memoryview]) -> list[int]:
    """Indexes of the pages in `views` whose bytes differ from what `page_bytes_for` wrote."""
    return [
        i
        for i, (k, v) in enumerate(zip(keys, views))
        if not np.array_equal(np.frombuffer(v, np.uint8), page_bytes_for(k, kv.page_bytes))
    ]


# ---------------------------------------------------------------------------------------- in-process manager


class FakeClock:
    """An injected clock: tests move time by assignment, never by sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_manager(capacity_pages: int, **overrides: str) -> tuple[Manager, FakeClock]:
    """A Manager over a private bytearray arena (1 MiB slabs), no disk tier, and a fake clock.

    Everything synchronous (attach, reserve, commit, lookup, expire, eviction without disk) runs
    without an event loop, so policy and timing rules are tested in-process and deterministically.
    """
    slab = 1 << 20
    cap = -(-capacity_pages * TEST_NS.page_bytes // slab) * slab
    sets = {"dram.capacity": str(cap), "dram.slab_bytes": str(slab), "disk.enabled": "false", **overrides}
    clock = FakeClock()
    executor = concurrent.futures.ThreadPoolExecutor(1)  # never used without a disk tier: no thread starts
    m = Manager(
        load_config(env={}, overrides=sets),
        memoryview(bytearray(cap)),
        SlabAllocator(cap, slab),
        None,
        executor,
        clock=clock,
        seed=TEST_SEED,  # one seed for every in-process manager: members of a cluster share theirs
    )
    return m, clock


def manager_store(m: Manager, session: Any, keys: list[bytes], parent: bytes | None = None) -> list[int]:
    """Reserve, write page_bytes_for into the arena, commit: what an engine does, in-process."""
    offsets = m.reserve(session, keys, parent)
    for key, off in zip(keys, offsets):
        if off >= 0:
            m.arena[off : off + TEST_NS.page_bytes] = page_bytes_for(key, TEST_NS.page_bytes).tobytes()
    m.commit(session, [key for key, off in zip(keys, offsets) if off >= 0])
    return offsets


# ---------------------------------------------------------------------------------------- engine processes


def engine_worker_main() -> None:
    """Body of an engine process started by `EngineProc`: runs the steps of a JSON spec (argv[1]).

    Every step reports one JSON line on stdout ({"event": ...}), so the test can follow the process
    without sharing memory with it. Steps:
      ["store", tokens]          lookup, then store the missing full pages (content: page_bytes_for)
      ["verify", tokens]         load every full page (retrying while other engines still write them),
                                 compare with page_bytes_for, release
      ["reserve", tokens]        reserve the pages and scribble into the slots, never commit
      ["load", tokens]           load (pin) the pages and keep the lease
      ["wait"]                   block until the test writes a line to stdin
      ["hang"]                   block until killed (or stdin closes)
      ["stream", seed, chains, pages]  store `chains` new chains, reporting each one's keys; stops
                                 quietly when the daemon goes away
    """
    spec = json.loads(sys.argv[1])
    ns = dataclasses.replace(TEST_NS, **spec.get("ns", {}))

    def out(event: str, **kw: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, **kw}) + "\n")
        sys.stdout.flush()

    kv = EngineClient(ns, spec.get("engine_id", "worker"), spec["socket"], timeout=60)
    out("attached", pid=os.getpid())
    for step in spec["steps"]:
        op = step[0]
        if op == "wait":
            sys.stdin.readline()
        elif op == "hang":
            out("hanging")
            sys.stdin.read()
        elif op == "store":
            keys = kv.page_keys(step[1])
            hit = kv.lookup(keys).hits
            r = kv.store(
                keys[hit:],
                [page_bytes_for(k, kv.page_bytes) for k in keys[hit:]],
                parent=keys[hit - 1] if hit else None,
            )
            out("stored", hits=hit, stored=r.stored, existing=r.existing, no_space=r.no_space)
        elif op == "verify":
            keys = kv.page_keys(step[1])
            deadline = time.monotonic() + 20
            while True:
                r = kv.load(keys)
                bad = bad_pages(kv, keys, r.views)
                tiers = [int(t) for t in r.tiers]
                del r.views
                if r.lease is not None:
                    kv.release(r.lease)
                if r.loaded == len(keys) or bad or time.monotonic() > deadline:
                    break
                time.sleep(0.01)  # another engine still holds some of these pages reserved
            out("verified", loaded=r.loaded, bad=bad, tiers=tiers)
        elif op == "reserve":
            keys = kv.page_keys(step[1])
            offsets = kv.reserve(keys)
            for off in offsets:
                if off >= 0:
                    kv.page(off)[:] = b"\xee" * kv.page_bytes  # half-written garbage
            out("reserved", offsets=offsets)
        elif op == "load":
            r = kv.load(kv.page_keys(step[1]))
            out("loaded", loaded=r.loaded, lease=r.lease)
        elif op == "stream":
            _seed, chains, pages = step[1:]
            try:
                for c in range(chains):
                    keys = kv.page_keys(chain_tokens(_seed * 1_000_003 + c, pages))
                    out("chain", keys=[k.hex() for k in keys])  # before the store: it may be cut short
                    kv.store(keys, [page_bytes_for(k, kv.page_bytes) for k in keys])
            except DaemonUnavailable:
                out("daemon_gone")
                return
        else:
            raise ValueError(f"unknown step {op!r}")
    out("done")
    kv.close()


class EngineProc:
    """An engine in its own process (see `engine_worker_main`), followed through its JSON events."""

    def __init__(
        self,
        socket_path: Path,
        steps: list[list[Any]],
        ns: dict[str, Any] | None = None,
        engine_id: str = "worker",
    ) -> None:
        spec = {"socket": str(socket_path), "steps": steps, "ns": ns or {}, "engine_id": engine_id}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.conftest import engine_worker_main; engine_worker_main()", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT, env=clean_env(),
        )  # fmt: skip
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.history: list[dict[str, Any]] = []  # every event so far, in order
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            self.history.append(msg)
            self._events.put(msg)
        self._events.put(None)

    def expect(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """The next event named `event` (earlier events of other names are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"engine process sent no {event!r} event in {timeout}s") from None
            if msg is None:
                self.proc.wait()
                assert self.proc.stderr is not None
                raise AssertionError(
                    f"engine process exited ({self.proc.returncode}) before {event!r}:\n{self.proc.stderr.read().decode()}"
                )
            if msg["event"] == event:
                return msg

    def events(self, event: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Every event named `event` the process sent, once it has exited."""
        self.proc.wait(timeout)
        self._reader.join(timeout)
        return [m for m in self.history if m["event"] == event]

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        assert rc == 0, self.proc.stderr.read().decode() if self.proc.stderr else rc
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def engine_procs() -> Iterator[Callable[..., EngineProc]]:
    """engine_procs(socket, steps, ns=..., engine_id=...) starts an engine process; all are killed at the end."""
    procs: list[EngineProc] = []

    def start(*args: Any, **kw: Any) -> EngineProc:
        p = EngineProc(*args, **kw)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()

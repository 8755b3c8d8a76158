"""A daemon that is absent at start, killed between `batch_exists` and `batch_get_v1`, and restarted:
every call answers misses or hits (never an exception, never None), SGLang's controller keeps
working, one warning per outage, and the backend reconnects by itself."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.sglang.conftest import Rig, unique

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(600)]

WARNING = "polarkvd daemon unreachable"
AGAIN = "is reachable again"


def _all_calls_answer(rig: Rig, name: str, seed: int, pages: int) -> dict[str, object]:
    """Every v1 call and the controller's paths, during whatever state the daemon is in: their
    answers have SGLang's types and lengths (no exception crossed, no None)."""
    out: dict[str, object] = {}
    ex = rig.send("raw", name=name, fn="batch_exists", seed=seed, pages=pages)
    assert ex["type"] == "int" and 0 <= ex["result"] <= pages
    out["exists"] = ex["result"]
    for fn in ("batch_get_v1", "batch_set_v1", "batch_get"):
        res = rig.send("raw", name=name, fn=fn, seed=seed, pages=pages)
        assert res["type"] == "list" and len(res["result"]) == pages, (fn, res)
        assert all(isinstance(v, bool) for v in res["result"]), (fn, res)
        out[fn] = res["ok"]
    read = rig.send("read", name=name, seed=seed, pages=pages)
    assert read["match"]
    out["read"] = read["loaded_tokens"]
    return out


def _no_exceptions_in(rig: Rig, since: int) -> None:
    """Nothing raised inside SGLang's storage threads (the controller logs those with a trace)."""
    bad = [line for line in rig.log[since:] if "Traceback" in line or "failed after" in line]
    assert not bad, bad


def test_daemon_absent_at_start_then_started(daemon_factory, tmp_path: Path, a: Rig) -> None:
    run = tmp_path / "later" / "run"
    socket = run / "engine.sock"  # nothing there yet: SGLang starts anyway
    since = len(a.log)
    name = unique("absent")
    a.stack(name, socket)
    for _ in range(3):
        got = _all_calls_answer(a, name, seed=71, pages=4)
        assert got == {"exists": 0, "batch_get_v1": 0, "batch_set_v1": 0, "batch_get": 0, "read": 0}
        assert a.send("write", name=name, seed=72, pages=4)["stored_tokens"] == 0
    assert len(a.lines(WARNING, since)) == 1, a.lines(WARNING, since)

    d = daemon_factory({"daemon.runtime_dir": str(run)}, name="later")
    assert d.engine_socket == socket
    time.sleep(0.6)  # the backoff (retry_seconds 0.5 in these tests)

    def stored() -> bool:
        return a.send("write", name=name, seed=73, pages=4)["stored_tokens"] == 64

    wait_for(stored, 20, "writes to resume once the daemon is up")
    got = a.send("read", name=name, seed=73, pages=4)
    assert got["loaded_tokens"] == 64 and got["match"]
    assert a.lines(AGAIN, since)
    assert len(a.lines(WARNING, since)) == 1
    _no_exceptions_in(a, since)


def test_daemon_killed_between_exists_and_get_then_restarted(daemon_factory, a: Rig, b: Rig) -> None:
    d = daemon_factory()
    w, r = unique("kw"), unique("kr")
    a.stack(w, d.engine_socket)
    b.stack(r, d.engine_socket)
    since = len(b.log)
    assert a.send("write", name=w, seed=81, pages=6)["stored_tokens"] == 96
    assert b.send("raw", name=r, fn="batch_exists", seed=81, pages=6)["result"] == 6

    d.kill()  # between SGLang's hit query and its transfer
    res = b.send("raw", name=r, fn="batch_get_v1", seed=81, pages=6)
    assert res["type"] == "list" and res["result"] == [False] * 6
    for _ in range(2):  # during the outage: misses of the right types, through every path
        got = _all_calls_answer(b, r, seed=81, pages=6)
        assert got["batch_get_v1"] == got["batch_set_v1"] == got["read"] == 0, got
    assert len(b.lines(WARNING, since)) == 1, b.lines(WARNING, since)

    d.start()  # the same sockets; its DRAM pages died with it
    time.sleep(0.6)

    def stored() -> bool:
        return b.send("write", name=r, seed=82, pages=6)["stored_tokens"] == 96

    wait_for(stored, 20, "writes to resume after the restart")
    got = a.send("read", name=w, seed=82, pages=6)  # A reconnects too, and reads B's pages
    assert got["loaded_tokens"] == 96 and got["match"]
    assert b.lines(AGAIN, since)
    assert len(b.lines(WARNING, since)) == 1
    _no_exceptions_in(b, since)
    # No session, idle or not, still maps the killed daemon's arena (its memory would stay taken).
    old_arena = f"{d.arena_path} (deleted)"
    for rig in (a, b):
        maps = Path(f"/proc/{rig.proc.pid}/maps").read_text()
        assert old_arena not in maps, f"SGLang process {rig.name} still maps the dead daemon's arena"


def test_daemon_restarted_while_idle_serves_the_next_call_at_once(daemon_factory, a: Rig) -> None:
    """A daemon restarted between two requests (no call met the outage): the next write lands whole
    on the first try, with no outage warning: the backend finds its session's socket closed by the
    daemon and attaches again, rather than failing on it and waiting out a backoff."""
    d = daemon_factory()
    name = unique("idle")
    a.stack(name, d.engine_socket)
    assert a.send("write", name=name, seed=91, pages=4)["stored_tokens"] == 64
    since = len(a.log)
    d.stop()
    d.start()  # the same sockets; nothing called in between
    assert a.send("write", name=name, seed=92, pages=4)["stored_tokens"] == 64
    got = a.send("read", name=name, seed=92, pages=4)
    assert got["loaded_tokens"] == 64 and got["match"]
    assert not a.lines(WARNING, since), a.lines(WARNING, since)
    _no_exceptions_in(a, since)

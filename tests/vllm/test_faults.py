"""The daemon is absent, dies, or loses pages: vLLM keeps answering, and answers exactly as without it.

Every engine here runs with vLLM's own prefix cache off, so any hit comes from polarkvd, and the fault
hooks (runner.py) strike between the scheduler's lookup and the worker's load of the same step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.vllm.conftest import BLOCK, DAEMON_SETS, Prompts, Reference, VllmProc, loaded

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

ENGINE = {"max_num_batched_tokens": 256, "enable_prefix_caching": False}
SHORT = 8
PAGE_BYTES = 30 * 2 * 3 * 64 * BLOCK * 4  # SmolLM2-135M fp32: 30 layers x K,V x 3 heads x 64 dims
UNREACHABLE = "polarkvd daemon unreachable"


def reconnected(engine: VllmProc, daemon: Any, tiny: list[int]) -> bool:
    """Run a one-page request until the engine has a session with `daemon` again (it retries on a timer)."""

    def attached() -> bool:
        engine.generate([{"ids": tiny}], 1)
        return len(daemon.stats()["sessions"]) > 0

    return wait_for(attached, timeout=60, what="the engine to reconnect to the daemon")


def test_daemon_absent_then_started_then_killed(
    daemon_factory, vllm_factory, reference: Reference, prompts: Prompts, tmp_path: Path
) -> None:
    socket = tmp_path / "d" / "run" / "engine.sock"  # where daemon_factory(name="d") will listen
    engine = vllm_factory({"socket": str(socket), "retry_seconds": 0.5}, **ENGINE).ready()
    long, doc, tiny = (
        prompts.document(700, seed=3),
        prompts.document(400, seed=4),
        prompts.document(130, seed=5),
    )

    # No daemon: every request is served, cold, with one warning for the whole outage.
    for prompt in (long, doc):
        got = engine.generate([{"ids": prompt}], SHORT)[0]
        assert got["cached"] == 0
        assert got["ids"] == reference.ids(prompt, SHORT)
    assert engine.count(UNREACHABLE) == 1

    # The daemon comes up: the engine reconnects by itself, stores, then hits.
    daemon = daemon_factory(DAEMON_SETS, name="d")
    reconnected(engine, daemon, tiny)
    engine.generate([{"ids": doc}], SHORT)
    got, blocks = loaded(engine, lambda: engine.generate([{"ids": doc}], SHORT)[0])
    assert got["cached"] == 384 and blocks == {"load_blocks": 3, "load_failed_blocks": 0}
    assert got["ids"] == reference.ids(doc, SHORT)

    # SIGKILL between the scheduler's lookup (a hit) and the worker's load: recomputed, same answer.
    engine.hook(kind="kill", pid=daemon.proc.pid)
    got, blocks = loaded(engine, lambda: engine.generate([{"ids": doc}], SHORT)[0])
    assert blocks == {"load_blocks": 0, "load_failed_blocks": 3}
    assert got["ids"] == reference.ids(doc, SHORT)
    # ... and with the daemon gone, the next request is served cold, with one warning for this outage.
    got = engine.generate([{"ids": long}], SHORT)[0]
    assert got["cached"] == 0 and got["ids"] == reference.ids(long, SHORT)
    assert engine.count(UNREACHABLE) == 2

    # Back again (a new arena), then SIGKILL in the middle of a chunked prefill that is storing pages.
    daemon.start()
    reconnected(engine, daemon, tiny)
    engine.generate([{"ids": long}], SHORT, pause_after=1)
    engine.expect("paused")  # the first 256-token chunk is computed and its two pages stored
    assert daemon.stats()["counters"]["stored_pages"] >= 2
    daemon.kill()
    got = engine.resume()[0]
    assert got["ids"] == reference.ids(long, SHORT)
    assert engine.count(UNREACHABLE) == 3
    assert engine.count("Traceback") == 0


def test_load_cut_short_by_eviction_is_recomputed_and_stored_again(
    daemon_factory, vllm_factory, reference: Reference, prompts: Prompts
) -> None:
    daemon = daemon_factory({**DAEMON_SETS, "disk.enabled": "false"}, name="d")
    # This engine copies layer by layer (a load thread, saves in save_kv_layer): the non-default modes.
    connector = {"socket": str(daemon.engine_socket), "load_mode": "layer", "save_mode": "layer"}
    engine = vllm_factory(connector, **ENGINE).ready()
    long = prompts.document(700, seed=6)
    want = reference.ids(long, SHORT)
    assert engine.generate([{"ids": long}], SHORT)[0]["ids"] == want  # stores 5 pages

    # Between lookup (5 pages) and load, evict 3 pages: leaves go first, so pages 3-5 vanish and the
    # daemon returns only pages 1-2. Blocks 3-5 are reported as load errors and vLLM recomputes them.
    engine.hook(kind="evict", control=str(daemon.control_socket), bytes=3 * PAGE_BYTES)
    got, blocks = loaded(engine, lambda: engine.generate([{"ids": long}], SHORT)[0])
    assert got["cached"] == 640  # what the scheduler was promised
    assert blocks == {"load_blocks": 2, "load_failed_blocks": 3}
    assert got["ids"] == want
    assert daemon.stats()["counters"]["load_short_pages"] == 3

    # The recomputed pages were stored again (nothing computed on the failed load was): a full hit.
    got, blocks = loaded(engine, lambda: engine.generate([{"ids": long}], SHORT)[0])
    assert blocks == {"load_blocks": 5, "load_failed_blocks": 0}
    assert got["cached"] == 640 and got["ids"] == want

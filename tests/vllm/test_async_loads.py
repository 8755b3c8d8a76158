"""Asynchronous loads on real vLLM: a hit whose pages are on the disk tier loads beside the model.

vLLM holds the request (WAITING_FOR_REMOTE_KVS) while the connector's background thread has the
daemon promote its pages and copies them into its blocks; every other request goes on computing. The
greedy token ids must equal vLLM's without polarkvd, and a load the daemon cannot finish is recomputed.
"""

from __future__ import annotations

import pytest

from tests.vllm.conftest import BLOCK, DAEMON_SETS, Prompts, Reference, loaded

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

ENGINE = {"max_num_batched_tokens": 1024, "enable_prefix_caching": False}  # every hit is polarkvd's
SHORT = 8


def test_a_disk_hit_loads_while_another_request_computes(
    daemon_factory, vllm_factory, prompts: Prompts, reference: Reference
) -> None:
    daemon = daemon_factory(DAEMON_SETS, name="d")
    engine = vllm_factory({"socket": str(daemon.engine_socket)}, **ENGINE).ready()
    long = prompts.document(700, seed=21)
    other = prompts.document(200, seed=22)
    pages = (len(long) - 1) // BLOCK
    assert engine.generate([{"ids": long}], SHORT)[0]["ids"] == reference.ids(long, SHORT)

    # Only on disk now: the hit needs a promotion, so vLLM loads it asynchronously.
    with daemon.control() as c:
        c.evict("dram", 1 << 30)
    before = engine.stats("scheduler")
    (hit, cold), blocks = loaded(engine, lambda: engine.generate([{"ids": long}, {"ids": other}], SHORT))
    after = engine.stats("scheduler")
    assert after.get("async_loads", 0) - before.get("async_loads", 0) == 1
    assert hit["cached"] == pages * BLOCK
    assert blocks == {"load_blocks": pages, "load_failed_blocks": 0}
    assert engine.stats()["async_load_blocks"] >= pages  # on the background thread
    assert hit["ids"] == reference.ids(long, SHORT) and cold["ids"] == reference.ids(other, SHORT)
    # The other request, added after the hit, was not held by its load: its first token came first.
    assert cold["first_step"] < hit["first_step"]
    assert daemon.stats()["counters"]["loaded_pages_disk"] >= pages

    # Back in DRAM after the promotion: the next hit is a memory copy, loaded in the step.
    before = engine.stats("scheduler")
    got, blocks = loaded(engine, lambda: engine.generate([{"ids": long}], SHORT)[0])
    after = engine.stats("scheduler")
    assert after.get("async_loads", 0) == before.get("async_loads", 0)
    assert after["sync_loads"] == before.get("sync_loads", 0) + 1
    assert blocks == {"load_blocks": pages, "load_failed_blocks": 0} and got["ids"] == reference.ids(
        long, SHORT
    )
    # Every prefill step was timed for the daemon's cost model (the first prompt's, the cold one's).
    assert engine.stats("scheduler")["observed_steps"] >= 2
    assert sum(m["observations"] for m in daemon.stats()["worth"]["models"]) >= 2


def test_a_paced_load_moves_a_page_per_step_while_another_request_computes(
    daemon_factory, vllm_factory, prompts: Prompts, reference: Reference
) -> None:
    """`async_load_step_bytes` below a page: one page per engine step while the model computes the
    other request, so the load takes several batches, waits for steps, and still arrives whole."""
    daemon = daemon_factory(DAEMON_SETS, name="d")
    engine = vllm_factory({"socket": str(daemon.engine_socket), "async_load_step_bytes": 1}, **ENGINE).ready()
    long = prompts.document(900, seed=24)
    other = prompts.document(300, seed=25)
    pages = (len(long) - 1) // BLOCK
    engine.generate([{"ids": long}], SHORT)
    with daemon.control() as c:
        c.evict("dram", 1 << 30)
    loads_before = daemon.stats()["counters"].get("loads", 0)
    before = engine.stats()
    (hit, cold), blocks = loaded(engine, lambda: engine.generate([{"ids": long}, {"ids": other}], SHORT))
    after = engine.stats()
    assert blocks == {"load_blocks": pages, "load_failed_blocks": 0}
    assert hit["ids"] == reference.ids(long, SHORT) and cold["ids"] == reference.ids(other, SHORT)
    # it waited for engine steps between its pages, and asked the daemon page by page meanwhile
    assert after.get("async_load_paced_waits", 0) - before.get("async_load_paced_waits", 0) >= 1
    assert daemon.stats()["counters"].get("loads", 0) - loads_before >= 2
    assert daemon.stats()["tiers"]["dram"]["pinned_pages"] == 0  # each batch's lease released, the last too
    assert cold["first_step"] < hit["first_step"]


def test_an_asynchronous_load_the_daemon_cannot_finish_is_recomputed(
    daemon_factory, vllm_factory, prompts: Prompts, reference: Reference
) -> None:
    daemon = daemon_factory(DAEMON_SETS, name="d")
    engine = vllm_factory({"socket": str(daemon.engine_socket), "retry_seconds": 0.5}, **ENGINE).ready()
    long = prompts.document(600, seed=23)
    pages = (len(long) - 1) // BLOCK
    engine.generate([{"ids": long}], SHORT)
    with daemon.control() as c:
        c.evict("dram", 1 << 30)
    # SIGKILL between the scheduler's lookup (a disk hit) and the background load.
    engine.hook(kind="kill", pid=daemon.proc.pid)
    got, blocks = loaded(engine, lambda: engine.generate([{"ids": long}], SHORT)[0])
    assert blocks == {"load_blocks": 0, "load_failed_blocks": pages}
    assert got["ids"] == reference.ids(long, SHORT)
    assert engine.count("Traceback") == 0

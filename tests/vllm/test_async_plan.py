"""The scheduler side's plan for asynchronous loads, against a real daemon (no engine: imports the
connector only): a hit with pages on disk is answered "load asynchronously" and handed to the worker
in the next step's plan even though the request is not scheduled; a DRAM hit stays in the step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from polarkvd.client import EngineClient

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

connector = pytest.importorskip("polarkvd.connectors.vllm", reason="needs vllm")


def geometry() -> object:
    return connector.Geometry(
        model="smol@x", dtype="float32", layout="vllm-cpu-lbhnc-vec/v1", layer_names=("l0", "l1"),
        num_kv_heads=3, head_dim=64, kv_parts=2, block_size=128, page_blocks=1, block_bytes=196608,
        num_blocks=10, tp_size=1,
    )  # fmt: skip


def empty_step() -> SimpleNamespace:
    """A scheduler output that schedules nothing (the request waits for its load)."""
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set())
    return SimpleNamespace(num_scheduled_tokens={}, scheduled_new_reqs=[], scheduled_cached_reqs=cached)


@pytest.mark.parametrize("async_loads", [True, False])
def test_a_disk_hit_is_loaded_asynchronously_and_planned_at_once(daemon_factory, async_loads: bool) -> None:
    d = daemon_factory()
    g = geometry()
    sched = connector.SchedulerSide(
        g, connector.Options(socket=str(d.engine_socket), async_loads=async_loads)
    )
    tokens = list(range(1000, 1000 + 3 * g.page_tokens + 5))
    req = SimpleNamespace(
        request_id="r",
        cache_salt=None,
        all_token_ids=tokens,
        num_tokens=len(tokens),
        num_prompt_tokens=len(tokens),
    )
    try:
        with EngineClient(g.namespace("", 0), "test", d.engine_socket) as kv:
            keys = kv.page_keys(tokens)[:3]
            kv.store(keys, [bytes(kv.page_bytes)] * 3)
        assert sched.get_num_new_matched_tokens(req, 0) == (3 * g.page_tokens, False)  # DRAM: in the step
        with d.control() as c:
            c.evict("dram", 1 << 30)  # the pages are on disk only now
        assert sched.get_num_new_matched_tokens(req, 0) == (3 * g.page_tokens, async_loads)
        sched.update_state_after_alloc(
            req, SimpleNamespace(get_block_ids=lambda: ([7, 8, 9, 4],)), 3 * g.page_tokens
        )
        meta = sched.build_connector_meta(empty_step())
        if async_loads:  # planned in the very next step, though the request is not scheduled in it
            assert [(s.req_id, s.block_ids, s.background, s.keys) for s in meta.loads] == [
                ("r", [7, 8, 9], True, [keys])
            ]
            assert sched.stats["async_loads"] == 1
            # the worker lost block 8: recomputed from there, and stored again from that page
            sched.update_connector_output(SimpleNamespace(invalid_block_ids={8}, finished_recving={"r"}))
            assert sched._reqs["r"].saved_pages == 1 and not sched._async_inflight
            # vLLM asks again for a request whose asynchronous load failed: it is computed, not loaded
            # again (a dead daemon's table, a corrupt page would fail it over and over)
            assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
        else:  # planned when the request is scheduled, in that step
            assert meta.loads == []
            assert sched.stats.get("async_loads", 0) == 0
    finally:
        sched.close()


def test_prefill_steps_are_timed_for_the_daemons_cost_model(daemon_factory) -> None:
    """Each step that computes enough tokens is reported to the daemon (tokens, the depth that gives the
    same attention work, seconds): what the `cost` policy fits a page's recompute cost from."""
    d = daemon_factory()
    g = geometry()
    sched = connector.SchedulerSide(g, connector.Options(socket=str(d.engine_socket)))
    try:
        step = empty_step()
        step.num_scheduled_tokens = {"a": 256, "b": 1}  # a prefill and a decode
        step.scheduled_new_reqs = [SimpleNamespace(req_id="a", num_computed_tokens=1024, block_ids=None)]
        step.scheduled_cached_reqs.req_ids = ["b"]
        step.scheduled_cached_reqs.num_computed_tokens = [50]
        step.scheduled_cached_reqs.new_block_ids = [None]
        sched.build_connector_meta(step)
        decode = empty_step()
        decode.num_scheduled_tokens = {"b": 1}
        sched.build_connector_meta(decode)  # planned before the first step finished (async scheduling)
        for _ in range(2):
            sched.update_connector_output(SimpleNamespace(invalid_block_ids=set(), finished_recving=None))
        models = d.stats()["worth"]["models"]
        assert [m["observations"] for m in models] == [1]  # the decode step is too small to say much
        assert sched.stats["observed_steps"] == 1
    finally:
        sched.close()

"""Real vLLM across two hosts' daemons, with layer-pipelined loads.

Daemons A and B form a cluster on loopback. An engine attached to A computes a long prompt and a
chat turn; a second engine, attached to B with `load_mode="layer"` (pipelined loads), gets those
prefixes from A over the network — layer by layer, while it computes — then from B's own disk after
an eviction. Its greedy token ids must equal vLLM's without polarkvd every time.
"""

from __future__ import annotations

import socket

import pytest

from polarkvd.cluster.auth import generate, write_key_file
from tests.conftest import wait_for
from tests.vllm.conftest import BLOCK, DAEMON_SETS, Prompts, Reference, loaded

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(900)]

ENGINE = {"max_num_batched_tokens": 256}
SHORT = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fetch_counters(daemon) -> dict[str, int]:
    """The daemon's counters that say why pages did not arrive (for a failure's message)."""
    words = ("fetch", "cluster_", "promotion", "pipelined", "corrupt")
    return {k: v for k, v in daemon.stats()["counters"].items() if any(w in k for w in words) and v}


def test_remote_and_disk_hits_with_pipelined_loads_give_identical_outputs(
    daemon_factory, vllm_factory, prompts: Prompts, reference: Reference, tmp_path
) -> None:
    key = tmp_path / "cluster.key"
    write_key_file(key, generate())
    seed = _free_port()
    common = {
        **DAEMON_SETS,
        "daemon.log_level": "debug",  # a failure report shows the daemons' logs: say everything
        "cluster.enabled": "true",
        "cluster.key_file": str(key),
        "cluster.data_address": "127.0.0.1:0",
        "cluster.seeds": f"127.0.0.1:{seed}",
        "cluster.lookup_timeout": "1s",
    }
    a = daemon_factory(
        {**common, "cluster.node_id": "a", "cluster.gossip_address": f"127.0.0.1:{seed}"}, name="a"
    )
    b = daemon_factory(
        {**common, "cluster.node_id": "b", "cluster.gossip_address": f"127.0.0.1:{_free_port()}"}, name="b"
    )
    first = vllm_factory({"socket": str(a.engine_socket)}, **ENGINE)
    # pipelined loads in the step (asynchronous loads, the default for disk and remote hits, are
    # tests/vllm/test_async_loads.py's)
    second = vllm_factory(
        {"socket": str(b.engine_socket), "load_mode": "layer", "async_loads": False}, **ENGINE
    )
    wait_for(lambda: b.control().cluster()["alive"] == 2, 30, "the daemons to see each other")

    long = prompts.document(700, seed=11)
    chat = prompts.chat(prompts.document(500, seed=12) + prompts.encode("\nSummarise that."))
    first.ready()
    for ids in (long, chat):
        assert first.generate([{"ids": ids}], SHORT)[0]["ids"] == reference.ids(ids, SHORT)
    first.close()

    second.ready()
    for ids in (long, chat):
        pages = (len(ids) - 1) // BLOCK
        got, blocks = loaded(second, lambda ids=ids: second.generate([{"ids": ids}], SHORT)[0])
        assert got["cached"] == pages * BLOCK  # the whole prefix, from A
        assert blocks == {"load_blocks": pages, "load_failed_blocks": 0}, _fetch_counters(b)
        assert got["ids"] == reference.ids(ids, SHORT)
    counters = b.stats()["counters"]
    assert counters["fetched_pages_remote"] >= 5 + (len(chat) - 1) // BLOCK
    assert counters["pipelined_loads"] >= 2

    # From B's disk now: B's DRAM copies demoted, vLLM's own prefix cache emptied by new engine state.
    with b.control() as c:
        c.evict("dram", 1 << 30)
    second.reset_prefix_cache()
    got, blocks = loaded(second, lambda: second.generate([{"ids": long}], SHORT)[0])
    assert blocks == {"load_blocks": 5, "load_failed_blocks": 0}, _fetch_counters(b)
    assert got["ids"] == reference.ids(long, SHORT)
    assert b.stats()["counters"]["loaded_pages_disk"] >= 5

"""Fetch or recompute with a real engine: under the `cost` policy, a hit whose disk pages cost more
to read than to recompute ends at the first of them, and vLLM answers exactly as without polarkvd.

A slow disk is a fault the real disk tier cannot produce on demand: the daemon is told its disk
reads a page at 100 kB/s (`disk.read_gbps`, the operator's pin of the rate the policy decides by),
a minute per SmolLM2 page against well under a second to recompute one on this CPU.
"""

from __future__ import annotations

import pytest

from tests.conftest import wait_for
from tests.vllm.conftest import DAEMON_SETS, Prompts, Reference, loaded

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

ENGINE = {"max_num_batched_tokens": 256, "enable_prefix_caching": False}
SHORT = 8
PAGE_BYTES = 30 * 2 * 3 * 64 * 128 * 4  # SmolLM2-135M fp32: 30 layers x K,V x 3 heads x 64 dims x 128 tokens


def test_a_hit_ends_at_the_first_page_dearer_to_fetch_than_to_recompute(
    daemon_factory, vllm_factory, reference: Reference, prompts: Prompts
) -> None:
    daemon = daemon_factory({**DAEMON_SETS, "disk.read_gbps": "0.0001"}, name="d")
    engine = vllm_factory({"socket": str(daemon.engine_socket)}, **ENGINE).ready()
    long = prompts.document(700, seed=6)
    want = reference.ids(long, SHORT)
    assert engine.generate([{"ids": long}], SHORT)[0]["ids"] == want  # stores 5 pages
    # more prefill steps, for the namespace's recompute fit (it needs 8)
    for seed in (21, 22, 23):
        engine.generate([{"ids": prompts.document(700, seed=seed)}], 1)
    wait_for(lambda: any(m["fitted"] for m in daemon.stats()["worth"]["models"]), timeout=30, what="a fit")

    # Under `lru` (nothing dropped), the least recently used: the long prompt's 3 deepest pages
    # (leaf first) go to disk; then `cost`, live.
    with daemon.control() as c:
        assert c.evict("dram", 3 * PAGE_BYTES) >= 3 * PAGE_BYTES
    wait_for(lambda: daemon.stats()["tiers"]["disk"]["pending_pages"] == 0, what="the disk writes")
    assert daemon.stats()["tiers"]["disk"]["pages"] >= 3
    with daemon.control() as c:
        c.set_knobs({"dram.policy": "cost"})

    got, blocks = loaded(engine, lambda: engine.generate([{"ids": long}], SHORT)[0])
    assert blocks["load_blocks"] == 2  # the two DRAM pages; the engine recomputed from page 3
    assert got["ids"] == want
    assert daemon.stats()["counters"]["recompute_instead_pages"] >= 3

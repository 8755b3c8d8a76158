"""The router finding its engines from the cluster (`polarkvd route --daemon SOCKET`, no --engine):
two real daemons in a cluster, an engine on each host (a small aiohttp OpenAI stand-in whose
"connector" is an `EngineClient` attached to its host's daemon and reporting the URL it serves at,
as the vLLM connector's `engine_url` option does), the router asking only the first daemon."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from polarkvd.route.cost import Policy
from polarkvd.route.daemon import LOCAL, DaemonWhere, host_tiers
from polarkvd.route.prefixes import RouteKeys
from polarkvd.route.server import Router
from tests.cluster.test_daemons import Cluster
from tests.conftest import TEST_NS, chain_tokens, store_chain, wait_for
from tests.route.test_server import FakeEngine, post, serve

PT = TEST_NS.page_tokens


@pytest.fixture
def cluster(daemon_factory, tmp_path: Path) -> Cluster:
    return Cluster.keyed(daemon_factory, tmp_path)


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_engines_of_every_host_are_found_and_each_counts_its_own_hosts_pages(cluster: Cluster) -> None:
    a, b = cluster.add("a"), cluster.add("b")
    cluster.wait_converged(["a", "b"])
    tokens = chain_tokens(5, 8)  # a prompt whose 8 pages only b's DRAM holds

    async def go() -> None:
        ea, eb = FakeEngine("ea"), FakeEngine("eb")
        async with serve(ea.app()) as ua, serve(eb.app()) as ub:
            ka, kb = a.engine(engine_id="ea"), b.engine(engine_id="eb")
            try:
                ka.report_load(0, 0, 0, ua)
                kb.report_load(0, 0, 0, ub)
                store_chain(kb, tokens)
                where = DaemonWhere(str(a.control_socket), TEST_NS.model, "")
                # b publishes its engine in its gossip metadata within a few seconds; a's meta map
                # learns b's pages within milliseconds
                wait_for(
                    lambda: {(f.url, f.node) for f in where.discover()} == {(ua, LOCAL), (ub, "b")},
                    20,
                    "b's engine",
                )
                wait_for(lambda: where(tokens).get("cluster") == {"b": 8 * PT}, 10, "b's pages")
                router = Router(
                    [], None, RouteKeys("fake"), Policy.AFFINITY, where=where, poll_interval=0.2,
                    discover=True, discover_interval=0.2,
                )  # fmt: skip
                async with serve(router.app()) as url, aiohttp.ClientSession() as http:
                    assert {e.url: e.node for e in router.engines} == {ua: LOCAL, ub: "b"}
                    # b's engine has the prompt in its own host's DRAM; a's only from the pool
                    for _ in range(3):
                        status, body = await post(http, url, {"model": "fake", "prompt": tokens})
                        assert status == 200 and body["engine"] == "eb"
                    # a prompt nobody holds: both are candidates (the cost ties, the turn rotates)
                    seen = set()
                    for i in range(4):
                        status, body = await post(
                            http, url, {"model": "fake", "prompt": chain_tokens(50 + i, 2)}
                        )
                        seen.add(body["engine"])
                    assert seen == {"ea", "eb"}
                    # b's engine goes away (its connection to the daemon closes): no longer routed to
                    kb.close()
                    await until(lambda: [e.url for e in router.engines] == [ua], 20, "eb to be dropped")
                    status, body = await post(http, url, {"model": "fake", "prompt": tokens})
                    assert status == 200 and body["engine"] == "ea"
                    async with http.get(url + "/health") as r:
                        assert (await r.json())["engines"] == {ua: True}
            finally:
                ka.close()
                kb.close()

    asyncio.run(go())


def test_each_engines_host_tiers_come_from_its_own_host() -> None:
    answer = {
        "node": "a",
        "here": {"tokens": 64, "l1": 16, "dram": 32, "disk": 16},
        "cluster": {"b": 128, "c": 32},
    }
    assert host_tiers(answer, LOCAL) == {"dram": 48, "disk": 16, "pool": 128}
    assert host_tiers(answer, "a") == host_tiers(answer, LOCAL)
    assert host_tiers(answer, "b") == {"dram": 128, "disk": 0, "pool": 64}
    assert host_tiers(answer, "c") == {"dram": 32, "disk": 0, "pool": 128}
    assert host_tiers(answer, "d") == {"dram": 0, "disk": 0, "pool": 128}  # a member holding none
    assert host_tiers(None, LOCAL) == {"dram": 0, "disk": 0, "pool": 0}  # no answer: nothing known

"""Fetching pages over RDMA: what a user of two hosts with RDMA NICs would notice.

Pages fetched over RDMA are byte-identical to the holder's (whole pages, pages lent to the DMP pool,
layer slices of a pipelined load); an RDMA failure (error completion, a READ that never completes, a
holder's bad answer) costs nothing but a counter: the same pages come over TCP in the same call;
after the back-off RDMA is used again; the holder's pin keeps a page from being evicted while a READ
is in flight, and a pin nobody releases expires; garbage sent to the new ops gets error replies.

There is no RDMA device on these machines, so the device is FAKE (tests/transport/fakeverbs.py):
in-process tests run two real `ClusterPool`s (real peer service over TCP, real managers and arenas)
on one fake fabric that copies READs between their arenas; the daemon tests at the end run real
daemon processes whose `pyverbs` is the fake's cross-process variant (READs with process_vm_readv).
Everything but the READ itself is the real code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from polarkvd.cluster.membership import Member, State
from polarkvd.cluster.pool import ClusterPool
from polarkvd.config import load_config
from polarkvd.errors import ConfigError, PolarKVError
from polarkvd.keys import page_keys
from polarkvd.seed import load_seed_file
from polarkvd.transport import rdma_probe
from polarkvd.transport.peer_client import PeerClient
from polarkvd.transport.peer_server import Reply
from polarkvd.transport.rdma_params import TransportKind
from polarkvd.transport.rdma_probe import TransportChoice
from polarkvd.types import Tier
from tests.conftest import (
    TEST_NS,
    FakeClock,
    bad_pages,
    chain_tokens,
    make_manager,
    manager_store,
    page_bytes_for,
    store_chain,
    wait_for,
)
from tests.transport.fakeverbs import Dev, Fabric, write_fake_pyverbs
from tests.transport.test_rdma import debian_pyverbs_path, needs_device

PB, L, LB = TEST_NS.page_bytes, TEST_NS.num_layers, TEST_NS.layer_bytes
RDMA_CHOICE = TransportChoice(TransportKind.RDMA, "fake device", "auto", "mlx5_0", 1, 0, "InfiniBand")


@pytest.fixture
def fabric(monkeypatch: pytest.MonkeyPatch) -> Fabric:
    """One FAKE fabric both in-process pools open (fakeverbs.py: READs are copies between arenas)."""
    fab = Fabric()
    monkeypatch.setattr(rdma_probe, "import_verbs", lambda path="": fab.verbs)
    return fab


@dataclasses.dataclass
class Pair:
    holder: ClusterPool
    fetcher: ClusterPool
    hm: Any  # the holder's Manager
    fm: Any  # the fetcher's Manager
    session: Any  # an engine session on the holder
    clock: FakeClock
    fabric: Fabric

    def chain(self, seed: int, pages: int) -> list[bytes]:
        """Store a chain of pages on the holder; returns its keys."""
        keys = [
            bytes(k)
            for k in page_keys(self.session.ns.digest, chain_tokens(seed, pages), TEST_NS.page_tokens)
        ]
        manager_store(self.hm, self.session, keys)
        return keys

    @property
    def ns(self) -> bytes:
        return self.session.ns.digest

    def slots(self, n: int, first: int = 0) -> list[memoryview]:
        """Destinations in the fetcher's arena (scribbled over, so stale bytes cannot pass)."""
        views = [self.fm.arena[(first + i) * PB : (first + i + 1) * PB] for i in range(n)]
        for v in views:
            v[:] = b"\xee" * PB
        return views

    def counters(self) -> dict[str, int]:
        return dict(self.fetcher.counters)

    async def call(self, op: str, args: dict[str, Any], **kw: Any) -> Any:
        """A raw request to the holder's peer service, as any peer could send it."""
        client = PeerClient(key=None, timeout=5)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: client.call(self.holder.server.address, op, args, **kw)
            )
        finally:
            client.close()

    async def error(self, op: str, args: dict[str, Any]) -> str:
        with pytest.raises(PolarKVError) as info:
            await self.call(op, args)
        return info.value.code.value


@contextlib.asynccontextmanager
async def pools(
    fabric: Fabric,
    holder_choice: TransportChoice = RDMA_CHOICE,
    fetcher_choice: TransportChoice = RDMA_CHOICE,
    **sets: str,
) -> AsyncIterator[Pair]:
    cfg_sets = {
        "cluster.enabled": "true",
        "cluster.insecure": "true",
        "cluster.data_address": "127.0.0.1:0",
        "cluster.dmp_bytes": "4MiB",
        "cluster.fetch_timeout": "1s",
        "dram.slab_bytes": "1MiB",
        **sets,
    }
    cfg = load_config(env={}, overrides=cfg_sets)
    clock = FakeClock()
    hm, _ = make_manager(64)
    fm, _ = make_manager(64)
    holder = ClusterPool(cfg, hm.peers, None, "h", holder_choice, clock=clock)
    fetcher = ClusterPool(cfg, fm.peers, None, "f", fetcher_choice, clock=clock)
    holder.start()
    fetcher.start()
    meta = {"data": holder.server.address, **holder.gossip_meta()}
    fetcher.on_members([Member("h", "tcp://127.0.0.1:1", 0, State.ALIVE, meta, 0.0)], [])
    try:
        yield Pair(holder, fetcher, hm, fm, hm.attach(TEST_NS, "e"), clock, fabric)
    finally:
        await fetcher.stop()
        await holder.stop()


def same(keys: list[bytes], views: list[memoryview]) -> bool:
    return all(bytes(v) == page_bytes_for(k, PB).tobytes() for k, v in zip(keys, views))


async def settle(pred: Any, what: str, timeout: float = 5.0) -> None:
    """Wait (on the loop) for something another thread finishes: an unpin, a lease expiry."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------- in process


def test_whole_pages_and_lent_pages_arrive_over_rdma_byte_identical(fabric: Fabric) -> None:
    async def run() -> None:
        async with pools(fabric) as p:
            keys = p.chain(1, 6)
            # one more page that lives in the DMP region the holder lends (another member demoted it)
            lent = b"L" * 16
            entry, _ = p.holder.dmp.reserve(lent, p.ns, keys[-1], PB)
            p.holder.dmp.slot_view(entry)[:] = page_bytes_for(lent, PB).tobytes()
            p.holder.dmp.commit(entry)
            views, sums = p.slots(7), []
            got = await p.fetcher.fetch("h", p.ns, [*keys, lent], views, sums=sums)
            assert got == [None, *keys]  # each page's parent: verified
            assert same([*keys, lent], views)
            assert sums == [xxhash.xxh3_64_intdigest(v) for v in views]
            c = p.counters()
            assert (c["cluster_fetched_pages_rdma"], c["cluster_fetched_bytes_rdma"]) == (7, 7 * PB)
            assert c.get("cluster_fetched_pages_tcp", 0) == 0 and p.holder.server.stats["requests"] > 0
            assert p.fabric.reads >= 1
            # the holder let go of the pages once the fetcher unpinned (fire and forget)
            await settle(lambda: not p.holder._leases, "the unpin")
            assert all(p.hm.index.get(k).pins == 0 for k in keys) and entry.pins == 0
            rep = p.fetcher.report()
            assert rep["fetched"]["rdma"] == {"pages": 7, "bytes": 7 * PB} and rep["rdma"]["enabled"]
            assert rep["rdma"]["connected_to"] == ["h"] and p.holder.report()["rdma"]["accepted_from"] == [
                "f"
            ]
            # a key the holder does not have ends the prefix, as over TCP
            views = p.slots(3)
            got = await p.fetcher.fetch("h", p.ns, [keys[0], b"?" * 16, keys[2]], views)
            assert got == [None, False, False] and same(keys[:1], views)

    asyncio.run(run())


def test_a_pipelined_load_brings_layer_slices_over_rdma(fabric: Fabric) -> None:
    """The manager's layer-pipelined load: one `fetch(layers=...)` per layer group, all over RDMA."""

    async def run() -> None:
        async with pools(fabric) as p:
            keys = p.chain(2, 5)
            p.fm.cluster = p.fetcher
            p.fetcher.layer_groups = L  # one layer per group: every slice is its own READ plan
            for k in keys:
                p.fetcher.hints[k] = ("h",)
            session = p.fm.attach(TEST_NS, "engine")
            offsets, tiers, lease, slot = await p.fm.load_pipelined(session, keys)
            assert tiers == [Tier.DMP] * 5 and slot is not None
            await settle(lambda: all(p.fm.index.get(k).state == 1 for k in keys), "every layer")
            assert same(keys, [p.fm.arena[o : o + PB] for o in offsets])
            c = p.counters()
            assert c["cluster_fetched_pages_rdma"] == 5 and c["cluster_fetched_bytes_rdma"] == 5 * PB
            assert c.get("cluster_fetched_bytes_tcp", 0) == 0 and c["fetched_pages_remote"] == 5
            p.fm.release(session, lease)

    asyncio.run(run())


@pytest.mark.parametrize(
    "mode, reason",
    [("fail", "Remote access error"), ("hang", "timed out")],
    ids=["error-completion", "timeout"],
)
def test_an_rdma_failure_fetches_the_same_pages_over_tcp_then_backs_off_then_rdma_again(
    fabric: Fabric, mode: str, reason: str
) -> None:
    async def run() -> None:
        async with pools(fabric, **{"cluster.fetch_timeout": "500ms"}) as p:
            keys = p.chain(3, 4)
            fabric.mode = mode
            views, sums = p.slots(4), []
            got = await p.fetcher.fetch("h", p.ns, keys, views, sums=sums)
            assert got == [None, *keys[:3]] and same(keys, views)  # the caller sees no difference
            assert sums == [xxhash.xxh3_64_intdigest(v) for v in views]  # TCP's, not a mix
            c = p.counters()
            assert c["cluster_rdma_fallbacks"] == 1 and c["cluster_fetched_pages_tcp"] == 4
            assert c.get("cluster_fetched_pages_rdma", 0) == 0
            rep = p.fetcher.report()["rdma"]
            assert reason in rep["last_fallback"] and rep["backoff"]["h"]["failures"] == 1
            assert rep["connected_to"] == []  # the broken queue pair is gone
            # during the back-off: TCP straight away, RDMA is not even tried
            fabric.mode = "execute"
            reads = fabric.reads
            views = p.slots(4)
            assert await p.fetcher.fetch("h", p.ns, keys, views) == [None, *keys[:3]] and same(keys, views)
            assert fabric.reads == reads and p.counters()["cluster_fetched_pages_tcp"] == 8
            # after it: RDMA again, on a new queue pair; success clears the record
            p.clock.now += 31
            views = p.slots(4)
            assert await p.fetcher.fetch("h", p.ns, keys, views) == [None, *keys[:3]] and same(keys, views)
            assert fabric.reads > reads and p.counters()["cluster_fetched_pages_rdma"] == 4
            assert p.fetcher.report()["rdma"]["backoff"] == {}
            await settle(lambda: not p.holder._leases, "the unpins")

    asyncio.run(run())


def test_a_refused_connect_falls_back_to_tcp(fabric: Fabric) -> None:
    """The holder's gossip still says RDMA, but its device is gone: `rdma_connect` is refused."""

    async def run() -> None:
        tcp = TransportChoice(TransportKind.TCP, "configured", "tcp")
        async with pools(fabric, holder_choice=tcp) as p:
            p.fetcher.members["h"].meta["rdma"] = 1  # what it published before
            keys = p.chain(10, 3)
            views = p.slots(3)
            assert await p.fetcher.fetch("h", p.ns, keys, views) == [None, *keys[:2]] and same(keys, views)
            rep = p.fetcher.report()["rdma"]
            assert "rdma_connect to h failed: this member does not offer RDMA" in rep["last_fallback"]
            assert rep["backoff"]["h"]["failures"] == 1 and p.counters()["cluster_fetched_pages_tcp"] == 3

    asyncio.run(run())


def test_a_holder_answer_outside_its_region_is_refused_and_tcp_delivers(fabric: Fabric) -> None:
    async def run() -> None:
        async with pools(fabric) as p:
            keys = p.chain(4, 2)
            p.holder.server.handlers["pin"] = lambda args, payload: Reply(
                {"lease": 1, "epoch": p.holder.rdma_epoch, "pages": [["dram", 1 << 40, PB, 0, None]]}
            )
            views = p.slots(2)
            assert await p.fetcher.fetch("h", p.ns, keys, views) == [None, keys[0]] and same(keys, views)
            assert "outside region 'dram'" in p.fetcher.report()["rdma"]["last_fallback"]
            assert p.fabric.reads == 0  # nothing was READ from where the holder pointed

    asyncio.run(run())


def test_the_holders_pin_keeps_pages_from_eviction_while_a_read_is_in_flight(fabric: Fabric) -> None:
    async def run() -> None:
        async with pools(fabric) as p:
            keys = p.chain(5, 4)
            fabric.mode = "gate"  # READs are posted but do not complete until the gate opens
            views = p.slots(4)
            task = asyncio.create_task(p.fetcher.fetch("h", p.ns, keys, views))
            await settle(lambda: fabric.held, "the READ to be posted")
            # the holder is asked to free everything: the pinned pages stay where the READ reads
            assert p.hm.evict_bytes(Tier.DRAM, 1 << 30) == 0
            assert all(p.hm.index.get(k) is not None for k in keys)
            fabric.gate.set()
            assert await task == [None, *keys[:3]] and same(keys, views)
            await settle(lambda: not p.holder._leases, "the unpin")
            assert p.hm.evict_bytes(Tier.DRAM, 1 << 30) == 4 * PB  # unpinned: evictable again

    asyncio.run(run())


def test_a_pin_nobody_releases_expires_on_its_own(fabric: Fabric) -> None:
    async def run() -> None:
        async with pools(fabric) as p:
            keys = p.chain(6, 3)
            header, _ = await p.call("pin", {"ns": p.ns, "keys": keys, "seconds": 0.05})
            assert [pg[0] for pg in header["pages"]] == ["dram"] * 3 and header["pages"][2][4] == keys[1]
            assert [pg[3] for pg in header["pages"]] == [
                xxhash.xxh3_64_intdigest(page_bytes_for(k, PB)) for k in keys
            ]
            assert p.hm.evict_bytes(Tier.DRAM, 1 << 30) == 0  # pinned
            await settle(lambda: not p.holder._leases, "the lease to expire")
            assert p.holder.counters["cluster_rdma_leases_expired"] == 1
            assert await p.error("unpin", {"lease": header["lease"]}) == "not_found"
            assert p.hm.evict_bytes(Tier.DRAM, 1 << 30) == 3 * PB
            # the lease a holder grants is capped, whatever is asked for
            keys = p.chain(7, 1)
            await p.call("pin", {"ns": p.ns, "keys": keys, "seconds": 1e9})
            lease = next(iter(p.holder._leases.values()))
            assert lease.timer.when() - asyncio.get_running_loop().time() <= p.holder.lease_seconds

    asyncio.run(run())


def test_garbage_to_the_rdma_ops_gets_errors_and_the_holder_keeps_serving(fabric: Fabric) -> None:
    async def run() -> None:
        async with pools(fabric) as p:
            keys = p.chain(8, 2)
            good = p.fetcher.rdma.endpoint().local_params()
            for args in (
                {"from": "x", "params": "garbage"},
                {"from": "x", "params": {**good, "qpn": 1 << 30}},
                {"from": "x", "params": {**good, "gid": b"short"}},
                {"from": "x", "params": {**good, "regions": [["dram", -1, 10, 1]]}},
                {"from": 7, "params": good},
                {"params": good},
            ):
                assert await p.error("rdma_connect", args) == "bad_request", args
            for args in (
                {"ns": p.ns, "keys": "nope"},
                {"ns": p.ns, "keys": [b"short"]},
                {"keys": keys},
                {"ns": p.ns, "keys": keys, "layers": [2, 1, LB]},
                {"ns": p.ns, "keys": keys, "layers": [0, 1, 0]},
                {"ns": p.ns, "keys": keys, "layers": "all"},
                {"ns": p.ns, "keys": keys, "seconds": -1},
                {"ns": p.ns, "keys": keys, "seconds": "soon"},
                {"ns": p.ns, "keys": keys, "seconds": True},
            ):
                assert await p.error("pin", args) == "bad_request", args
            assert await p.error("unpin", {"lease": "x"}) == "bad_request"
            assert await p.error("unpin", {}) == "bad_request"
            assert await p.error("unpin", {"lease": 12345}) == "not_found"
            # layers past the end of a page pin nothing (as `get` sends nothing)
            header, _ = await p.call("pin", {"ns": p.ns, "keys": keys, "layers": [0, L + 1, LB]})
            assert header["pages"] == [] and header["lease"] is None
            assert not p.holder._leases and all(p.hm.index.get(k).pins == 0 for k in keys)
            # still serving, over RDMA, byte-exact
            views = p.slots(2)
            assert await p.fetcher.fetch("h", p.ns, keys, views) == [None, keys[0]] and same(keys, views)
            assert p.counters()["cluster_fetched_pages_rdma"] == 2

    asyncio.run(run())


def test_without_a_usable_device_auto_stays_on_tcp_and_rdma_refuses(fabric: Fabric) -> None:
    fabric.devices = [Dev("mlx5_0", openable=False)]

    async def run() -> None:
        async with pools(fabric) as p:  # both pools asked for RDMA; neither can open the device
            assert p.holder.rdma is None and p.holder.gossip_meta() == {}
            rep = p.fetcher.report()["rdma"]
            assert not rep["enabled"] and "opening the device failed" in rep["reason"]
            keys = p.chain(9, 2)
            assert await p.error("pin", {"ns": p.ns, "keys": keys}) == "unavailable"
            views = p.slots(2)
            assert await p.fetcher.fetch("h", p.ns, keys, views) == [None, keys[0]] and same(keys, views)
            assert p.counters()["cluster_fetched_pages_tcp"] == 2

        strict = dataclasses.replace(RDMA_CHOICE, setting="rdma")
        with pytest.raises(ConfigError, match="cluster.transport"):
            async with pools(fabric, holder_choice=strict):
                pass

    asyncio.run(run())


@pytest.mark.rdma
def test_pools_fetch_whole_pages_and_slices_over_a_real_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same fetches on a real RDMA device (both pools on it, back to back)."""
    needs_device()
    path = debian_pyverbs_path()
    choice = rdma_probe.probe("rdma", pyverbs_path=path)

    async def run() -> None:
        async with pools(
            Fabric(), holder_choice=choice, fetcher_choice=choice, **{"cluster.pyverbs_path": path}
        ) as p:
            keys = p.chain(31, 6)
            views, sums = p.slots(6), []
            assert await p.fetcher.fetch("h", p.ns, keys, views, sums=sums) == [None, *keys[:5]]
            assert same(keys, views) and sums == [xxhash.xxh3_64_intdigest(v) for v in views]
            views = p.slots(6)
            for lo in range(L):
                got = await p.fetcher.fetch(
                    "h", p.ns, keys, [v[lo * LB : (lo + 1) * LB] for v in views], layers=(lo, lo + 1, LB)
                )
                assert got == [None, *keys[:5]]
            assert same(keys, views)
            c = p.counters()
            assert c["cluster_fetched_pages_rdma"] == 12 and c.get("cluster_fetched_pages_tcp", 0) == 0

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------- daemons


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake_rdma(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A FAKE pyverbs package (cross-process; READs with process_vm_readv) and its state directory."""
    root = tmp_path_factory.mktemp("fakepyverbs")
    state = root / "state"
    return write_fake_pyverbs(root / "pkg", state), state


@pytest.fixture(scope="module")
def rdma_daemons(module_daemon_factory, fake_rdma, tmp_path_factory: pytest.TempPathFactory):
    path, state = fake_rdma
    gossip = _free_port()
    seed_file = tmp_path_factory.mktemp("seed") / "page-seed"
    load_seed_file(seed_file)  # insecure members share their page-key seed through one file
    common = {
        "daemon.seed_file": str(seed_file),
        "cluster.enabled": "true",
        "cluster.insecure": "true",
        "cluster.transport": "rdma",  # the fake device must be taken, or the start fails
        "cluster.pyverbs_path": path,
        "cluster.data_address": "127.0.0.1:0",
        "cluster.seeds": f"127.0.0.1:{gossip}",
        "cluster.probe_interval": "200ms",
        "cluster.probe_timeout": "100ms",
        "cluster.lookup_timeout": "1s",
        "cluster.fetch_timeout": "1s",
    }
    a = module_daemon_factory(
        {**common, "cluster.node_id": "a", "cluster.gossip_address": f"127.0.0.1:{gossip}"}, name="a"
    )
    b = module_daemon_factory(
        {**common, "cluster.node_id": "b", "cluster.gossip_address": "127.0.0.1:0"}, name="b"
    )

    def rdma_peers() -> bool:
        with b.control() as c:
            members = {m["node"]: m for m in c.cluster()["members"]}
        return members.get("a", {}).get("state") == "alive" and members["a"]["meta"].get("rdma") == 1

    wait_for(rdma_peers, 20, "b to see a alive, offering RDMA")
    return a, b, state


def _report(d) -> dict:
    with d.control() as c:
        return c.cluster()


@pytest.mark.cluster
def test_daemons_load_pages_over_rdma_whole_and_pipelined(rdma_daemons) -> None:
    a, b, state = rdma_daemons
    (state / "mode").write_text("execute")
    assert "transport rdma (cluster.transport = rdma): fake_roce0 port 1 active" in a.log()
    with a.engine() as kv:
        keys = store_chain(kv, chain_tokens(21, 6))
        more = store_chain(kv, chain_tokens(22, 5))
    before = _report(b)["fetched"]
    with b.engine() as kv:
        wait_for(lambda: kv.lookup(keys).hits == len(keys), 10, "b to find a's prefix")
        res = kv.load(keys)
        assert res.loaded == len(keys) and set(res.tiers) == {Tier.DMP}
        assert bad_pages(kv, keys, res.views) == []
        kv.release(res.lease)
        wait_for(lambda: kv.lookup(more).hits == len(more), 10, "b to find the second prefix")
        res = kv.load(more, pipelined=True)
        res.wait_layers(L, timeout=10)
        assert bad_pages(kv, more, res.views) == []
        kv.release(res.lease)
    rep = _report(b)
    fetched = rep["fetched"]
    assert fetched["rdma"]["pages"] - before["rdma"]["pages"] == 11
    assert fetched["rdma"]["bytes"] - before["rdma"]["bytes"] == 11 * PB
    assert fetched["tcp"] == before["tcp"] and rep["rdma"]["connected_to"] == ["a"]
    assert rep["page_transport"]["kind"] == "rdma"
    wait_for(lambda: _report(a)["rdma"]["leases"] == 0, 10, "a's leases to be released")
    text = _scrape(b)
    assert (
        f'polarkv_cluster_fetched_pages_total{{transport="rdma"}} {float(fetched["rdma"]["pages"])}' in text
    )
    assert (
        f'polarkv_cluster_fetched_bytes_total{{transport="rdma"}} {float(fetched["rdma"]["bytes"])}' in text
    )


def _scrape(d) -> str:
    url = next(x.split("metrics_url=")[1].split()[0] for x in d.log().splitlines() if "metrics_url=" in x)
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


@pytest.mark.cluster
def test_daemons_fall_back_to_tcp_after_an_error_completion(rdma_daemons) -> None:
    a, b, state = rdma_daemons
    with a.engine() as kv:
        keys = store_chain(kv, chain_tokens(23, 4))
    before = _report(b)
    (state / f"mode-{b.proc.pid}").write_text("fail")  # b's READs end in error completions
    try:
        with b.engine() as kv:
            wait_for(lambda: kv.lookup(keys).hits == len(keys), 10, "b to find a's prefix")
            res = kv.load(keys)
            assert res.loaded == len(keys) and bad_pages(kv, keys, res.views) == []
            kv.release(res.lease)
    finally:
        (state / f"mode-{b.proc.pid}").unlink()
    rep = _report(b)
    assert rep["fetched"]["tcp"]["pages"] - before["fetched"]["tcp"]["pages"] == 4
    assert rep["rdma"]["fallbacks"] == before["rdma"]["fallbacks"] + 1
    assert (
        "Remote access error" in rep["rdma"]["last_fallback"] and rep["rdma"]["backoff"]["a"]["failures"] == 1
    )
    assert b.stats()["counters"]["cluster_rdma_fallbacks"] >= 1


@pytest.mark.cluster
def test_garbage_to_a_daemons_rdma_ops_gets_errors(rdma_daemons) -> None:
    a, _, _ = rdma_daemons
    addr = _report(a)["data_address"]
    with a.engine() as kv:
        keys = store_chain(kv, chain_tokens(24, 2))
        ns = kv.ns_digest
    with PeerClient(key=None, timeout=5) as client:
        for op, args in (
            ("rdma_connect", {"from": "x", "params": {"v": 1, "gid": 3}}),
            ("rdma_connect", {"from": "x"}),
            ("pin", {"ns": ns, "keys": keys, "layers": [1, 0, 5]}),
            ("pin", {"ns": "x", "keys": keys}),
            ("unpin", {"lease": [1]}),
        ):
            with pytest.raises(PolarKVError) as info:
                client.call(addr, op, args)
            assert info.value.code.value == "bad_request", (op, args)
        header, _ = client.call(addr, "pin", {"ns": ns, "keys": keys})
        assert len(header["pages"]) == 2
        assert client.call(addr, "unpin", {"lease": header["lease"]})[0] == {"released": 2}
    assert a.proc.poll() is None


@pytest.mark.cluster
def test_a_daemon_on_rdma_stops_cleanly(daemon_factory, fake_rdma) -> None:
    """The device goes before the arena and the DMP region it registered: a clean exit, no traceback."""
    path, _ = fake_rdma
    d = daemon_factory(
        {
            "cluster.enabled": "true",
            "cluster.insecure": "true",
            "cluster.transport": "auto",
            "cluster.pyverbs_path": path,
            "cluster.node_id": "solo",
            "cluster.gossip_address": "127.0.0.1:0",
            "cluster.data_address": "127.0.0.1:0",
            "cluster.dmp_bytes": "4MiB",
        }
    )
    rep = _report(d)
    assert rep["rdma"]["enabled"] and set(rep["rdma"]["regions"]) == {"dram", "dmp"}
    # no L1 on this host: GPUDirect says why, and its counters are there (zero) for scripts
    assert rep["rdma"]["vram"] == {"registered": False, "reason": "no L1 pool"}
    assert rep["vram"]["served"]["rdma"] == {"pages": 0, "bytes": 0} and rep["vram"]["landing_fallbacks"] == 0
    assert d.stop() == 0
    assert "Traceback" not in d.log() and "polarkvd stopped" in d.log()

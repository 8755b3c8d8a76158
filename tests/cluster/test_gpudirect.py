"""L1 pages in the cluster, and GPUDirect RDMA: what a user of two GPU hosts would notice.

L1 (VRAM) pages are announced to the meta map with their tier and stay found when they move down to
DRAM; a peer gets the right bytes of an L1 page over TCP (the holder moves it to DRAM first) and over
RDMA straight from the holder's pool (region "vram"), and a pinned L1 page does not move while a
peer's lease holds it; an engine attached with L1 gets remote pages READ straight into L1 (tier VRAM
in the load reply), verified; an RDMA failure brings the same pages into DRAM over TCP in the same
load; a pool that cannot be exported as a dma-buf leaves L1 working, unregistered, with the reason
in the log and in `status`.

STAND-INS, clearly not the real things (there is no GPU and no RDMA device on these machines):
- the L1 pool is a real `VramPool` over `FakeCuda` (tests/tiers/test_vram.py): its "device memory"
  is host memory and its copies are memmove;
- the RDMA device is `tests/transport/fakeverbs.py`'s in-process `Fabric(dmabuf=True)`: READs are
  copies between registered buffers, and a dma-buf region (`DmaBufMR`, iova = offset as in pyverbs
  44) is the fake pool's host memory, named by a fake dma-buf fd (`fake_dmabuf`).
Everything else is the real code: two `ClusterPool`s with real managers, arenas and peer services
talking over TCP. What CUDA and a NIC do with a real dma-buf is tested where they exist
(tests/tiers/test_vram_gpu.py, tests/transport/test_rdma.py `-m "rdma and gpu"`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import xxhash

from polarkvd.cluster.membership import Member, State
from polarkvd.cluster.pool import ClusterPool
from polarkvd.config import load_config
from polarkvd.index import READY, READY_VRAM
from polarkvd.keys import page_keys
from polarkvd.transport import rdma_probe
from polarkvd.transport.peer_server import Reply
from polarkvd.transport.rdma_params import TransportKind
from polarkvd.transport.rdma_probe import TransportChoice
from polarkvd.types import Tier
from tests.cluster.test_rdma_fetch import RDMA_CHOICE, settle
from tests.conftest import TEST_NS, chain_tokens, page_bytes_for
from tests.test_manager_vram import L1
from tests.transport.fakeverbs import Fabric, fake_dmabuf

PB, L, LB = TEST_NS.page_bytes, TEST_NS.num_layers, TEST_NS.layer_bytes
TCP_CHOICE = TransportChoice(TransportKind.TCP, "configured", "tcp")


@pytest.fixture
def fabric(monkeypatch: pytest.MonkeyPatch) -> Fabric:
    """One FAKE fabric with dma-buf registration, opened by both in-process pools."""
    fab = Fabric(dmabuf=True)
    monkeypatch.setattr(rdma_probe, "import_verbs", lambda path="": fab.verbs)
    return fab


@dataclasses.dataclass
class Pair:
    holder: ClusterPool
    fetcher: ClusterPool
    h: L1  # the holder's manager, L1 pool (FakeCuda) and arena
    f: L1
    fabric: Fabric

    @property
    def hm(self) -> Any:
        return self.h.m

    @property
    def fm(self) -> Any:
        return self.f.m

    def keys(self, seed: int, pages: int) -> list[bytes]:
        digest = namespace(self.hm)
        return [bytes(k) for k in page_keys(digest, chain_tokens(seed, pages), TEST_NS.page_tokens)]

    def store_l1(self, seed: int, pages: int) -> list[bytes]:
        """An L1 engine on the holder stores a chain: every page in the holder's pool."""
        keys = self.keys(seed, pages)
        assert self.h.store(self.hm.attach(TEST_NS, "gpu", vram=True), keys) == [Tier.VRAM] * pages
        return keys

    def store_dram(self, seed: int, pages: int) -> list[bytes]:
        keys = self.keys(seed, pages)
        assert self.h.store(self.hm.attach(TEST_NS, "cpu"), keys) == [Tier.DRAM] * pages
        return keys

    def slots(self, n: int) -> list[memoryview]:
        views = [self.fm.arena[i * PB : (i + 1) * PB] for i in range(n)]
        for v in views:
            v[:] = b"\xee" * PB
        return views

    def c(self, pool: ClusterPool) -> dict[str, int]:
        return dict(pool.counters)


def namespace(m: Any) -> bytes:
    return next(iter(m.namespaces.values())).digest


def same(keys: list[bytes], chunks: list[bytes | memoryview]) -> bool:
    return all(bytes(v) == page_bytes_for(k, PB).tobytes() for k, v in zip(keys, chunks, strict=True))


def pool_page(t: L1, offset: int) -> bytes:
    return ctypes.string_at(t.pool.base + offset, PB)


def exporting(t: L1) -> L1:
    """The FakeCuda pool exports a FAKE dma-buf of its host memory (fakeverbs.fake_dmabuf)."""
    t.api.dmabuf_export = fake_dmabuf
    return t


@contextlib.asynccontextmanager
async def pools(
    fabric: Fabric,
    holder: L1 | None = None,
    fetcher: L1 | None = None,
    holder_choice: TransportChoice = RDMA_CHOICE,
    fetcher_choice: TransportChoice = RDMA_CHOICE,
) -> AsyncIterator[Pair]:
    cfg = load_config(
        env={},
        overrides={
            "cluster.enabled": "true",
            "cluster.insecure": "true",
            "cluster.data_address": "127.0.0.1:0",
            "cluster.fetch_timeout": "1s",
            "dram.slab_bytes": "1MiB",
        },
    )
    # the pools stay below vram.high_watermark: nothing moves unless a test moves it
    h = holder if holder is not None else exporting(L1(pool_slabs=2))
    f = fetcher if fetcher is not None else exporting(L1(pool_slabs=2))
    hp = ClusterPool(cfg, h.m.peers, None, "h", holder_choice)
    fp = ClusterPool(cfg, f.m.peers, None, "f", fetcher_choice)
    h.m.cluster, f.m.cluster = hp, fp
    h.m.attach(TEST_NS, "first")  # the namespace is known on both sides
    f.m.attach(TEST_NS, "first")
    hp.start()
    fp.start()
    # each knows the other: announcements reach their owners on either side
    fp.on_members([Member("h", "tcp://127.0.0.1:1", 0, State.ALIVE, {"data": hp.server.address, **hp.gossip_meta()}, 0.0)], [])  # fmt: skip
    hp.on_members([Member("f", "tcp://127.0.0.1:2", 0, State.ALIVE, {"data": fp.server.address, **fp.gossip_meta()}, 0.0)], [])  # fmt: skip
    try:
        yield Pair(hp, fp, h, f, fabric)
    finally:
        await fp.stop()
        await hp.stop()


def owner_tier(p: Pair, key: bytes, node: str = "h") -> int | None:
    """The tier the key's owner (whichever side it is) records for `node`'s copy."""
    for pool in (p.holder, p.fetcher):
        rec = pool.metamap._records.get(key)
        if rec is not None:
            copies = rec if isinstance(rec, tuple) else (rec,)
            for c in copies:
                if c.node == node:
                    return c.tier
    return None


# ---------------------------------------------------------------------------------------------- announcements


def test_l1_pages_are_announced_with_their_tier_and_stay_found_when_they_move_to_dram(fabric: Fabric) -> None:
    async def run() -> None:
        async with pools(fabric, holder_choice=TCP_CHOICE, fetcher_choice=TCP_CHOICE) as p:
            keys = p.store_l1(1, 6)
            await settle(lambda: all(owner_tier(p, k) == Tier.VRAM for k in keys), "L1 announcements")
            assert await p.fetcher.locate(keys) == [("h",)] * 6  # a peer finds them: a hit, not a miss
            assert await p.hm.demote_vram(everything=True) == 6
            # one tier down, still the holder's: never withdrawn on the way
            await settle(lambda: all(owner_tier(p, k) == Tier.DRAM for k in keys), "DRAM announcements")
            assert await p.fetcher.locate(keys) == [("h",)] * 6
            # and a page that leaves the holder altogether is withdrawn
            assert p.hm.evict_bytes(Tier.DRAM, PB) == PB
            await settle(lambda: owner_tier(p, keys[-1]) is None, "the withdrawal")
            assert await p.fetcher.locate(keys) == [("h",)] * 5

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------- serving L1 pages


def test_a_peer_gets_l1_pages_over_tcp_through_dram_except_one_an_engine_is_reading(fabric: Fabric) -> None:
    async def run() -> None:
        async with pools(fabric, holder_choice=TCP_CHOICE, fetcher_choice=TCP_CHOICE) as p:
            keys = p.store_l1(2, 5)
            # an L1 engine on the holder is reading page 3: it cannot move, so the peer gets 0..2
            gpu = p.hm.attach(TEST_NS, "reader", vram=True)
            _, tiers, lease = await p.hm.load(gpu, keys[3:4])
            assert tiers == [Tier.VRAM]
            views = p.slots(5)
            got = await p.fetcher.fetch("h", namespace(p.hm), keys, views)
            assert got == [None, *keys[:2], False, False] and same(keys[:3], views[:3])
            assert [p.hm.index.get(k).state for k in keys] == [READY] * 3 + [READY_VRAM] * 2
            c = p.c(p.holder)
            assert c["cluster_served_pages_vram_tcp"] == 3 and c["demoted_pages_vram_for_peers"] == 3
            assert p.holder.report()["vram"]["served"]["tcp"] == {"pages": 3, "bytes": 3 * PB}
            # released: the rest comes too, byte-exact
            p.hm.release(gpu, lease)
            views = p.slots(5)
            assert await p.fetcher.fetch("h", namespace(p.hm), keys, views) == [None, *keys[:4]]
            assert same(keys, views) and p.c(p.holder)["cluster_served_pages_vram_tcp"] == 5

    asyncio.run(run())


def test_a_peer_reads_l1_pages_over_rdma_from_region_vram_in_place(fabric: Fabric) -> None:
    async def run() -> None:
        async with pools(fabric) as p:
            assert p.holder.report()["rdma"]["vram"] == {"registered": True, "reason": "registered"}
            assert set(p.holder.rdma_report()["regions"]) == {"dram", "vram"}
            keys = p.store_l1(3, 4)
            views, sums = p.slots(4), []
            got = await p.fetcher.fetch("h", namespace(p.hm), keys, views, sums=sums)
            assert got == [None, *keys[:3]] and same(keys, views)
            assert sums == [xxhash.xxh3_64_intdigest(v) for v in views]
            assert all(p.hm.index.get(k).state == READY_VRAM for k in keys)  # read in place: not moved
            assert fabric.dmabuf_reads >= 1
            c = p.c(p.holder)
            assert c["cluster_served_pages_vram_rdma"] == 4 and c.get("demoted_pages_vram_for_peers", 0) == 0
            assert c["cluster_vram_verify_bytes"] == 4 * PB  # the holder hashed them through staging, once
            assert p.c(p.fetcher)["cluster_fetched_pages_rdma"] == 4
            await settle(lambda: not p.holder._leases, "the unpin")
            views = p.slots(4)
            assert await p.fetcher.fetch("h", namespace(p.hm), keys, views) == [None, *keys[:3]]
            assert same(keys, views) and p.c(p.holder)["cluster_vram_verify_bytes"] == 4 * PB  # sums kept

    asyncio.run(run())


def test_a_pipelined_load_reads_layer_slices_of_l1_pages_from_region_vram(fabric: Fabric) -> None:
    async def run() -> None:
        async with pools(fabric) as p:
            keys = p.store_l1(4, 3)
            p.fetcher.layer_groups = L  # one layer per group: each slice its own READ
            for k in keys:
                p.fetcher.hints[k] = ("h",)
            s = p.fm.attach(TEST_NS, "engine")
            offsets, tiers, lease, slot = await p.fm.load_pipelined(s, keys)
            assert tiers == [Tier.DMP] * 3 and slot is not None
            await settle(lambda: all(p.fm.index.get(k).state == READY for k in keys), "every layer")
            assert same(keys, [p.fm.arena[o : o + PB] for o in offsets])
            assert p.c(p.fetcher)["cluster_fetched_pages_rdma"] == 3
            assert all(p.hm.index.get(k).state == READY_VRAM for k in keys)
            p.fm.release(s, lease)

    asyncio.run(run())


def test_a_peers_pin_keeps_l1_pages_from_moving_until_released(fabric: Fabric) -> None:
    async def run() -> None:
        async with pools(fabric) as p:
            keys = p.store_l1(5, 3)
            header, _ = await asyncio.get_running_loop().run_in_executor(
                None, lambda: p.fetcher.client.call(p.holder.server.address, "pin", {"ns": namespace(p.hm), "keys": keys})
            )  # fmt: skip
            pages = header["pages"]
            assert [pg[0] for pg in pages] == ["vram"] * 3
            assert [pg[1] for pg in pages] == [p.hm.index.get(k).offset for k in keys]  # pool offsets
            assert [pg[3] for pg in pages] == [xxhash.xxh3_64_intdigest(page_bytes_for(k, PB)) for k in keys]
            assert await p.hm.demote_vram(everything=True) == 0  # leased: nothing moves
            assert all(p.hm.index.get(k).state == READY_VRAM for k in keys)
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: p.fetcher.client.call(p.holder.server.address, "unpin", {"lease": header["lease"]})
            )  # fmt: skip
            assert await p.hm.demote_vram(everything=True) == 3

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------- fetching into L1


def test_an_l1_engine_gets_remote_pages_read_straight_into_l1(fabric: Fabric) -> None:
    async def run() -> None:
        async with pools(fabric) as p:
            keys = p.store_dram(6, 5)
            for k in keys:
                p.fetcher.hints[k] = ("h",)
            gpu = p.fm.attach(TEST_NS, "gpu", vram=True)
            offsets, tiers, lease = await p.fm.load(gpu, keys)
            assert tiers == [Tier.VRAM] * 5  # the engine copies them GPU to GPU
            assert [pool_page(p.f, o) for o in offsets] == [page_bytes_for(k, PB).tobytes() for k in keys]
            assert all(p.fm.index.get(k).state == READY_VRAM for k in keys)
            assert p.fm.allocator.used_bytes == 0  # nothing went through DRAM
            page = p.fm.index.get(keys[0])
            assert page.checksum == xxhash.xxh3_64_intdigest(page_bytes_for(keys[0], PB))  # verified, kept
            c = p.c(p.fetcher)
            assert c["cluster_fetched_pages_vram_rdma"] == 5 and c["fetched_pages_vram"] == 5
            assert c["cluster_vram_verify_bytes"] == 5 * PB and c["loaded_pages_remote"] == 5
            assert p.fetcher.report()["vram"]["fetched"]["rdma"] == {"pages": 5, "bytes": 5 * PB}
            p.fm.release(gpu, lease)
            # the fetcher now holds them in L1 and says so
            await settle(lambda: all(owner_tier(p, k, "f") == Tier.VRAM for k in keys), "announcements")
            # an engine without L1 on the fetcher still loads them (through DRAM)
            cpu = p.fm.attach(TEST_NS, "cpu")
            offsets, tiers, lease = await p.fm.load(cpu, keys)
            assert tiers == [Tier.DRAM] * 5 and same(keys, [p.fm.arena[o : o + PB] for o in offsets])
            p.fm.release(cpu, lease)

    asyncio.run(run())


def test_a_full_pool_lands_the_rest_in_dram_in_the_same_load(fabric: Fabric) -> None:
    async def run() -> None:
        f = exporting(L1(pool_slabs=1, **{"vram.high_watermark": "1.0", "vram.low_watermark": "1.0"}))
        async with pools(fabric, fetcher=f) as p:
            local = p.keys(70, 30)
            p.f.store(p.fm.attach(TEST_NS, "local", vram=True), local)  # 30 of the pool's 32 slots
            keys = p.store_dram(7, 4)
            for k in keys:
                p.fetcher.hints[k] = ("h",)
            gpu = p.fm.attach(TEST_NS, "gpu", vram=True)
            offsets, tiers, lease = await p.fm.load(gpu, keys)
            assert tiers == [Tier.VRAM] * 2 + [Tier.DMP] * 2
            assert [pool_page(p.f, o) for o in offsets[:2]] == [
                page_bytes_for(k, PB).tobytes() for k in keys[:2]
            ]
            assert same(keys[2:], [p.fm.arena[o : o + PB] for o in offsets[2:]])
            p.fm.release(gpu, lease)

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["fail", "hang"], ids=["error-completion", "timeout"])
def test_an_rdma_failure_into_l1_brings_the_same_pages_into_dram_over_tcp(fabric: Fabric, mode: str) -> None:
    async def run() -> None:
        async with pools(fabric) as p:
            keys = p.store_dram(8, 4)
            for k in keys:
                p.fetcher.hints[k] = ("h",)
            fabric.mode = mode
            gpu = p.fm.attach(TEST_NS, "gpu", vram=True)
            offsets, tiers, lease = await p.fm.load(gpu, keys)
            assert tiers == [Tier.DMP] * 4  # in the arena: the engine copies from there
            assert same(keys, [p.fm.arena[o : o + PB] for o in offsets])
            assert len(p.f.pool.slots) == 0  # the L1 slots were given back
            c = p.c(p.fetcher)
            assert c["cluster_rdma_fallbacks"] == 1 and c["cluster_vram_landing_fallbacks"] == 1
            assert c["cluster_fetched_pages_tcp"] == 4 and c["fetch_vram_to_dram_pages"] == 4
            assert c.get("cluster_fetched_pages_vram_rdma", 0) == 0
            p.fm.release(gpu, lease)

    asyncio.run(run())


def test_bytes_that_fail_their_checksum_in_l1_are_never_used(fabric: Fabric) -> None:
    """The holder's checksum is wrong (as if its page had rotted): the READ into L1 fails
    verification, TCP into DRAM fails it too, the engine gets nothing and recomputes."""

    async def run() -> None:
        async with pools(fabric) as p:
            keys = p.store_dram(9, 2)
            for k in keys:
                p.hm.index.get(k).checksum = 12345
                p.fetcher.hints[k] = ("h",)
            gpu = p.fm.attach(TEST_NS, "gpu", vram=True)
            offsets, tiers, lease = await p.fm.load(gpu, keys)
            assert offsets == [] and lease is None
            assert all(p.fm.index.get(k) is None for k in keys)
            assert len(p.f.pool.slots) == 0 and p.fm.allocator.used_bytes == 0
            assert "failed its checksum" in p.fetcher.report()["rdma"]["last_fallback"]

    asyncio.run(run())


def test_a_holder_answer_naming_a_vram_region_it_never_registered_is_refused(fabric: Fabric) -> None:
    async def run() -> None:
        h = L1(pool_slabs=2)  # no dma-buf export: region "vram" is not registered
        async with pools(fabric, holder=h) as p:
            keys = p.store_dram(10, 2)
            p.holder.server.handlers["pin"] = lambda args, payload: Reply(
                {"lease": 1, "epoch": p.holder.rdma_epoch, "pages": [["vram", 0, PB, 0, None]] * 2}
            )
            views = p.slots(2)
            assert await p.fetcher.fetch("h", namespace(p.hm), keys, views) == [None, keys[0]]
            assert same(keys, views)  # over TCP
            assert "registered no region 'vram'" in p.fetcher.report()["rdma"]["last_fallback"]
            assert fabric.reads == 0

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------- no dma-buf


def test_a_pool_that_cannot_be_exported_leaves_l1_working_and_unregistered(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> None:
        h = L1(pool_slabs=2)  # FakeCuda without an exporter: the export fails as without dma-buf support
        with caplog.at_level(logging.WARNING, logger="polarkvd.cluster.pool"):
            async with pools(fabric, holder=h) as p:
                rep = p.holder.report()["rdma"]
                assert rep["enabled"] and set(rep["regions"]) == {"dram"}
                assert rep["vram"] == {
                    "registered": False,
                    "reason": "not registered: cuMemGetHandleForAddressRange failed: "
                    "CUDA_ERROR_NOT_SUPPORTED (operation not supported)",
                }
                # L1 works, and peers still get L1 pages over RDMA: moved to DRAM, READ from there
                keys = p.store_l1(11, 3)
                views = p.slots(3)
                assert await p.fetcher.fetch("h", namespace(p.hm), keys, views) == [None, *keys[:2]]
                assert same(keys, views) and p.c(p.fetcher)["cluster_fetched_pages_rdma"] == 3
                assert all(p.hm.index.get(k).state == READY for k in keys)
                assert fabric.dmabuf_reads == 0
        said = [r.getMessage() for r in caplog.records if "L1 is not RDMA-readable" in r.getMessage()]
        assert len(said) == 1 and "CUDA_ERROR_NOT_SUPPORTED" in said[0]

    asyncio.run(run())

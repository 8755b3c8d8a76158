"""The manager's L1 (VRAM) state machine, in-process: reserve in L1, commit, lookup tier 1, load with
pool offsets, demotion to DRAM under pressure (byte-exact), a failed demotion keeping pages in L1,
leases pinning L1 pages, a session without L1 loading L1 pages, the shared lookup table, stats and
metrics, promotion of DRAM pages back into L1, and the operator's `evict --tier vram`.

The pool here is a real `VramPool` over `FakeCuda` (tests/tiers/test_vram.py): NOT CUDA. Its
"device memory" is host memory and its copies are memmove, standing in for the GPU only so that the
manager's logic (which page is where, when slots are taken and freed, what happens on failure) can
be tested on a machine without one. What CUDA itself does is tested on a GPU: tests/test_vram_e2e_gpu.py
and tests/tiers/test_vram_gpu.py (scripts/gpu-check.sh).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
from typing import Any

import numpy as np
import pytest

from polarkvd.cli import main, render_status
from polarkvd.config import load_config
from polarkvd.cuda import CudaError
from polarkvd.index import PROMOTING, READY, READY_VRAM
from polarkvd.keys import page_keys
from polarkvd.manager import Manager
from polarkvd.metrics import Snapshot, families
from polarkvd.tiers.dram import SlabAllocator
from polarkvd.tiers.vram import VramPool
from polarkvd.types import Tier
from polarkvd.wire.lookup_table import LookupTable, TableReader, table_bytes
from tests.conftest import TEST_NS, TEST_SEED, DaemonProc, FakeClock, page_bytes_for
from tests.tiers.test_vram import FakeCuda

PB = TEST_NS.page_bytes  # 32 KiB: 32 pages per 1 MiB slab
SLAB = 1 << 20


class L1:
    """A manager with an L1 pool of `pool_slabs` slabs over FakeCuda (NOT CUDA) and a DRAM arena of
    `dram_slabs` slabs, no disk tier, an injected clock and, optionally, the shared lookup table."""

    def __init__(
        self, pool_slabs: int = 1, dram_slabs: int = 4, table: bool = False, **overrides: str
    ) -> None:
        cap = dram_slabs * SLAB
        sets = {
            "dram.capacity": str(cap),
            "dram.slab_bytes": str(SLAB),
            "disk.enabled": "false",
            "vram.enabled": "true",
            "vram.capacity": str(pool_slabs * SLAB),
            "vram.slab_bytes": str(SLAB),
            **overrides,
        }
        self.cfg = load_config(env={}, overrides=sets)
        self.api = FakeCuda()
        self.pool = VramPool(self.api, 0, pool_slabs * SLAB, SLAB)
        self.arena = memoryview(bytearray(cap))
        self.host = self.pool.register_host(self.arena, pin=False)
        self.clock = FakeClock()
        self.table = None
        if table:
            self.table_mem = memoryview(bytearray(table_bytes(1024, 8)))
            self.table = LookupTable(self.table_mem, 1024, 8)
        self.m = Manager(
            self.cfg,
            self.arena,
            SlabAllocator(cap, SLAB),
            None,
            concurrent.futures.ThreadPoolExecutor(1),
            clock=self.clock,
            table=self.table,
            vram=self.pool,
            vram_host=self.host,
            seed=TEST_SEED,  # members of a cluster share their page-key seed
        )

    def sessions(self) -> tuple[Any, Any]:
        """An engine session without L1 (its stores go to DRAM, its loads read DRAM) and one with L1."""
        return self.m.attach(TEST_NS, "cpu"), self.m.attach(TEST_NS, "gpu", vram=True)

    def pool_bytes(self, offset: int) -> bytes:
        return ctypes.string_at(self.pool.base + offset, PB)

    def store(self, session: Any, keys: list[bytes], parent: bytes | None = None) -> list[int]:
        """What `store_cuda` does, in-process: reserve preferring L1, write each page where its
        offset is (pool or arena), commit. Returns the tiers."""
        offsets, tiers = self.m.reserve_in(session, keys, parent, Tier.VRAM)
        done = []
        for key, off, tier in zip(keys, offsets, tiers):
            if off < 0:
                continue
            data = page_bytes_for(key, PB).tobytes()
            if tier == Tier.VRAM:
                ctypes.memmove(self.pool.base + off, data, PB)
            else:
                self.arena[off : off + PB] = data
            done.append(key)
        self.m.commit(session, done)
        return tiers


def keys_of(m: Manager, seed: int, n: int) -> list[bytes]:
    digest = next(iter(m.namespaces.values())).digest
    return page_keys(digest, range(seed * 1000, seed * 1000 + n * TEST_NS.page_tokens), TEST_NS.page_tokens)


def test_an_l1_session_stores_in_the_pool_and_loads_pool_offsets() -> None:
    t = L1()
    m = t.m
    s = m.attach(TEST_NS, "gpu", vram=True)
    assert s.vram
    keys = keys_of(m, 1, 4)
    assert t.store(s, keys) == [Tier.VRAM] * 4
    assert m.index.vram_pages == 4 and m.index.ready_pages == 0 and m.allocator.used_bytes == 0
    assert all(m.index.get(k).state == READY_VRAM for k in keys)

    tiers, lease = m.lookup(s, keys + keys_of(m, 9, 1))
    assert tiers == [Tier.VRAM] * 4 and lease is None
    offsets, tiers, lease = asyncio.run(m.load(s, keys))
    assert tiers == [Tier.VRAM] * 4 and lease is not None
    for key, off in zip(keys, offsets):
        assert t.pool_bytes(off) == page_bytes_for(key, PB).tobytes()  # offsets are in the pool
    m.release(s, lease)

    c = m.stats()["counters"]
    assert c["stored_pages_vram"] == 4 and c["hit_pages_vram"] == 4 and c["loaded_pages_vram"] == 4
    assert c.get("hit_pages_dram", 0) == 0 and c["miss_pages"] == 1


def test_sessions_without_l1_and_a_dram_preference_get_dram_slots() -> None:
    t = L1()
    m = t.m
    plain = m.attach(TEST_NS, "cpu")  # did not ask for L1
    assert not plain.vram
    k = keys_of(m, 1, 2)
    assert t.store(plain, k) == [Tier.DRAM] * 2
    gpu = m.attach(TEST_NS, "gpu", vram=True)
    k2 = keys_of(m, 2, 2)
    assert m.reserve_in(gpu, k2, None, Tier.DRAM)[1] == [Tier.DRAM] * 2  # a preference for DRAM
    assert m.reserve(gpu, keys_of(m, 3, 1), None)[0] >= 0  # plain reserve: DRAM, as before L1
    assert m.index.vram_pages == 0 and len(t.pool.slots) == 0


def test_a_full_pool_spills_to_dram_and_starts_a_demotion() -> None:
    t = L1(pool_slabs=1)  # 32 slots
    m = t.m
    s = m.attach(TEST_NS, "gpu", vram=True)
    keys = keys_of(m, 1, 40)

    async def go() -> None:
        tiers = t.store(s, keys)
        assert tiers == [Tier.VRAM] * 32 + [Tier.DRAM] * 8
        assert m._vram_task is not None  # the full pool started a background demotion
        await m._vram_task

    asyncio.run(go())
    c = m.stats()["counters"]
    assert c["reserve_vram_full_pages"] == 8
    # down to the low watermark (0.75 of 32 slots = 24), and at least the 8 pages that spilled
    assert m.index.vram_pages <= 24 and c["demoted_pages_vram"] >= 8
    assert m.index.vram_pages + m.index.ready_pages == 40


def test_demotion_moves_pages_to_dram_byte_exact_leaves_first() -> None:
    t = L1()
    m = t.m
    s = m.attach(TEST_NS, "gpu", vram=True)
    chain = keys_of(m, 1, 6)
    t.store(s, chain)
    used = t.pool.slots.used_bytes

    async def go() -> int:
        victims = m.l1.vram_victims(2 * PB)  # the policy's order, leaves first
        assert [v.key for v in victims] == [chain[5], chain[4]]
        futs = m.l1.start_vram_demotion(victims)
        assert all(m.index.get(k).state == PROMOTING for k in chain[4:])  # invisible while copying
        assert m.lookup(s, chain)[0] == [Tier.VRAM] * 4
        assert await asyncio.gather(*futs) == [True, True]
        return await m.demote_vram(everything=True)

    assert asyncio.run(go()) == 4
    assert t.pool.slots.used_bytes == 0 < used and len(t.pool.slots) == 0  # every L1 slot freed
    assert m.lookup(s, chain)[0] == [Tier.DRAM] * 6
    for key in chain:
        page = m.index.get(key)
        assert page.state == READY
        assert bytes(t.arena[page.offset : page.offset + PB]) == page_bytes_for(key, PB).tobytes()
    c = m.stats()["counters"]
    assert c["demoted_pages_vram"] == 6 and c["demoted_bytes_vram"] == 6 * PB
    assert t.pool.batches >= 2  # one copy per batch, not per page
    # from DRAM they go on like any DRAM page: evictable leaf first
    assert m.evict_bytes(Tier.DRAM, PB) == PB and m.index.get(chain[5]) is None


def test_a_failed_demotion_keeps_the_pages_in_l1() -> None:
    t = L1()
    m = t.m
    s = m.attach(TEST_NS, "gpu", vram=True)
    chain = keys_of(m, 1, 3)
    t.store(s, chain)

    def broken(*_a: Any) -> None:
        raise CudaError("cuMemcpyDtoHAsync_v2", 700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access")

    t.api.copy_async = broken  # type: ignore[method-assign]
    assert asyncio.run(m.demote_vram(everything=True)) == 0
    assert m.allocator.used_bytes == 0  # the DRAM slots taken for the copy were given back
    assert m.index.vram_pages == 3 and m.index.ready_pages == 0
    for key in chain:
        page = m.index.get(key)
        assert page.state == READY_VRAM and t.pool_bytes(page.offset) == page_bytes_for(key, PB).tobytes()
    assert m.lookup(s, chain)[0] == [Tier.VRAM] * 3
    assert m.stats()["counters"]["demotion_failures_vram"] == 3
    assert len(m.vram_policy) == 3  # back in L1's policy: a later demotion can try again


def test_leases_pin_l1_pages_against_demotion_and_expire_as_in_dram() -> None:
    t = L1(**{"daemon.lease_seconds": "30s"})
    m = t.m
    s = m.attach(TEST_NS, "gpu", vram=True)
    chain = keys_of(m, 1, 4)
    t.store(s, chain)
    _tiers, lease = m.lookup(s, chain[:2], pin=True)
    assert lease is not None
    assert m.stats()["tiers"]["vram"]["pinned_pages"] == 2
    assert m.stats()["tiers"]["dram"]["pinned_pages"] == 0
    assert asyncio.run(m.demote_vram(everything=True)) == 2  # only the unpinned two
    assert [m.index.get(k).state for k in chain] == [READY_VRAM, READY_VRAM, READY, READY]
    t.clock.now += 30
    assert m.expire() == 1  # the lease, exactly as for DRAM pages
    assert asyncio.run(m.demote_vram(everything=True)) == 2


def test_abort_expiry_and_detach_give_l1_slots_back() -> None:
    t = L1(**{"daemon.lease_seconds": "30s"})
    m = t.m
    s = m.attach(TEST_NS, "gpu", vram=True)
    keys = keys_of(m, 1, 4)
    offsets, tiers = m.reserve_in(s, keys, None, Tier.VRAM)
    assert tiers == [Tier.VRAM] * 4 and m.stats()["tiers"]["vram"]["reserved_pages"] == 4
    assert m.abort(s, keys[:2]) == 2 and len(t.pool.slots) == 2
    t.clock.now += 30
    assert m.expire() == 2 and len(t.pool.slots) == 2  # quarantined while the engine may still write
    m.detach(s)
    assert len(t.pool.slots) == 0 and m.index.vram_pages == 0


def test_a_session_without_l1_loads_l1_pages_through_dram() -> None:
    t = L1()
    m = t.m
    gpu = m.attach(TEST_NS, "gpu", vram=True)
    cpu = m.attach(TEST_NS, "cpu")
    chain = keys_of(m, 1, 4)
    t.store(gpu, chain)
    assert m.lookup(cpu, chain)[0] == [Tier.VRAM] * 4  # a hit, not a miss, for every session

    async def go() -> tuple[list[int], list[Tier], int | None]:
        return await m.load(cpu, chain)

    offsets, tiers, lease = asyncio.run(go())
    assert tiers == [Tier.DRAM] * 4 and lease is not None  # arena offsets: what this engine can read
    for key, off in zip(chain, offsets):
        assert bytes(t.arena[off : off + PB]) == page_bytes_for(key, PB).tobytes()
    assert m.index.vram_pages == 0 and len(t.pool.slots) == 0
    m.release(cpu, lease)

    # a page an L1 engine holds pinned cannot move: the load ends before it
    more = keys_of(m, 2, 3)
    t.store(gpu, more)
    _, gpu_lease = m.lookup(gpu, more[1:2], pin=True)
    offsets, tiers, lease = asyncio.run(m.load(cpu, more))
    assert len(offsets) == 1 and m.index.get(more[1]).state == READY_VRAM
    m.release(cpu, lease)
    m.release(gpu, gpu_lease)


def test_l1_pages_are_in_the_shared_lookup_table_with_their_tier() -> None:
    t = L1(table=True)
    m = t.m
    s = m.attach(TEST_NS, "gpu", vram=True)
    r = TableReader(t.table_mem, s.ns.id, s.table_slot, final_miss=True)
    chain = keys_of(m, 1, 3)
    t.store(s, chain)
    assert r.probe(chain + keys_of(m, 7, 1)) == (3, True)  # found, and the miss after them is final
    assert r.last_tiers == bytes([Tier.VRAM] * 3)
    m.fold_thread_lookups()
    c = m.counters
    assert c["hit_pages_vram"] == 3 and c.get("hit_pages_dram", 0) == 0 and c["table_lookups"] == 1
    assert asyncio.run(m.demote_vram(everything=True)) == 3
    assert r.probe(chain) == (3, True) and r.last_tiers is None  # all in DRAM: the fast path again
    assert t.table.vram_used == 0
    m.fold_thread_lookups()
    assert c["hit_pages_dram"] == 3 and c["hit_pages_vram"] == 3


def test_stats_and_metrics_show_the_vram_tier() -> None:
    t = L1()
    m = t.m
    s = m.attach(TEST_NS, "gpu", vram=True)
    chain = keys_of(m, 1, 5)
    t.store(s, chain)
    m.lookup(s, chain)
    asyncio.run(m.demote_vram(min_pages=2))
    st = m.stats()
    v = st["tiers"]["vram"]
    assert list(st["tiers"]) == ["vram", "dram"]  # in tier order
    assert (v["tier"], v["pages"], v["bytes"], v["capacity_bytes"], v["policy"]) == (
        1,
        3,
        3 * PB,
        SLAB,
        "lru",
    )
    assert v["slot_bytes_used"] == 3 * PB and v["sessions"] == 1 and v["pinned_host"] is False
    assert m.tier_space()["vram"] == (3 * PB, SLAB)
    text = render_status({**st, "uptime_s": 1.0})
    assert any(line.startswith("L1 vram") and "lru" in line for line in text.splitlines()), text
    assert "L1: stored 5 pages" in text and "demoted to DRAM 2" in text
    fams = {f.name: f for f in families(Snapshot(stats=st, timings={}, ready=True))}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert samples[("polarkv_tier_pages", (("tier", "vram"),))] == 3
    assert samples[("polarkv_hit_pages_total", (("tier", "vram"),))] == 5
    assert samples[("polarkv_transfer_pages_total", (("path", "engine_to_vram"),))] == 5
    assert samples[("polarkv_transfer_pages_total", (("path", "vram_to_dram"),))] == 2
    assert samples[("polarkv_transfer_bytes_total", (("path", "vram_to_dram"),))] == 2 * PB


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_touches_stay_in_each_tiers_own_policy(policy: str) -> None:
    """A lookup hitting pages in both tiers touches each in its own policy: a node in the wrong
    policy's list would corrupt both."""
    t = L1(**{"dram.policy": policy, "vram.policy": policy})
    m = t.m
    s = m.attach(TEST_NS, "gpu", vram=True)
    chain = keys_of(m, 1, 6)
    t.store(s, chain)
    asyncio.run(m.demote_vram(min_pages=3, batch_bytes=PB))
    for _ in range(3):
        m.lookup(s, chain)
        asyncio.run(m.load(s, chain))
    for sess in list(m.sessions.values()):
        for lease in list(sess.leases):
            m.release(sess, lease)
    assert len(m.policy) == m.index.ready_pages and len(m.vram_policy) == m.index.vram_pages
    assert {p.key for p in m.policy.coldest_first()} == {k for k in chain if m.index.get(k).state == READY}
    assert np.isclose(len(m.policy) + len(m.vram_policy), 6)


# ---------------------------------------------------------------------------------- promotion into L1


def _load_and_release(m: Manager, session: Any, keys: list[bytes]) -> list[Tier]:
    _offsets, tiers, lease = asyncio.run(m.load(session, keys))
    if lease is not None:
        m.release(session, lease)
    return tiers


def _promote(m: Manager) -> int:
    """One round of the promotion chore, waiting for its copy to be applied."""

    async def go() -> int:
        started = m.schedule_vram_promotion()
        if started:
            await asyncio.wait([m._vram_promotion])  # a failed copy is the manager's to report
        await asyncio.sleep(0)
        return started

    return asyncio.run(go())


def test_dram_pages_an_l1_engine_loads_again_move_into_l1_byte_exact() -> None:
    t = L1(table=True)
    m = t.m
    cpu, gpu = t.sessions()
    chain = keys_of(m, 1, 4)
    t.store(cpu, chain)
    assert _load_and_release(m, gpu, chain) == [Tier.DRAM] * 4
    assert _promote(m) == 0  # loaded once: a scan would look the same

    assert _load_and_release(m, gpu, chain[:2]) == [Tier.DRAM] * 2  # the first two, again
    dram_before = m.allocator.used_bytes
    assert _promote(m) == 2
    assert [m.index.get(k).state for k in chain] == [READY_VRAM] * 2 + [READY] * 2
    for key in chain[:2]:
        assert t.pool_bytes(m.index.get(key).offset) == page_bytes_for(key, PB).tobytes()
    assert m.allocator.used_bytes < dram_before  # their DRAM slots were given back
    assert m.lookup(gpu, chain)[0] == [Tier.VRAM] * 2 + [Tier.DRAM] * 2
    r = TableReader(t.table_mem, gpu.ns.id, gpu.table_slot, final_miss=True)
    assert r.probe(chain) == (4, True) and r.last_tiers == bytes([Tier.VRAM] * 2 + [Tier.DRAM] * 2)
    st = m.stats()
    c = st["counters"]
    assert c["promoted_pages_vram"] == 2 and c["promoted_bytes_vram"] == 2 * PB
    assert "promoted from DRAM 2" in render_status({**st, "uptime_s": 1.0})
    fams = families(Snapshot(stats=st, timings={}, ready=True))
    samples = {(s.name, tuple(s.labels.items())): s.value for f in fams for s in f.samples}
    assert samples[("polarkv_transfer_pages_total", (("path", "dram_to_vram"),))] == 2
    # and an L1 engine now loads them GPU to GPU; one without L1 still gets them (through DRAM)
    assert _load_and_release(m, gpu, chain) == [Tier.VRAM] * 2 + [Tier.DRAM] * 2
    offsets, tiers, lease = asyncio.run(m.load(cpu, chain))
    assert tiers == [Tier.DRAM] * 4
    for key, off in zip(chain, offsets):
        assert bytes(t.arena[off : off + PB]) == page_bytes_for(key, PB).tobytes()
    m.release(cpu, lease)


def test_promotion_waits_for_readers_and_never_makes_room() -> None:
    t = L1(pool_slabs=1, **{"vram.high_watermark": "0.5", "vram.low_watermark": "0.5"})
    m = t.m
    cpu, gpu = t.sessions()
    chain = keys_of(m, 1, 20)  # 20 pages; the pool has 32 slots, half of them below the watermark
    t.store(cpu, chain)
    _load_and_release(m, gpu, chain)
    _offsets, _tiers, lease = asyncio.run(m.load(gpu, chain))  # loaded twice, and still being read
    assert _promote(m) == 0  # pinned by the engine's lease: nothing moves under it
    m.release(gpu, lease)
    assert _promote(m) == 16  # up to the high watermark, and no further
    assert m.index.vram_pages == 16 and m.index.ready_pages == 4
    assert m.stats()["counters"].get("demoted_pages_vram", 0) == 0  # it made no room by demoting
    assert _promote(m) == 0


def test_a_failed_promotion_leaves_pages_in_dram_and_slots_free() -> None:
    t = L1(**{"vram.promote_after_loads": "1"})
    m = t.m
    cpu, gpu = t.sessions()
    chain = keys_of(m, 1, 3)
    t.store(cpu, chain)
    _load_and_release(m, gpu, chain)  # once is enough with promote_after_loads = 1

    def broken(*_a: Any) -> None:
        raise CudaError("cuMemcpyHtoDAsync_v2", 700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access")

    t.api.copy_async = broken  # type: ignore[method-assign]
    assert _promote(m) == 3
    assert [m.index.get(k).state for k in chain] == [READY] * 3 and len(t.pool.slots) == 0
    assert all(m.index.get(k).pins == 0 for k in chain)
    assert m.stats()["counters"]["promotion_failures_vram"] == 3
    for key in chain:
        page = m.index.get(key)
        assert bytes(t.arena[page.offset : page.offset + PB]) == page_bytes_for(key, PB).tobytes()


def test_promote_after_loads_zero_never_promotes() -> None:
    t = L1(**{"vram.promote_after_loads": "0"})
    m = t.m
    cpu, gpu = t.sessions()
    chain = keys_of(m, 1, 2)
    t.store(cpu, chain)
    for _ in range(3):
        _load_and_release(m, gpu, chain)
    assert _promote(m) == 0 and m.index.vram_pages == 0


def test_a_page_pinned_while_it_is_copied_stays_in_dram_and_goes_next_round() -> None:
    t = L1(**{"vram.promote_after_loads": "1"})
    m = t.m
    cpu, gpu = t.sessions()
    chain = keys_of(m, 1, 2)
    t.store(cpu, chain)
    _load_and_release(m, gpu, chain)

    async def go() -> int | None:
        assert m.schedule_vram_promotion() == 2
        _, lease = m.lookup(cpu, chain[:1], pin=True)  # an engine pins the first page mid-copy
        await asyncio.wait([m._vram_promotion])
        await asyncio.sleep(0)
        return lease

    lease = asyncio.run(go())
    assert [m.index.get(k).state for k in chain] == [READY, READY_VRAM]
    assert len(t.pool.slots) == 1  # the first page's L1 slot was given back
    m.release(cpu, lease)
    assert _promote(m) == 1 and m.index.get(chain[0]).state == READY_VRAM


# ---------------------------------------------------------------------------------- operator: evict --tier vram


def test_evict_vram_moves_the_coldest_leaves_to_dram_byte_exact() -> None:
    t = L1(pool_slabs=1, dram_slabs=4)
    m = t.m
    s = m.attach(TEST_NS, "gpu", vram=True)
    chain = keys_of(m, 1, 6)
    t.store(s, chain)

    freed = asyncio.run(m.evict_vram(2 * PB))
    assert freed == 2 * PB
    assert m.lookup(s, chain)[0] == [Tier.VRAM] * 4 + [Tier.DRAM] * 2  # the leaves went, the prefix stays
    for key in chain[4:]:
        page = m.index.get(key)
        assert page.state == READY
        assert bytes(t.arena[page.offset : page.offset + PB]) == page_bytes_for(key, PB).tobytes()
    assert m.stats()["counters"]["demoted_pages_vram"] == 2


def test_evict_vram_leaves_pinned_pages_and_stops_when_nothing_can_move() -> None:
    t = L1(pool_slabs=1, dram_slabs=4)
    m = t.m
    s = m.attach(TEST_NS, "gpu", vram=True)
    chain = keys_of(m, 1, 4)
    t.store(s, chain)
    _, lease = m.lookup(s, chain[:2], pin=True)  # an engine holds the first two pages
    assert lease is not None

    freed = asyncio.run(m.evict_vram(1 << 30))  # "everything"
    assert freed == 2 * PB
    assert [m.index.get(k).state for k in chain] == [READY_VRAM] * 2 + [READY] * 2
    m.release(s, lease)
    assert asyncio.run(m.evict_vram(1 << 30)) == 2 * PB and t.pool.slots.used_bytes == 0


def test_cli_evict_vram_on_a_daemon_without_l1_says_so(
    daemon: DaemonProc, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["evict", "--tier", "vram", "--bytes", "1MiB", "--socket", str(daemon.control_socket)])
    out = capsys.readouterr()
    assert rc != 0
    assert "no L1" in out.err

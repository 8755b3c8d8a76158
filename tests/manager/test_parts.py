"""The manager's parts, in-process: no daemon, no socket, an in-memory arena, a temp-dir disk tier.

Each test drives one part through the Manager's API (bound to the part that owns the call) and
checks what an engine or operator would notice: offsets, what lookups and loads find, the bytes,
what was evicted, and the events the cluster's meta map would follow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

import pytest

from polarkvd.config import POLICY_NAMES, load_config
from polarkvd.errors import ErrorCode, PolarKVError
from polarkvd.keys import page_keys
from polarkvd.manager import Manager
from polarkvd.manager.events import Event, NamespaceKnown, PageRemoved, PageStored
from polarkvd.manager.knobs import apply_knobs
from polarkvd.tiers.disk import DiskTier
from polarkvd.tiers.dram import SlabAllocator
from polarkvd.types import Tier
from polarkvd.wire.frames import Reserved
from tests.conftest import TEST_NS, TEST_SEED, chain_tokens, make_manager, manager_store, page_bytes_for

PB = TEST_NS.page_bytes


def chain(session, seed: int, pages: int) -> list[bytes]:  # type: ignore[no-untyped-def]
    return [bytes(k) for k in page_keys(session.ns.digest, chain_tokens(seed, pages), TEST_NS.page_tokens)]


def room(m: Manager) -> int:
    """Pages the arena holds (make_manager rounds up to whole slabs)."""
    return m.allocator.capacity // m.allocator.slab_bytes * (m.allocator.slab_bytes // PB)


def fill(m: Manager, session, pages: int, seed: int) -> list[list[bytes]]:  # type: ignore[no-untyped-def]
    """Store `pages` pages in chains of 4 (other prompts): pressure on the arena."""
    chains = [chain(session, seed + i, min(4, pages - 4 * i)) for i in range(-(-pages // 4))]
    for keys in chains:
        manager_store(m, session, keys)
    return chains


# ------------------------------------------------------------------------------------------ store


def test_reserve_commit_abort() -> None:
    m, _ = make_manager(16)
    a, b = m.attach(TEST_NS, "a"), m.attach(TEST_NS, "b")
    keys = chain(a, 1, 4)
    offsets = m.reserve(a, keys, None)
    assert all(o >= 0 for o in offsets) and len(set(offsets)) == 4
    assert m.lookup(b, keys)[0] == []  # reserved, not committed: nobody sees it
    m.commit(a, keys[:3])
    assert m.lookup(b, keys)[0] == [Tier.DRAM] * 3
    used = m.allocator.used_bytes
    assert m.abort(a, keys[3:]) == 1
    assert m.allocator.used_bytes == used - a.ns.slot_bytes  # the aborted slot is free again
    assert m.reserve(b, keys[:1], None) == [Reserved.EXISTS]  # cached: nothing to write
    with pytest.raises(PolarKVError) as e:
        m.commit(b, keys[3:])  # never reserved by b
    assert e.value.code is ErrorCode.NOT_RESERVED
    assert m.lookup(b, keys)[0] == [Tier.DRAM] * 3  # nothing committed by the refused call


def test_a_store_survives_its_session() -> None:
    m, _ = make_manager(16)
    a = m.attach(TEST_NS, "a")
    keys = chain(a, 2, 3)
    manager_store(m, a, keys)
    m.reserve(a, chain(a, 3, 2), None)
    m.detach(a)  # its reservations are aborted, its committed pages stay
    b = m.attach(TEST_NS, "b")
    assert m.lookup(b, keys)[0] == [Tier.DRAM] * 3
    assert m.lookup(b, chain(b, 3, 2))[0] == []


# ------------------------------------------------------------------------------------------ leases


def test_a_load_pins_until_released_and_pinned_pages_are_not_evicted() -> None:
    m, _ = make_manager(8)
    s = m.attach(TEST_NS, "s")
    held = chain(s, 4, 4)
    manager_store(m, s, held)

    async def load() -> tuple[list[int], int | None]:
        offsets, tiers, lease = await m.load(s, held)
        assert tiers == [Tier.DRAM] * 4
        return offsets, lease

    offsets, lease = asyncio.run(load())
    assert [bytes(m.arena[o : o + PB]) for o in offsets] == [page_bytes_for(k, PB).tobytes() for k in held]
    fill(m, s, 2 * room(m), 100)  # twice the arena's room in other prompts
    assert m.lookup(s, held)[0] == [Tier.DRAM] * 4  # pinned: never evicted
    assert lease is not None and m.release(s, lease) == 4
    fill(m, s, 2 * room(m), 1000)
    assert m.lookup(s, held)[0] == []  # released: as evictable as any page


# ------------------------------------------------------------------------------------------ eviction


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_eviction_takes_leaves_before_their_parents(policy: str) -> None:
    m, _ = make_manager(8, **{"dram.policy": policy})
    s = m.attach(TEST_NS, "s")
    chains = [chain(s, 20, 6)]
    manager_store(m, s, chains[0])
    chains += fill(m, s, room(m) - 6, 200)  # full
    chains += fill(m, s, 3, 300)  # 3 pages must go
    held = [[m.index.get(k) is not None for k in keys] for keys in chains]
    assert sum(h.count(False) for h in held) == 3
    for h in held:  # what stays of every prompt is a prefix: a page never goes before its children
        assert h == sorted(h, reverse=True), h


# ------------------------------------------------------------------------------------------ demotion and promotion


def disk_manager(tmp_path: Path) -> Manager:
    cap = 4 << 20
    cfg = load_config(env={}, overrides={"dram.capacity": str(cap), "dram.slab_bytes": str(1 << 20),
                                         "disk.path": str(tmp_path / "disk")})  # fmt: skip
    disk = DiskTier(tmp_path / "disk", 64 << 20)
    disk.open()
    executor = concurrent.futures.ThreadPoolExecutor(2)
    return Manager(
        cfg, memoryview(bytearray(cap)), SlabAllocator(cap, 1 << 20), disk, executor, seed=TEST_SEED
    )


def test_evicted_pages_go_to_disk_and_come_back_with_their_bytes(tmp_path: Path) -> None:
    async def run() -> None:
        m = disk_manager(tmp_path)
        s = m.attach(TEST_NS, "s")
        keys = chain(s, 30, 5)
        manager_store(m, s, keys)
        assert m.evict_prefixes([keys[0]])["evicted_pages"] == 5
        await m.flush()  # the disk writes finished
        assert m.lookup(s, keys)[0] == [Tier.DISK] * 5 and m.index.get(keys[0]) is None
        offsets, tiers, lease = await m.load(s, keys)  # promoted into DRAM first
        assert tiers == [Tier.DISK] * 5
        assert [bytes(m.arena[o : o + PB]) for o in offsets] == [
            page_bytes_for(k, PB).tobytes() for k in keys
        ]
        assert m.lookup(s, keys)[0] == [Tier.DRAM] * 5
        assert m.counters["demoted_pages"] == 5 and m.counters["promoted_pages"] == 5
        assert lease is not None
        m.release(s, lease)

    asyncio.run(run())


# ------------------------------------------------------------------------------------------ operator


def test_operator_pins_keep_a_prefix_through_pressure_and_evict_removes_it() -> None:
    m, _ = make_manager(8)
    s = m.attach(TEST_NS, "s")
    system_prompt = chain(s, 40, 3)
    manager_store(m, s, system_prompt)
    assert m.pin([system_prompt[0]])["pinned_pages"] == 3
    fill(m, s, 2 * room(m), 400)
    assert m.lookup(s, system_prompt)[0] == [Tier.DRAM] * 3
    assert m.evict_prefixes([system_prompt[0]])["evicted_pages"] == 0  # pinned pages stay
    assert m.unpin([system_prompt[0]]) == 3
    assert m.evict_prefixes([system_prompt[0]])["evicted_pages"] == 3
    assert m.lookup(s, system_prompt)[0] == []


# ------------------------------------------------------------------------------------------ events


def test_every_change_emits_its_event_once_in_order(tmp_path: Path) -> None:
    async def run() -> tuple[bytes, list[bytes], list[Event]]:
        m = disk_manager(tmp_path)
        events = m.events.subscribe()
        s = m.attach(TEST_NS, "s")
        keys = chain(s, 50, 3)
        m.reserve(s, keys, None)
        m.abort(s, keys[2:])  # a reservation that never became a page: no event
        m.commit(s, keys[:2])
        m.evict_prefixes([keys[0]])
        await m.flush()
        _offsets, tiers, lease = await m.load(s, keys[:2])
        assert lease is not None and tiers == [Tier.DISK] * 2
        m.release(s, lease)
        return s.ns.digest, keys, events.take()

    digest, (k0, k1, _), got = asyncio.run(run())
    assert got[:5] == [
        NamespaceKnown(digest),  # new here: its disk pages can be served
        PageStored(k0, Tier.DRAM),  # committed, in commit order
        PageStored(k1, Tier.DRAM),
        PageRemoved(k1, Tier.DRAM),  # evicted, leaf first
        PageRemoved(k0, Tier.DRAM),
    ]
    # the two disk writes finish in either order
    assert sorted(got[5:7], key=lambda e: e == PageStored(k1, Tier.DISK)) == [
        PageStored(k0, Tier.DISK),
        PageStored(k1, Tier.DISK),
    ]
    # promoted back (the two disk reads finish in either order), and nothing more
    assert sorted(got[7:], key=lambda e: e == PageStored(k1, Tier.DRAM)) == [
        PageStored(k0, Tier.DRAM),
        PageStored(k1, Tier.DRAM),
    ]


def test_nothing_is_kept_for_nobody_and_a_late_subscriber_sees_only_what_follows() -> None:
    m, _ = make_manager(8)
    s = m.attach(TEST_NS, "s")
    assert not m.events.wanted
    manager_store(m, s, chain(s, 60, 2))
    late = m.events.subscribe()
    keys = chain(s, 61, 1)
    manager_store(m, s, keys)
    assert late.take() == [PageStored(keys[0], Tier.DRAM)] and late.take() == []
    m.events.unsubscribe(late)
    manager_store(m, s, chain(s, 62, 1))
    assert late.take() == [] and not m.events.wanted


# ------------------------------------------------------------------------------------------ live knobs


def test_knobs_apply_together_or_not_at_all_and_new_watermarks_take_effect_at_once() -> None:
    m, _ = make_manager(8)
    s = m.attach(TEST_NS, "s")
    fill(m, s, room(m), 500)
    full = m.allocator.used_bytes
    with pytest.raises(PolarKVError) as e:  # low above high: nothing changes
        apply_knobs(m, {"dram.high_watermark": 0.5, "dram.low_watermark": 0.75, "dram.policy": "s3fifo"})
    assert e.value.code is ErrorCode.BAD_VALUE and "low_watermark" in str(e.value)
    assert m.policy.name == "lru" and m.allocator.used_bytes == full
    apply_knobs(m, {"dram.high_watermark": 0.5, "dram.low_watermark": 0.25, "dram.policy": "s3fifo"})
    assert m.policy.name == "s3fifo" and m.cfg.dram.policy == "s3fifo"
    assert m.allocator.used_bytes <= 0.25 * m.allocator.capacity  # demoted now, not at the next chore


def test_a_disk_page_dropped_between_lookup_and_promotion_is_a_miss(tmp_path: Path) -> None:
    """The disk tier evicts on its I/O threads: a page can go between the loop's check that it is on
    disk and the promotion reading its entry. That is a miss (the engine recomputes), not an error.
    (A real eviction cannot be timed into that gap on demand, so the entry vanishes on cue.)"""

    async def run() -> None:
        m = disk_manager(tmp_path)
        s = m.attach(TEST_NS, "s")
        keys = chain(s, 70, 3)
        manager_store(m, s, keys)
        m.evict_prefixes([keys[0]])
        await m.flush()
        assert m.disk is not None
        real_entry, seen = m.disk.entry, []

        def entry(key: bytes):  # type: ignore[no-untyped-def]
            seen.append(key)
            return None if key == keys[1] and seen.count(key) > 1 else real_entry(key)

        m.disk.entry = entry  # type: ignore[method-assign]
        _offsets, tiers, lease = await m.load(s, keys)
        assert tiers == [Tier.DISK]  # the prefix ends where the page went
        assert lease is not None
        m.release(s, lease)

    asyncio.run(run())

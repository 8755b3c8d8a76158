"""The `cost` policy in the manager (manager/worth.py): pages valued by what losing them costs, deep
pages of long prompts dearer than shallow ones, the fit following what engines report. In-process:
an in-memory arena, no daemon."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path

import pytest

from polarkvd.config import load_config
from polarkvd.cost_model import TRUSTED_AFTER
from polarkvd.errors import ConfigError
from polarkvd.index import child_depth, depth_of
from polarkvd.keys import page_keys
from polarkvd.manager import Manager
from polarkvd.manager.worth import MARGIN
from polarkvd.tiers.disk import DiskTier
from polarkvd.tiers.dram import SlabAllocator
from polarkvd.types import Tier
from tests.conftest import TEST_NS, TEST_SEED, chain_tokens, make_manager, manager_store, page_bytes_for
from tests.test_cost_model import disk_reads


def chain(session, seed: int, pages: int) -> list[bytes]:  # type: ignore[no-untyped-def]
    return [bytes(k) for k in page_keys(session.ns.digest, chain_tokens(seed, pages), TEST_NS.page_tokens)]


def room(m: Manager) -> int:
    return m.allocator.capacity // m.allocator.slab_bytes * (m.allocator.slab_bytes // TEST_NS.page_bytes)


def test_deep_pages_count_their_depth_right_on_average() -> None:
    """Past 128 pages a depth is counted approximately (small codes, 8 bytes a page): along 100
    chains of 1,000 pages the estimate is right within 5% on average, and never runs away."""
    import os

    estimates = []
    for _ in range(100):
        code = 0
        for _ in range(1000):
            code = child_depth(code, os.urandom(16))
        estimates.append(depth_of(code))
    assert abs(sum(estimates) / len(estimates) - 1000) < 50
    assert max(estimates) < 2000 and min(estimates) > 500


def test_pages_know_their_depth_in_the_chain() -> None:
    m, _ = make_manager(16)
    s = m.attach(TEST_NS, "s")
    keys = chain(s, 1, 5)
    manager_store(m, s, keys[:2])
    manager_store(m, s, keys[2:], parent=keys[1])  # a second reserve goes on from the first
    assert [m.index.get(k).depth for k in keys] == [0, 1, 2, 3, 4]  # type: ignore[union-attr]


@pytest.mark.parametrize("policy", ["lru", "cost"])
def test_a_long_prompt_outlives_short_ones_under_cost(policy: str) -> None:
    """A long document stored first, then many short chats fill the arena, then more arrive: under
    `lru` the document (the least recently used) loses its deepest pages first; under `cost` the
    short chats' pages, cheap to recompute, go and the document stays whole."""
    m, _ = make_manager(24, **{"dram.policy": policy})
    s = m.attach(TEST_NS, "s")
    doc = chain(s, 10, 12)
    manager_store(m, s, doc)
    shorts = [chain(s, 100 + i, 2) for i in range((room(m) - 12) // 2)]
    for keys in shorts:
        manager_store(m, s, keys)
    assert all(m.index.get(k) is not None for k in doc)
    for i in range(4):  # 8 more pages: 8 must go
        manager_store(m, s, chain(s, 500 + i, 2))
    doc_left = sum(m.index.get(k) is not None for k in doc)
    if policy == "cost":
        assert doc_left == len(doc)
    else:
        assert doc_left == len(doc) - 8  # its 8 deepest pages, the least recently used


def test_engines_observations_replace_the_default() -> None:
    m, _ = make_manager(8, **{"dram.policy": "cost"})
    s = m.attach(TEST_NS, "s")
    manager_store(m, s, chain(s, 1, 2))
    ns_id = s.ns.id
    before = m.worth.model(ns_id).cost
    for i in range(20):
        m.worth.observe_prefill(ns_id, 100 + 10 * i, 1000 * i, 0.001 + 1e-5 * (100 + 10 * i))
    after = m.worth.model(ns_id).cost
    assert after.observations > 0 and after.per_token < before.per_token  # far cheaper than the guess
    report = m.stats()["worth"]
    assert report["models"][0]["fitted"] and report["models"][0]["model"] == TEST_NS.model
    assert set(report["fetch_gbps"]) == {"dram", "dmp", "disk"}


def test_switching_to_cost_live_values_the_pages() -> None:
    m, _ = make_manager(24)
    s = m.attach(TEST_NS, "s")
    manager_store(m, s, chain(s, 1, 3))
    m.set_policy(Tier.DRAM, "cost")
    assert m.policy.name == "cost" and m.policy.valuer is not None  # type: ignore[attr-defined]
    m.set_policy(Tier.DRAM, "lru")
    assert m.policy.name == "lru" and len(m.policy) == 3


def cost_disk_manager(tmp_path: Path, disk_bytes: int = 64 << 20) -> Manager:
    cap = 4 << 20
    overrides = {"dram.capacity": str(cap), "dram.slab_bytes": str(1 << 20), "disk.path": str(tmp_path / "d"),
                 "dram.policy": "cost"}  # fmt: skip
    disk = DiskTier(tmp_path / "d", disk_bytes)
    disk.open()
    executor = concurrent.futures.ThreadPoolExecutor(2)
    cfg = load_config(env={}, overrides=overrides)
    return Manager(
        cfg, memoryview(bytearray(cap)), SlabAllocator(cap, 1 << 20), disk, executor, seed=TEST_SEED
    )


@pytest.mark.parametrize("engine_seconds_per_token", [1e-9, 1e-2])
def test_a_page_cheaper_to_recompute_than_to_read_back_is_dropped(
    tmp_path: Path, engine_seconds_per_token: float
) -> None:
    """Under `cost`, an evicted page goes to disk only if reading it back beats recomputing it: an
    engine that computes a token in a nanosecond gets its pages dropped, one that takes 10 ms gets
    them demoted. A parent whose child is on disk is demoted whatever it costs."""

    async def run() -> None:
        m = cost_disk_manager(tmp_path)
        s = m.attach(TEST_NS, "s")
        for _ in range(10):
            m.worth.observe_prefill(s.ns.id, 256, 0, 256 * engine_seconds_per_token)
        measure_disk(m, 1e-3)  # a page read back in 1 ms
        keys = chain(s, 7, 3)
        manager_store(m, s, keys)
        assert m.evict_prefixes([keys[0]])["evicted_pages"] == 3
        await m.flush()
        on_disk = [m.disk.entry(k) is not None for k in keys]  # type: ignore[union-attr]
        if engine_seconds_per_token < 1e-6:
            assert on_disk == [False] * 3 and m.counters["dropped_pages_cheap"] == 3
            assert m.lookup(s, keys)[0] == []  # gone: the engine recomputes
        else:
            assert on_disk == [True] * 3 and m.counters["dropped_pages_cheap"] == 0
            assert m.lookup(s, keys)[0] == [Tier.DISK] * 3
        # a parent whose child already sits on disk is demoted whatever it costs: the child needs it
        parent, child = chain(s, 8, 2)
        manager_store(m, s, [parent])
        m.disk.put(child, parent, s.ns.digest, page_bytes_for(child, TEST_NS.page_bytes), s.ns.ns.itemsize)  # type: ignore[union-attr]
        assert m.evict_prefixes([parent])["evicted_pages"] == 1
        await m.flush()
        assert m.disk.entry(parent) is not None  # type: ignore[union-attr]

    asyncio.run(run())


def measure_disk(m: Manager, seconds_per_page: float) -> None:
    """The daemon has measured its disk reads often enough to decide by (as reads would)."""
    for _ in range(TRUSTED_AFTER):
        m.worth.fetch.observe(Tier.DISK, TEST_NS.page_bytes, seconds_per_page)


def test_an_unmeasured_disk_keeps_every_page(tmp_path: Path) -> None:
    """Until the daemon has measured its own disk reads, drop-or-demote demotes: a default rate must
    not drop pages (and leave the disk unread, so never measured)."""

    async def run() -> None:
        m = cost_disk_manager(tmp_path)
        s = m.attach(TEST_NS, "s")
        for _ in range(10):
            m.worth.observe_prefill(s.ns.id, 256, 0, 256e-9)  # recomputing is nearly free
        keys = chain(s, 7, 3)
        manager_store(m, s, keys)
        m.evict_prefixes([keys[0]])
        await m.flush()
        assert all(m.disk.entry(k) is not None for k in keys)  # type: ignore[union-attr]
        assert m.counters["dropped_pages_cheap"] == 0

    asyncio.run(run())


@pytest.mark.parametrize("disk_seconds_per_page", [1.0, 1e-6])
def test_fetch_or_recompute_ends_a_hit_at_the_first_page_dearer_to_fetch(
    tmp_path: Path, disk_seconds_per_page: float
) -> None:
    """A chain of 6 pages, the first 3 in DRAM, the last 3 on disk. On a disk that reads a page in
    a second (and an engine that recomputes one in ~1 ms), the daemon's lookup and load end the hit
    at page 3, the first on disk, and count the 3 pages recomputed instead; on a fast disk the
    whole chain is a hit and is loaded. The engine's view: what it recomputes starts there."""

    async def run() -> None:
        m = cost_disk_manager(tmp_path)
        s = m.attach(TEST_NS, "s")
        for i in range(10):  # an engine at ~8 us a token
            m.worth.observe_prefill(s.ns.id, 256 + i, 0, (256 + i) * 8e-6)
        keys = chain(s, 9, 6)
        manager_store(m, s, keys)
        page = TEST_NS.page_bytes
        assert m.evict_bytes(Tier.DRAM, 3 * page) >= 3 * page  # leaf-first: the 3 deepest go to disk
        await m.flush()
        assert m.lookup(s, keys)[0] == [Tier.DRAM] * 3 + [Tier.DISK] * 3  # the disk not measured yet
        measure_disk(m, disk_seconds_per_page)
        tiers = m.lookup(s, keys)[0]
        offsets, got, lease = await m.load(s, keys)
        if lease is not None:
            m.release(s, lease)
        if disk_seconds_per_page > 0.1:
            assert tiers == [Tier.DRAM] * 3 and got == [Tier.DRAM] * 3
            # counted at the lookup; the load (an engine answering from the shared table asks no
            # lookup) is cut by the same rule
            assert m.counters["recompute_instead_pages"] == 6
        else:
            assert tiers == [Tier.DRAM] * 3 + [Tier.DISK] * 3 and len(offsets) == 6
            assert m.counters["recompute_instead_pages"] == 0
        assert m.stats()["worth"]["recompute_instead_pages"] == m.counters["recompute_instead_pages"]

    asyncio.run(run())


@pytest.mark.parametrize("policy", ["lru", "s3fifo"])
def test_fetch_or_recompute_is_the_cost_policys(tmp_path: Path, policy: str) -> None:
    """Under the recency policies a hit is never cut, however slow the disk."""

    async def run() -> None:
        m = cost_disk_manager(tmp_path)
        m.set_policy(Tier.DRAM, policy)
        s = m.attach(TEST_NS, "s")
        for i in range(10):
            m.worth.observe_prefill(s.ns.id, 256 + i, 0, (256 + i) * 8e-6)
        keys = chain(s, 9, 4)
        manager_store(m, s, keys)
        m.evict_prefixes([keys[0]])
        await m.flush()
        measure_disk(m, 1.0)
        assert m.lookup(s, keys)[0] == [Tier.DISK] * 4

    asyncio.run(run())


@pytest.mark.parametrize("pattern", ["noisy", "bimodal", "slow burst"])
@pytest.mark.parametrize("us_per_token", [5.0, 1.0])
def test_a_noisy_disk_rate_drops_and_cuts_only_what_recomputes_faster_even_at_its_fast_end(
    tmp_path: Path, pattern: str, us_per_token: float
) -> None:
    """The daemon's disk reads come in noisy, bimodal or with a slow burst, unhindered at 60 us a
    page, their median 3-30x that. An engine recomputing a page in 80 us (5 us a token) is slower
    than the unhindered read: no page is dropped and no hit cut, though the median alone says
    otherwise. One recomputing it in 16 us is faster than even the fast end: its pages are dropped
    and its disk hits cut (its DRAM hits kept: a DRAM copy is faster still)."""

    async def run() -> None:
        m = cost_disk_manager(tmp_path)
        s = m.attach(TEST_NS, "s")
        for i in range(10):
            m.worth.observe_prefill(s.ns.id, 256 + i, 0, (256 + i) * us_per_token * 1e-6)
        page = TEST_NS.page_bytes
        hit = chain(s, 11, 6)
        manager_store(m, s, hit)
        assert m.evict_bytes(Tier.DRAM, 3 * page) >= 3 * page  # (the disk unmeasured: demoted)
        await m.flush()
        for seconds in disk_reads(pattern):
            m.worth.fetch.observe(Tier.DISK, page, seconds)
        recompute = m.worth.model(s.ns.id).cost.page_seconds(TEST_NS.page_tokens, 0)
        assert m.worth.fetch.seconds(Tier.DISK, page) > 2 * recompute  # the median: "drop them all"
        tiers = m.lookup(s, hit)[0]
        dropped = chain(s, 12, 3)
        manager_store(m, s, dropped)
        m.evict_prefixes([dropped[0]])
        await m.flush()
        on_disk = [m.disk.entry(k) is not None for k in dropped]  # type: ignore[union-attr]
        if us_per_token > 1:
            assert tiers == [Tier.DRAM] * 3 + [Tier.DISK] * 3 and on_disk == [True] * 3
            assert m.counters["dropped_pages_cheap"] == m.counters["recompute_instead_pages"] == 0
        else:
            assert tiers == [Tier.DRAM] * 3 and on_disk == [False] * 3
            assert m.counters["dropped_pages_cheap"] == 3 and m.counters["recompute_instead_pages"] == 3

    asyncio.run(run())


@pytest.mark.parametrize("policy", ["lru", "cost"])
def test_pages_used_once_do_not_push_out_pages_used_often(policy: str) -> None:
    """DRAM admission by worth: DRAM full of pages every request comes back for, then eight
    one-off pages stored one after the other. Under `lru` each pushes out a reused page; under
    `cost` the first takes one reused page's slot, and each, worth less than that victim, comes in
    as the next victim: the next takes its slot, and the reused pages stay."""
    m, _ = make_manager(16, **{"dram.policy": policy})
    s = m.attach(TEST_NS, "s")
    hot = [chain(s, i, 1) for i in range(room(m))]
    for keys in hot:
        manager_store(m, s, keys)
    for _ in range(2):  # two more requests for each
        for keys in hot:
            assert len(m.lookup(s, keys)[0]) == 1
    for i in range(8):
        manager_store(m, s, chain(s, 1000 + i, 1))
    kept = sum(m.index.get(keys[0]) is not None for keys in hot)
    assert kept == (len(hot) - 1 if policy == "cost" else len(hot) - 8)
    if policy == "cost":
        assert m.stats()["worth"]["admitted_low_pages"] == 8


def test_a_request_counts_one_hit_its_lookup_and_load_together() -> None:
    """A request looks its prefix up, then loads it: under `cost` its pages count one hit more (two
    with their admission), not two; the load keeps them the most recently used."""

    async def run() -> None:
        m, _ = make_manager(16, **{"dram.policy": "cost"})
        s = m.attach(TEST_NS, "s")
        keys = chain(s, 1, 4)
        manager_store(m, s, keys)
        for _ in range(2):  # two requests
            assert len(m.lookup(s, keys)[0]) == 4
            offsets, _, lease = await m.load(s, keys)
            assert len(offsets) == 4 and lease is not None
            m.release(s, lease)
        pages = [m.index.get(key) for key in keys]
        assert [round(m.policy.frequency(p)) for p in pages] == [3] * 4  # type: ignore[attr-defined]
        assert [n.key for n in m.policy.coldest(16)][-4:] == keys[::-1]  # leaf first: root most recent

    asyncio.run(run())


def test_a_parent_is_worth_at_least_what_its_children_need() -> None:
    """Deep pages are dearer to recompute (attention), so stored alone a chain's root has the lowest
    priority of its pages. Once a request has hit the chain, every page's priority is at least its
    child's: the cost order itself, not only the leaf-first veto, evicts the chain leaf first."""
    m, _ = make_manager(16, **{"dram.policy": "cost"})
    s = m.attach(TEST_NS, "s")
    for i in range(10):  # an engine whose attention dominates: deep pages cost far more
        m.worth.observe_prefill(s.ns.id, 64 + i, 4096 * i, 1e-6 * (64 + i) * (1 + 4096 * i))
    keys = chain(s, 2, 8)
    manager_store(m, s, keys)
    prio = [m.policy.priority(m.index.get(key)) for key in keys]  # type: ignore[attr-defined]
    assert prio == sorted(prio) and prio[0] < prio[-1]  # as stored: the root lowest
    m.lookup(s, keys)
    prio = [m.policy.priority(m.index.get(key)) for key in keys]  # type: ignore[attr-defined]
    assert prio == sorted(prio, reverse=True)  # root >= ... >= leaf
    victims = m.policy.victims(8, lambda node: True)  # no veto: the order alone
    assert [n.key for n in victims] == keys[::-1]


@pytest.mark.parametrize("bad", ["fast", "-1", "nan", "1e9"])
def test_a_bad_pinned_disk_rate_is_refused_with_its_key(bad: str) -> None:
    with pytest.raises(ConfigError, match="disk.read_gbps"):
        load_config(env={}, overrides={"disk.read_gbps": bad})


def test_a_chain_leaving_dram_at_once_keeps_the_parents_of_what_it_demotes(tmp_path: Path) -> None:
    """An engine whose attention dominates: a chain's first page recomputes faster than the disk
    reads it, its deeper pages slower. Evicted in one batch (leaf first), the deeper pages go to
    disk, and so does the first, though cheap: without it they could never be hit (their writes
    are still queued when its turn comes)."""

    async def run() -> None:
        m = cost_disk_manager(tmp_path)
        s = m.attach(TEST_NS, "s")
        for i in range(10):  # 2.5 us per token per token of depth, nothing else
            n, d = 64 + i, 1000 * i
            m.worth.observe_prefill(s.ns.id, n, d, 2.5e-6 * n * (d + n / 2))
        measure_disk(m, 1e-3)
        fit = m.worth.model(s.ns.id).cost
        assert fit.page_seconds(16, 0) * MARGIN < 1e-3 < fit.page_seconds(16, 1) * MARGIN
        keys = chain(s, 13, 3)
        manager_store(m, s, keys)
        assert m.evict_prefixes([keys[0]])["evicted_pages"] == 3
        await m.flush()
        assert [m.disk.entry(k) is not None for k in keys] == [True] * 3  # type: ignore[union-attr]
        assert m.counters["dropped_pages_cheap"] == 0
        assert m.lookup(s, keys)[0] == [Tier.DISK] * 3

        alone = chain(s, 14, 1)  # the same first page with nothing behind it is dropped
        manager_store(m, s, alone)
        m.evict_prefixes(alone)
        await m.flush()
        assert m.disk.entry(alone[0]) is None and m.counters["dropped_pages_cheap"] == 1  # type: ignore[union-attr]

    asyncio.run(run())


def test_a_full_disk_takes_only_pages_used_more_than_what_it_would_evict(tmp_path: Path) -> None:
    """Drop-or-demote weighs expected reuse (TinyLFU admission): while the disk has room every page
    leaving DRAM goes there; once it is full, a page requests used once is dropped (the disk keeps
    the page it would have evicted for it, used six times), and a page used more than that is
    demoted, the disk's least worth page making room for it."""

    async def run() -> None:
        m = cost_disk_manager(tmp_path, disk_bytes=2 * (TEST_NS.page_bytes + 4096))
        s = m.attach(TEST_NS, "s")
        # 10 ms a token at any depth: every page as dear to recompute, far dearer than a 1 ms read
        for i in range(10):
            m.worth.observe_prefill(s.ns.id, 64 + 16 * i, 0, (64 + 16 * i) * 1e-2)
        measure_disk(m, 1e-3)

        def used(keys: list[bytes], times: int) -> None:
            manager_store(m, s, keys)
            for _ in range(times - 1):
                m.lookup(s, keys)

        def leave_dram(keys: list[bytes]) -> None:
            assert m.evict_prefixes([keys[0]])["evicted_pages"] == len(keys)

        popular = chain(s, 30, 2)
        used(popular, 6)
        leave_dram(popular)
        await m.flush()
        assert all(m.disk.entry(k) is not None for k in popular)  # type: ignore[union-attr]

        once = chain(s, 31, 1)
        used(once, 1)
        leave_dram(once)
        await m.flush()
        assert m.disk.entry(once[0]) is None and m.counters["dropped_pages_cheap"] == 1  # type: ignore[union-attr]
        assert all(m.disk.entry(k) is not None for k in popular)  # type: ignore[union-attr]
        assert m.lookup(s, once)[0] == []  # gone: the engine recomputes it

        often = chain(s, 32, 1)
        used(often, 10)
        leave_dram(often)
        await m.flush()
        assert m.disk.entry(often[0]) is not None  # type: ignore[union-attr]
        assert m.disk.entry(popular[1]) is None  # type: ignore[union-attr]  # the disk's victim: a leaf
        assert m.counters["dropped_pages_cheap"] == 1

    asyncio.run(run())

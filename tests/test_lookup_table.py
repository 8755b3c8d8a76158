"""The shared lookup table (polarkvd/wire/lookup_table.py): engines answer lookups themselves from the
daemon's index of L1, DRAM and disk pages in shared memory — same answers as the socket, counted and
touched the same, never answering for a daemon that stopped keeping it, never reporting a key it does
not hold. Every test runs with both probes, the compiled one (polarkvd/wire/_probe.c) and the Python
one, as the engine's client picks them (POLARKVD_PURE_PYTHON); a few set them side by side."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import mmap
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import xxhash

from polarkvd.client import EngineClient
from polarkvd.config import load_config
from polarkvd.errors import DaemonUnavailable, PolarKVError
from polarkvd.keys import page_keys
from polarkvd.manager import Manager
from polarkvd.manager import table as table_upkeep
from polarkvd.tiers.disk import DiskTier
from polarkvd.tiers.dram import SlabAllocator
from polarkvd.types import Tier
from polarkvd.wire import lookup_table
from polarkvd.wire.lookup_table import (
    PURE_PYTHON_ENV,
    RING_ENTRIES,
    STALE_NS,
    TIER_DISK,
    TIER_DRAM,
    TIER_VRAM,
    LookupTable,
    TableReader,
    map_table,
    table_bytes,
    table_entries,
)
from tests.conftest import TEST_NS, chain_tokens, manager_store, store_chain, wait_for
from tests.test_metrics import scrape

COMPILED = lookup_table._probe is not None
NO_COMPILED = "the compiled probe is not built here (no C compiler or Python headers at install)"


def side_by_side(test):
    """A test that runs both probes itself, once (not once per probe)."""
    test.side_by_side = True
    return test


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    kinds = ["both"] if getattr(metafunc.function, "side_by_side", False) else ["compiled", "python"]
    metafunc.parametrize("probe_kind", kinds, indirect=True)


@pytest.fixture(autouse=True)
def probe_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test once with each probe: every TableReader made during it (the tests' own and the
    engine clients') probes so."""
    if request.param != "python" and not COMPILED:
        pytest.skip(NO_COMPILED)
    if request.param == "python":
        monkeypatch.setenv(PURE_PYTHON_ENV, "1")
    else:
        monkeypatch.delenv(PURE_PYTHON_ENV, raising=False)
    return request.param


def key(i: int) -> bytes:
    return xxhash.xxh3_128_digest(i.to_bytes(8, "little"))


def key_homed_at(entry: int, entries: int, start: int = 0) -> bytes:
    """A key whose home entry is `entry` (to build collisions and wrap-arounds on purpose)."""
    i = start
    while (int.from_bytes(key(i)[:8], "little") & (entries - 1)) != entry:
        i += 1
    return key(i)


def make_table(entries: int = 64, slots: int = 4) -> tuple[LookupTable, mmap.mmap]:
    m = mmap.mmap(-1, table_bytes(entries, slots))
    return LookupTable(memoryview(m), entries, slots), m


def reader(m: mmap.mmap, table: LookupTable, ns: int = 1, final_miss: bool = True) -> TableReader:
    return TableReader(m, ns, table.claim_slot(99), final_miss)


# ------------------------------------------------------------------------------ the table alone


def test_sizes() -> None:
    assert table_entries(1 << 30) == 32768  # 2 x (1 GiB / 64 KiB)
    assert table_entries(1 << 20) == 4096  # the floor
    assert table_entries(1 << 50) == 4 << 20  # the ceiling: 128 MiB of entries
    assert table_entries(0, setting=1000) == 1024  # a setting is rounded up to a power of two
    assert table_bytes(4096, 8) % mmap.PAGESIZE == 0
    # room for disk pages too: one entry per 256 KiB of disk, within the same ceiling
    assert table_entries(1 << 30, disk_capacity=16 << 30) == 131072  # 32768 + 65536, rounded up
    assert table_entries(1 << 30, disk_capacity=1 << 50) == 4 << 20
    assert table_entries(1 << 30, setting=1000, disk_capacity=16 << 30) == 1024  # a setting wins


def test_hits_are_the_longest_prefix_in_the_namespace() -> None:
    t, m = make_table()
    keys = [key(i) for i in range(10)]
    for k in keys[:6]:
        t.put(k, 1)
    r = reader(m, t)
    assert r.usable()
    assert r.probe(keys) == (6, True)
    assert r.probe(keys[:4]) == (4, True)
    t.remove(keys[2])
    assert r.probe(keys) == (2, True)
    other_ns = TableReader(m, 2, t.claim_slot(98), True)
    assert other_ns.probe(keys) == (0, True)  # the same keys, another namespace: misses


def test_collisions_wrap_around_and_tombstones_are_reused() -> None:
    t, m = make_table(entries=64)
    last = [key_homed_at(63, 64, start=s) for s in (0, 10_000, 20_000)]  # all three want entry 63
    for k in last:
        t.put(k, 1)
    r = reader(m, t)
    assert r.probe(last) == (3, True)  # found past the end of the table, from entry 0 on
    t.remove(last[0])
    assert r.probe(last[1:]) == (2, True)  # a tombstone does not end the search
    assert (t.used, t.deleted) == (2, 1)
    t.put(last[0], 1)
    assert (t.used, t.deleted) == (3, 0)  # went back into the tombstone
    assert r.probe(last) == (3, True)


def test_a_full_table_overflows_and_its_misses_are_no_longer_final() -> None:
    t, m = make_table(entries=64)
    r = reader(m, t)
    keys = [key(i) for i in range(60)]
    for k in keys:
        t.put(k, 1)
    assert t.overflow and t.used == 48  # 75% of 64: the rest were refused
    hits, final = r.probe(keys)
    assert not final and hits < 60  # the client must ask the daemon for the rest
    for k in keys[:40]:
        t.remove(k)
    assert t.rebuild_needed  # room again: rebuilding clears the overflow and the tombstones
    t.rebuild([(k, 1) for k in keys[40:]])
    assert not t.overflow and (t.used, t.deleted) == (20, 0)
    assert r.probe(keys[40:]) == (20, True)


def test_disk_entries_are_hits_with_their_tier_and_counted_apart() -> None:
    t, m = make_table(entries=256)
    keys = [key(i) for i in range(10)]
    for k in keys[:4]:
        t.put(k, 1)
    for k in keys[4:8]:
        t.put(k, 1, TIER_DISK)
    slot = t.claim_slot(7)
    assert slot is not None
    r = TableReader(m, 1, slot, final_miss=True)
    assert r.probe(keys) == (8, True)
    assert r.last_tiers == bytes([TIER_DRAM] * 4 + [TIER_DISK] * 4)
    assert t.tally(slot) == (1, 10, 8) and t.disk_hits(slot) == 4 and t.vram_hits(slot) == 0
    # the disk pages are not touched as DRAM pages: the ring names entries, the manager filters
    assert set(t.touched(slot)) == set(keys[:8])
    # a page promoted from disk: its tier byte changes in place, the entry stays
    assert t.set_tier(keys[4], TIER_DRAM)
    assert r.probe(keys[:5]) == (5, True) and r.last_tiers is None
    assert t.disk_used == 3 and m[32] == 1  # still entries off DRAM: probes read tier bytes
    for k in keys[5:8]:
        t.remove(k)
    assert t.disk_used == 0 and m[32] == 0
    assert r.probe(keys) == (5, True) and r.last_tiers is None
    t.put(keys[0], 1, TIER_VRAM)
    t.put(keys[1], 1, TIER_DISK)
    assert r.probe(keys[:3]) == (3, True)
    assert r.last_tiers == bytes([TIER_VRAM, TIER_DISK, TIER_DRAM])
    assert (t.vram_hits(slot), t.disk_hits(slot)) == (1, 5)


def test_batched_probe_answers_as_a_key_by_key_model_does() -> None:
    """The probe checks keys at their home entry in one batch and goes on key by key from the first
    that is not there: over random tables full of collisions, tombstones, other namespaces and tiers,
    its answer (hits, tiers, touches leaf first) is the one a plain dictionary gives."""
    import random

    rng = random.Random(7)
    for round_ in range(60):
        entries = rng.choice([64, 128, 1024])
        t, m = make_table(entries=entries)
        slot = t.claim_slot(5)
        assert slot is not None
        r = TableReader(m, 1, slot, final_miss=True)
        pool = [key(round_ * 1000 + i) for i in range(40)]
        pool += [
            key_homed_at(rng.randrange(4), entries, start=round_ * 100_000 + j * 10_000) for j in range(6)
        ]
        held: dict[bytes, tuple[int, int]] = {}
        for k in pool:
            if rng.random() < 0.7 and len(held) < entries // 2:
                ns, tier = rng.choice([1, 1, 1, 2]), rng.choice([TIER_DRAM, TIER_DRAM, TIER_DISK, TIER_VRAM])
                assert t.put(k, ns, tier)
                held[k] = (ns, tier)
        for k in rng.sample(sorted(held), len(held) // 5):
            t.remove(k)
            del held[k]
        for _ in range(20):
            keys = rng.sample(pool, rng.randint(1, 24))
            if rng.random() < 0.5:  # a prefix of held keys, the usual shape
                ours = [k for k in pool if held.get(k, (0, 0))[0] == 1]
                keys = rng.sample(ours, min(len(ours), rng.randint(0, 20))) + keys
            want = 0
            while want < len(keys) and held.get(keys[want], (0, 0))[0] == 1:
                want += 1
            t.touched(slot)
            assert r.probe(keys) == (want, True)
            tiers = bytes(held[k][1] for k in keys[:want])
            assert r.last_tiers == (None if tiers == bytes([TIER_DRAM]) * want else tiers)
            assert t.touched(slot) == keys[:want][::-1][:RING_ENTRIES]


def test_keys_of_another_length_or_type_are_refused_before_anything_is_counted() -> None:
    """The client asks the daemon then, which says what is wrong: the probe must neither answer nor
    count such a lookup (it would be counted twice), wherever the bad key is."""
    t, m = make_table()
    keys = [key(i) for i in range(4)]
    for k in keys:
        t.put(k, 1)
    slot = t.claim_slot(7)
    assert slot is not None
    r = TableReader(m, 1, slot, True)
    joined = b"".join(keys)
    bad_lengths = [
        [joined[:8], joined[8:32], *keys[2:]],  # the same bytes cut otherwise: 8 + 24 + 16 + 16
        [joined[:12], *keys[1:]],
        [*keys[:3], keys[3] + b"x"],  # the last one long
        [*keys[:3], b""],
    ]
    for bad in bad_lengths:
        with pytest.raises(ValueError, match="16 bytes"):
            r.probe(bad)
    for bad_type in (["not bytes"], [*keys[:2], 12345], [None], [keys[0], "x" * 16]):
        with pytest.raises(TypeError):
            r.probe(bad_type)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        r.probe(12345)  # type: ignore[arg-type]
    assert t.tally(slot) == (0, 0, 0) and t.touched(slot) == []
    # bytes-like keys are keys: the same answer as bytes
    assert r.probe([bytearray(k) for k in keys[:2]] + [memoryview(k) for k in keys[2:]]) == (4, True)
    assert r.probe(tuple(keys)) == (4, True) and r.probe([]) == (0, True)
    assert t.tally(slot) == (3, 8, 8) and t.touched(slot) == keys[::-1] * 2


def test_a_sessions_misses_become_final_when_the_daemon_says_so() -> None:
    t, m = make_table()
    keys = [key(i) for i in range(4)]
    t.put(keys[0], 1)
    slot = t.claim_slot(7)
    assert slot is not None
    r = TableReader(m, 1, slot, final_miss=False)  # the hello reply: disk pages not listed yet
    assert r.probe(keys) == (1, False)
    t.set_final(slot, True)  # listed since
    assert r.probe(keys) == (1, True)
    t.set_incomplete(True)  # a rebuild is putting disk entries back: no miss is final meanwhile
    assert r.probe(keys) == (1, False)
    assert r.probe(keys[:1]) == (1, True)  # a whole hit needs nothing more
    t.set_incomplete(False)
    assert r.probe(keys) == (1, True)
    t.set_final(slot, False)
    assert r.probe(keys) == (1, False)


def test_a_rebuild_finds_the_disk_entries_in_the_table() -> None:
    t, m = make_table(entries=64)
    keys = [key(i) for i in range(20)]
    for i, k in enumerate(keys):
        t.put(k, 1 + i % 2, TIER_DISK if i % 3 == 0 else TIER_DRAM)
    t.remove(keys[3])
    assert sorted(t.entries_in(TIER_DISK)) == sorted(
        (k, 1 + i % 2) for i, k in enumerate(keys) if i % 3 == 0 and i != 3
    )  # live disk entries only (keys[3] was removed), each with its namespace
    t.rebuild([(k, 1) for k in keys[:2]], incomplete=True)
    r = reader(m, t)
    assert r.probe(keys[:3]) == (2, False)  # incomplete: the miss is not final
    assert t.disk_used == 0 and m[32] == 0


def test_liveness_closed_or_stale_tables_are_not_used() -> None:
    t, m = make_table()
    r = reader(m, t)
    assert r.usable()
    t.close()
    assert not r.usable()
    t2, m2 = make_table()
    r2 = reader(m2, t2)
    # a heartbeat from STALE_NS ago: the daemon stopped keeping the table (crashed, or stopped)
    m2[16:24] = (time.monotonic_ns() - STALE_NS - 1).to_bytes(8, "little")
    assert not r2.usable()
    t2.heartbeat()
    assert r2.usable()


def test_a_miss_is_not_final_when_the_table_closed_during_the_probe() -> None:
    """A rebuild (or a stop) closes the table before it empties it: a probe that began while it was
    open and found nothing must not call the miss final, the engine asks the daemon instead."""
    t, m = make_table()
    t.put(key(1), 1)
    r = reader(m, t)
    assert r.usable() and r.probe([key(1), key(2)]) == (1, True)
    t.close()  # between the engine's usable() and its probe
    assert r.probe([key(1), key(2)]) == (1, False)
    assert r.probe([key(1)]) == (1, True)  # a full hit needs no final word


def test_tally_and_touches_reach_the_daemon_leaf_first() -> None:
    t, m = make_table()
    keys = [key(i) for i in range(5)]
    for k in keys[:3]:
        t.put(k, 1)
    slot = t.claim_slot(7)
    assert slot is not None
    r = TableReader(m, 1, slot, final_miss=True)
    r.probe(keys)  # 3 hits, a final miss: one whole lookup
    assert t.tally(slot) == (1, 5, 3)
    assert t.touched(slot) == [keys[2], keys[1], keys[0]]  # leaf first: the root becomes the newest
    assert t.touched(slot) == []
    r_not_final = TableReader(m, 1, slot, final_miss=False)
    r_not_final.probe(keys)  # goes on over the socket: only the pages so far are counted here
    assert t.tally(slot) == (1, 8, 6)
    many = [key(100 + i) for i in range(RING_ENTRIES + 10)]
    t2, m2 = make_table(entries=1024)
    for k in many:
        t2.put(k, 1)
    s2 = t2.claim_slot(8)
    assert s2 is not None
    TableReader(m2, 1, s2, True).probe(many)
    touched = t2.touched(s2)
    assert len(touched) == RING_ENTRIES and touched[-1] == many[0]  # the newest ring-full, root last


def test_touches_wrap_around_the_ring_and_the_daemon_reads_the_newest() -> None:
    """Probes of many sizes, some longer than the ring, read by the daemon now and then: it reads
    the newest ring-full of the hits in order (each probe's leaf first), across the ring's end."""
    t, m = make_table(entries=1024)
    held = [key(2000 + i) for i in range(600)]
    for k in held:
        t.put(k, 1)
    slot = t.claim_slot(7)
    assert slot is not None
    r = TableReader(m, 1, slot, True)
    stream: list[bytes] = []  # every touch, in the order the ring gets them
    read = 0
    for i, n in enumerate([100, 37, 250, 5, 240, 241, 1, 239, 480, 17, 90, 0, 3]):
        start = (i * 41) % 100
        assert r.probe(held[start : start + n] + [key(1)]) == (n, True)
        stream += held[start : start + n][::-1]
        if i % 3 == 2:  # the daemon folds touches now and then
            assert t.touched(slot) == stream[max(read, len(stream) - RING_ENTRIES) :]
            read = len(stream)
    assert t.touched(slot) == stream[max(read, len(stream) - RING_ENTRIES) :]
    assert t.tally(slot) == (
        13,
        sum([100, 37, 250, 5, 240, 241, 1, 239, 480, 17, 90, 0, 3]) + 13,
        len(stream),
    )


def test_the_probe_is_chosen_by_what_is_installed_and_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t, m = make_table()
    monkeypatch.setenv(PURE_PYTHON_ENV, "1")
    assert not lookup_table.compiled_probe() and not reader(m, t).compiled
    monkeypatch.setenv(PURE_PYTHON_ENV, "0")
    assert lookup_table.compiled_probe() == COMPILED and reader(m, t).compiled == COMPILED
    assert not TableReader(m, 1, 0, True, compiled=False).compiled
    monkeypatch.setattr(lookup_table, "_probe", None)  # installed without a compiler
    monkeypatch.delenv(PURE_PYTHON_ENV)
    assert not lookup_table.compiled_probe() and not reader(m, t).compiled
    with pytest.raises(ImportError, match="not installed"):
        TableReader(m, 1, 0, True, compiled=True)


def test_a_closed_reader_refuses_to_probe_and_lets_its_mapping_go(tmp_path) -> None:
    path, size = tmp_path / "arena", table_bytes(64, 4)
    path.write_bytes(bytes(size))
    fd = os.open(path, os.O_RDWR)
    t = LookupTable(memoryview(mmap.mmap(fd, size)), 64, 4)
    os.close(fd)
    t.put(key(1), 1)
    own = map_table(str(path), 0, size)  # the client's own mapping of the table, as EngineClient's
    r = TableReader(own, 1, t.claim_slot(1), True)  # type: ignore[arg-type]
    assert r.probe([key(1)]) == (1, True)
    r.close()
    with pytest.raises(ValueError, match="after close"):
        r.probe([key(1)])
    r.close()  # twice is fine
    own.close()  # no view of the mapping is left (BufferError otherwise)


@side_by_side
def test_both_probes_answer_count_and_touch_alike() -> None:
    """The compiled probe and the Python probe, each with a slot of its own, over the same random
    tables (collisions, wrap-around, tombstones, namespaces, tiers, final and not): the same answers,
    the same tier bytes, the same tallies and the same touches, probe after probe."""
    import random

    if not COMPILED:
        pytest.skip(NO_COMPILED)
    rng = random.Random(11)
    for round_ in range(40):
        entries = rng.choice([64, 256, 1024])
        t, m = make_table(entries=entries)
        slots = [t.claim_slot(5), t.claim_slot(6)]
        final_miss = rng.random() < 0.5
        readers = [TableReader(m, 1, s, final_miss, compiled=c) for s, c in zip(slots, (True, False))]
        assert [r.compiled for r in readers] == [True, False]
        pool = [key(round_ * 1000 + i) for i in range(60)]
        # crowd the last entries: probing from them wraps around to the first
        pool += [
            key_homed_at(entries - 1 - rng.randrange(3), entries, start=round_ * 10**5 + j * 10**4)
            for j in range(8)
        ]
        for k in pool:
            if rng.random() < 0.7 and t.used < entries // 2:
                t.put(k, rng.choice([1, 1, 1, 2]), rng.choice([TIER_DRAM, TIER_DRAM, TIER_DISK, TIER_VRAM]))
        for k in rng.sample(pool, 12):
            t.remove(k)
        for _ in range(30):
            keys = rng.sample(pool, rng.randint(0, 40))
            if rng.random() < 0.2:  # the daemon lists the namespace's disk pages (or a rebuild starts)
                final = rng.random() < 0.5
                for s in slots:
                    t.set_final(s, final)
            if rng.random() < 0.1:
                t.set_incomplete(not t.incomplete)
            answers = []
            for r in readers:
                got = r.probe(keys)
                answers.append((got, r.last_tiers))
            assert answers[0] == answers[1], keys
            (a, b) = slots
            assert (t.tally(a), t.vram_hits(a), t.disk_hits(a)) == (
                t.tally(b),
                t.vram_hits(b),
                t.disk_hits(b),
            )
            assert t.touched(a) == t.touched(b)


def test_session_slots_run_out_and_come_back() -> None:
    t, _m = make_table(slots=2)
    a, b = t.claim_slot(1), t.claim_slot(2)
    assert {a, b} == {0, 1} and t.claim_slot(3) is None  # that session asks the socket
    t.release_slot(a)  # type: ignore[arg-type]
    assert t.claim_slot(4) == a


def _churn(path: str, size: int, entries: int, seconds: float) -> None:
    """Writer process: keys 0..199 stay (their live entries rewritten in place, changing tier, as a
    page moving between DRAM and disk does), keys 1000.. come and go as fast as Python can write."""
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, size)
    os.close(fd)
    t = LookupTable(memoryview(m), entries, 1, clear=False)  # the table the test created
    t.used = 200
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        k = key(1000 + i % 300)
        if (i // 300) % 2 == 0:
            t.put(k, 1)
        else:
            t.remove(k)
        t.put(key(i % 200), 1, TIER_DISK if i % 400 < 200 else TIER_DRAM)
        i += 1
    t.words.release()


def test_a_reader_racing_a_writer_never_misses_a_stable_key_nor_hits_a_foreign_one(tmp_path) -> None:
    entries = 1024
    path = tmp_path / "table"
    size = table_bytes(entries, 1)
    path.write_bytes(bytes(size))
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, size)
    os.close(fd)
    t = LookupTable(memoryview(m), entries, 1)
    stable = [key(i) for i in range(200)]
    for k in stable:
        t.put(k, 1)
    never = [key(10**6 + i) for i in range(50)]
    r = TableReader(m, 1, t.claim_slot(1), True)  # type: ignore[arg-type]
    writer = multiprocessing.get_context("spawn").Process(target=_churn, args=(str(path), size, entries, 1.5))
    writer.start()
    try:
        probes = 0
        while writer.is_alive() or probes < 50:
            for i in range(0, 200, 20):
                assert r.probe(stable[i : i + 20])[0] == 20
            assert r.probe(never)[0] == 0
            assert r.probe([never[probes % 50]] + stable[:3])[0] == 0
            probes += 1
            t.heartbeat()
    finally:
        writer.join(10)
    assert writer.exitcode == 0 and probes > 50


# ------------------------------------------------------------------------------ the manager keeps it true


SEED = bytes(range(32))  # the page-key seed of DiskRig's manager


class DiskRig:
    """In-process: a Manager with a real disk tier and a lookup table, made on a running event loop
    (as in the daemon); probes are an engine's (a TableReader over the same memory)."""

    def __init__(self, tmp_path, entries: int = 1024) -> None:
        slab = 1 << 20
        cfg = load_config(env={}, overrides={"dram.capacity": str(slab), "dram.slab_bytes": str(slab)})
        self.disk = DiskTier(tmp_path / "pages", 64 << 20)
        self.disk.open()
        self.mem = memoryview(bytearray(table_bytes(entries, 4)))
        self.table = LookupTable(self.mem, entries, 4)
        self.executor = concurrent.futures.ThreadPoolExecutor(2)
        self.m = Manager(
            cfg,
            memoryview(bytearray(slab)),
            SlabAllocator(slab, slab),
            self.disk,
            self.executor,
            table=self.table,
            seed=SEED,
        )

    def reader(self, session) -> TableReader:
        return TableReader(self.mem, session.ns.id, session.table_slot, final_miss=False)

    async def settle(self) -> None:
        """Until listings and disk writes are done, and disk removals reached the loop."""
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not self.m._table_tasks and not self.m._disk_writes:
                return
        raise AssertionError("the manager did not settle")

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        self.executor.shutdown()
        self.disk.close()


def test_the_manager_keeps_disk_entries_true(tmp_path) -> None:
    keys = [key(500 + i) for i in range(4)]
    absent = [key(600)]

    async def run() -> None:
        rig = DiskRig(tmp_path)
        m, disk = rig.m, rig.disk
        s = m.attach(TEST_NS, "engine")
        r = rig.reader(s)
        await rig.settle()  # the (empty) listing of the namespace: its misses are final from now on
        manager_store(m, s, keys)
        assert r.probe(keys + absent) == (4, True) and r.last_tiers is None
        m.evict_prefixes([keys[2]])  # keys 2, 3 leave DRAM: queued for disk, still hits at once
        assert r.probe(keys + absent) == (4, True)
        assert r.last_tiers == bytes([TIER_DRAM] * 2 + [TIER_DISK] * 2)
        await m.flush()
        assert r.probe(keys + absent) == (4, True) and r.last_tiers == bytes([2, 2, 4, 4])
        m.fold_thread_lookups()
        c = m.counters
        assert (c["hit_pages_dram"], c["hit_pages_disk"], c["miss_pages"], c["table_lookups"]) == (8, 4, 3, 3)

        real_put = disk.put
        disk.put = lambda *a, **k: False  # the next disk write fails (full, or an I/O error)
        m.evict_prefixes([keys[1]])
        assert r.probe(keys) == (4, True)  # queued: a hit
        await m.flush()
        disk.put = real_put
        assert r.probe(keys) == (1, True)  # dropped: the page is nowhere, a final miss

        await rig.off_loop(disk.remove, keys[3])  # on another thread, as the disk tier's evictions
        await rig.settle()
        assert r.probe(keys[2:]) == (1, True) and r.last_tiers == bytes([TIER_DISK])
        # a page READY in DRAM keeps its entry when its disk copy goes
        loaded = await m.load(s, keys[2:3])
        assert loaded[1] == [Tier.DISK]
        m.release(s, loaded[2])  # type: ignore[arg-type]
        assert r.probe(keys[2:3]) == (1, True) and r.last_tiers is None
        await rig.off_loop(disk.remove, keys[2])
        await rig.settle()
        assert r.probe(keys[2:3]) == (1, True) and r.last_tiers is None
        # ... and, its disk copy gone, is written again when it leaves DRAM (not dropped)
        assert m.evict_prefixes([keys[2]])["evicted_pages"] == 1
        await m.flush()
        assert disk.entry(keys[2]) is not None
        assert r.probe(keys[2:3]) == (1, True) and r.last_tiers == bytes([TIER_DISK])
        rig.close()

    asyncio.run(run())


def test_disk_pages_of_an_earlier_run_are_listed_and_a_rebuild_puts_them_back(tmp_path) -> None:
    from polarkvd.keys import namespace_digest

    on_disk = [key(700 + i) for i in range(40)]
    earlier = DiskTier(tmp_path / "pages", 64 << 20)
    earlier.open()
    for k in on_disk:  # written by an earlier daemon
        earlier.put(k, None, namespace_digest(TEST_NS, SEED), bytes(TEST_NS.page_bytes), 2)
    earlier.close()

    async def run() -> None:
        rig = DiskRig(tmp_path, entries=64)  # takes 48 entries: the 40 pages, a few tombstones
        m, table = rig.m, rig.table
        s = m.attach(TEST_NS, "engine")
        r = rig.reader(s)
        assert r.probe(on_disk) == (0, False)  # not listed yet: not final
        await rig.settle()
        assert r.probe(on_disk + [key(1)]) == (40, True) and table.disk_used == 40
        for k in on_disk[:20]:  # tombstones past a quarter of the table: a rebuild is due
            await rig.off_loop(rig.disk.remove, k)
        await rig.settle()
        assert table.rebuild_needed and table.deleted == 20
        m.apply_table_touches()  # rebuilds: DRAM pages at once, the disk entries in batches
        assert table.deleted == 0 and r.probe(on_disk[20:] + [key(1)])[1] is False  # refilling
        await rig.settle()
        assert r.probe(on_disk[20:] + [key(1)]) == (20, True)  # all back, and the miss final again
        assert r.probe(on_disk[:1]) == (0, True)
        rig.close()

    asyncio.run(run())


# ------------------------------------------------------------------------------ with a daemon


def test_lookups_come_from_the_table_even_while_the_daemon_sleeps(daemon_factory) -> None:
    """A stopped daemon does not stall lookups at once (no round trip); after STALE_NS the client
    stops trusting the table and the socket tells it the daemon is not answering."""
    d = daemon_factory({"disk.enabled": "false"})
    with d.engine(engine_id="writer") as kv:
        keys = store_chain(kv, chain_tokens(11, 6))
    looker = EngineClient(TEST_NS, "looker", d.engine_socket, timeout=1.0, map_arena=False)
    assert looker.lookup(keys).tiers == [Tier.DRAM] * 6
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        assert looker.lookup(keys).hits == 6  # answered in-process: the daemon is stopped
        time.sleep(STALE_NS / 1e9 + 0.2)
        with pytest.raises(DaemonUnavailable):
            looker.lookup(keys)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    looker.close()


def test_a_killed_daemon_is_not_answered_for_by_its_table(daemon_factory) -> None:
    d = daemon_factory({"disk.enabled": "false"})
    kv = d.engine(engine_id="writer")
    keys = store_chain(kv, chain_tokens(12, 4))
    assert kv.lookup(keys).hits == 4
    d.kill()
    time.sleep(STALE_NS / 1e9 + 0.2)
    with pytest.raises(DaemonUnavailable):
        kv.lookup(keys)
    kv.close()
    d.start()  # a new daemon, an empty DRAM tier: the new table says so
    with d.engine(engine_id="again") as kv2:
        assert kv2.lookup(keys).hits == 0


def test_a_stopping_daemon_closes_its_table(daemon_factory) -> None:
    d = daemon_factory({"disk.enabled": "false"})
    kv = d.engine(engine_id="writer")
    keys = store_chain(kv, chain_tokens(13, 4))
    assert kv.lookup(keys).hits == 4
    d.stop()
    with pytest.raises(DaemonUnavailable):  # at once, not after STALE_NS
        kv.lookup(keys)
    kv.close()


def lookup_counts(d) -> tuple[int, int, float]:
    """(lookups counted, of them answered from the shared table, lookups that reached the daemon's
    engine socket: its op histogram's count)."""
    c = d.stats()["counters"]
    url = re.findall(r"metrics_url=(\S+)", d.log())[-1]  # the daemon's latest start
    _, samples = scrape(url)
    timed = samples.get(("polarkv_engine_op_duration_seconds_count", (("op", "lookup"),)), 0.0)
    return c.get("lookups", 0), c.get("table_lookups", 0), timed


def wait_written(d) -> None:
    wait_for(lambda: d.stats()["tiers"]["disk"]["pending_pages"] == 0, what="disk writes")


def test_with_a_disk_tier_dram_disk_and_miss_are_answered_without_the_daemon(daemon_factory) -> None:
    d = daemon_factory({"dram.capacity": "4MiB"})
    with d.engine(engine_id="writer") as kv, d.control() as ctl:
        keys = store_chain(kv, chain_tokens(14, 8))
        absent = kv.page_keys(chain_tokens(114, 2))  # never stored: the request's new tokens
        ctl.evict_keys([keys[4]])  # the last 4 pages leave DRAM for the disk (queued, then written)
        want = [Tier.DRAM] * 4 + [Tier.DISK] * 4
        before, c0 = lookup_counts(d), d.stats()["counters"]
        assert kv.lookup(keys + absent).tiers == want  # the disk pages are still hits, at once
        wait_written(d)
        assert kv.lookup(keys + absent).tiers == want
        after, c1 = lookup_counts(d), d.stats()["counters"]
        assert after[0] - before[0] == 2 and after[1] - before[1] == 2  # both from the table...
        assert after[2] == before[2]  # ...and the daemon's socket served no lookup
        delta = {k: c1.get(k, 0) - c0.get(k, 0) for k in ("hit_pages_dram", "hit_pages_disk", "miss_pages")}
        assert delta == {"hit_pages_dram": 8, "hit_pages_disk": 8, "miss_pages": 4}
        # the control: a client without the table asks the socket, and the socket counter moves
        with d.engine(engine_id="no-table", lookup_table=False) as plain:
            assert plain.lookup(keys + absent).tiers == want
        assert lookup_counts(d)[2] == after[2] + 1

        ctl.evict("dram", 1 << 40)  # every DRAM page to disk: hits still, with tier DISK
        wait_written(d)
        assert kv.lookup(keys + absent).tiers == [Tier.DISK] * 8
        r = kv.load(keys)
        assert r.loaded == 8  # promoted back: DRAM hits again
        kv.release(r.lease)  # type: ignore[arg-type]
        assert kv.lookup(keys).tiers == [Tier.DRAM] * 8

        ctl.evict("dram", 1 << 40)
        wait_written(d)
        ctl.evict("disk", 1 << 40)  # the operator deletes the disk pages: misses, from the table
        wait_for(lambda: kv.lookup(keys).hits == 0, what="deleted disk pages to leave the table")
        before = lookup_counts(d)
        assert kv.lookup(keys + absent).hits == 0
        after = lookup_counts(d)
        assert after[1] - before[1] == 1 and after[2] == before[2]
        st = d.stats()
        assert st["tiers"]["disk"]["pages"] == 0 and st["tiers"]["dram"]["lookup_table"]["used"] == 0
    log = d.log()
    assert "Traceback" not in log and "failed" not in log, log


def test_a_restarted_daemon_lists_the_old_disk_pages_when_their_engine_attaches(daemon_factory) -> None:
    d = daemon_factory({"dram.capacity": "4MiB"})
    with d.engine(engine_id="writer") as kv, d.control() as ctl:
        keys = store_chain(kv, chain_tokens(17, 6))
        ctl.evict("dram", 1 << 40)
        wait_written(d)
    assert d.stop() == 0
    d.start()  # same disk tier, a new table: empty until a namespace's engine attaches
    salted = dataclasses.replace(TEST_NS, cache_salt="tenant-b")
    with d.engine(salted, engine_id="other") as other:
        assert other.lookup(keys).hits == 0  # not its namespace's pages (as over the socket)
    assert d.stats()["tiers"]["dram"]["lookup_table"]["used"] == 0  # nor listed for it
    with d.engine(engine_id="again") as kv:
        # listed off the loop once the namespace is known; its misses turn final when done
        wait_for(lambda: kv.lookup(keys).tiers == [Tier.DISK] * 6, what="the old disk pages listed")
        absent = kv.page_keys(chain_tokens(117, 1))
        before = lookup_counts(d)
        assert kv.lookup(keys + absent).tiers == [Tier.DISK] * 6
        after = lookup_counts(d)
        assert after[1] - before[1] == 1 and after[2] == before[2]  # no round trip
        assert d.stats()["tiers"]["dram"]["lookup_table"]["used"] == 6
        r = kv.load(keys)
        assert r.loaded == 6
        kv.release(r.lease)  # type: ignore[arg-type]


def test_other_namespaces_pins_and_bad_keys_go_by_the_rules(daemon_factory) -> None:
    d = daemon_factory({"disk.enabled": "false"})
    salted = dataclasses.replace(TEST_NS, cache_salt="tenant-b")
    with d.engine(engine_id="a") as a, d.engine(salted, engine_id="b") as b:
        keys = store_chain(a, chain_tokens(15, 4))
        assert b.lookup(keys).hits == 0  # another namespace's keys: a miss, as over the socket
        pinned = a.lookup(keys, pin=True)  # a lease is the daemon's business: over the socket
        assert pinned.hits == 4 and pinned.lease is not None
        a.release(pinned.lease)
        with pytest.raises(PolarKVError, match="16 bytes"):
            a.lookup(keys[:2] + [b"short"])
        with pytest.raises(PolarKVError, match="16 bytes"):
            a.lookup(["not bytes"])  # type: ignore[list-item]
    st = d.stats()
    assert st["leases"] == 0


def test_a_tiny_table_overflows_and_lookups_stay_right(daemon_factory) -> None:
    d = daemon_factory({"disk.enabled": "false", "dram.lookup_table_entries": "16"})
    with d.engine(engine_id="writer") as kv:
        keys = store_chain(kv, chain_tokens(16, 40))  # more pages than the table has entries
        assert kv.lookup(keys).tiers == [Tier.DRAM] * 40  # the rest came over the socket
        st = d.stats()
        c = st["counters"]
        assert c["lookups"] == 1 and c["lookup_pages"] == 40 and c["hit_pages_dram"] == 40
        assert st["tiers"]["dram"]["lookup_table"] == {"entries": 16, "used": 12, "deleted": 0, "full": True}
    assert "raise dram.lookup_table_entries" in d.log()  # the operator is told what to do, once
    assert d.log().count("the shared lookup table is full") == 1
    out = subprocess.run(
        [sys.executable, "-m", "polarkvd", "status", "--socket", str(d.control_socket)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "lookup table: 12 of 16 entries" in out.stdout and "FULL" in out.stdout


def test_a_full_table_under_churn_asks_for_a_rebuild_only_when_one_frees_room() -> None:
    """More pages than entries (small pages, a table sized for bigger ones) and an arena evicting a
    page per store: a rebuild per eviction used to take nearly all of the daemon's CPU (87% under
    `polarkvd bench page-sizes`, pings waiting 50 ms). Now a rebuild is asked for once tombstones
    are an eighth of the table: at most one per that many evictions."""
    t, _ = make_table(entries=256)
    held = [key(i) for i in range(300)]  # the daemon's pages: more than the table lists
    for k in held:
        t.put(k, 1)
    assert t.overflow
    rebuilds, steps = 0, 600
    for i in range(steps):  # evict the oldest page, store a new one: a full arena's steady state
        t.remove(held.pop(0))
        held.append(key(1000 + i))
        t.put(held[-1], 1)
        if t.rebuild_needed:  # what the daemon does (TableUpkeep.rebuild_table): every page again
            rebuilds += 1
            t.rebuild([(k, 1) for k in held])
    assert rebuilds <= steps // (256 // 8) + 1, rebuilds


def test_a_rebuild_puts_ready_pages_back_in_batches_and_never_one_evicted_meanwhile(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebuild lists the first LIST_BATCH READY pages at once and the rest a batch per turn of the
    loop (the table incomplete meanwhile: no miss is final), so a big DRAM tier does not stall the
    loop; a page evicted between two batches does not come back as a DRAM entry."""
    monkeypatch.setattr(table_upkeep, "LIST_BATCH", 4)

    async def run() -> None:
        rig = DiskRig(tmp_path, entries=256)
        m, table = rig.m, rig.table
        s = m.attach(TEST_NS, "engine")
        keys = [bytes(k) for k in page_keys(s.ns.digest, chain_tokens(5, 12), TEST_NS.page_tokens)]
        manager_store(m, s, keys)
        await rig.settle()
        m.table_upkeep.rebuild_table()
        assert table.used == 4 and rig.reader(s).probe(keys)[1] is False  # one batch; misses not final
        m.evict_prefixes([keys[-1]])  # a leaf leaves DRAM (for disk) while the rest is going back
        await rig.settle()
        assert not m._refilling and not table.incomplete
        in_dram = {k for k, _ in table.entries_in(TIER_DRAM)}
        assert in_dram == set(keys[:-1])
        rig.close()

    asyncio.run(run())

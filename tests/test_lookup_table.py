"""The shared lookup table (polarkvd/lookup_table.py): engines answer lookups themselves from the
daemon's DRAM index in shared memory — same answers as the socket, counted and touched the same,
never answering for a daemon that stopped keeping it, never reporting a key it does not hold."""

from __future__ import annotations

import dataclasses
import mmap
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import xxhash

from polarkvd.client import EngineClient
from polarkvd.errors import DaemonUnavailable, PolarKVError
from polarkvd.lookup_table import (
    RING_ENTRIES,
    STALE_NS,
    LookupTable,
    TableReader,
    table_bytes,
    table_entries,
)
from polarkvd.types import Tier
from tests.conftest import TEST_NS, chain_tokens, store_chain, wait_for


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


def test_session_slots_run_out_and_come_back() -> None:
    t, _m = make_table(slots=2)
    a, b = t.claim_slot(1), t.claim_slot(2)
    assert {a, b} == {0, 1} and t.claim_slot(3) is None  # that session asks the socket
    t.release_slot(a)  # type: ignore[arg-type]
    assert t.claim_slot(4) == a


def _churn(path: str, size: int, entries: int, seconds: float) -> None:
    """Writer process: keys 0..199 stay, keys 1000.. come and go as fast as Python can write."""
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
        i += 1


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


def test_the_table_follows_evictions_and_the_socket_finds_the_disk_pages(daemon_factory) -> None:
    d = daemon_factory({"dram.capacity": "4MiB"})
    with d.engine(engine_id="writer") as kv, d.control() as ctl:
        keys = store_chain(kv, chain_tokens(14, 8))
        assert kv.lookup(keys).tiers == [Tier.DRAM] * 8
        ctl.evict_keys([keys[4]])  # the last 4 pages leave DRAM for the disk
        wait_for(lambda: kv.lookup(keys).tiers == [Tier.DRAM] * 4 + [Tier.DISK] * 4, what="disk hits")
        r = kv.load(keys)
        assert r.loaded == 8  # promoted back
        kv.release(r.lease)  # type: ignore[arg-type]
        assert kv.lookup(keys).tiers == [Tier.DRAM] * 8


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

"""Crashes (docs/ARCHITECTURE.md, reliability rules): a killed engine leaks nothing, a silent one loses its leases, and a killed
daemon comes back with its disk pages intact and verified, never serving a corrupt one."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from polarkvd.errors import ErrorCode, PageNotFound, PolarKVError
from polarkvd.keys import page_keys
from polarkvd.tiers.disk import HEADER_SIZE
from polarkvd.types import Tier
from tests.conftest import (
    TEST_NS,
    bad_pages,
    chain_tokens,
    make_manager,
    page_bytes_for,
    store_chain,
    wait_for,
)


def dram(daemon) -> dict:  # type: ignore[no-untyped-def]
    return daemon.stats()["tiers"]["dram"]


def test_engine_killed_between_reserve_and_commit(daemon, engine_procs) -> None:
    tokens = chain_tokens(1, 4)
    victim = engine_procs(daemon.engine_socket, [["reserve", tokens], ["hang"]], engine_id="doomed")
    offsets = victim.expect("reserved")["offsets"]
    assert len(offsets) == 4 and min(offsets) >= 0
    victim.expect("hanging")
    with daemon.engine(engine_id="survivor") as kv:
        keys = kv.page_keys(tokens)
        assert dram(daemon)["reserved_pages"] == 4
        assert kv.lookup(keys).hits == 0 and kv.load(keys).loaded == 0  # half-written: invisible
        victim.kill()
        wait_for(
            lambda: dram(daemon)["reserved_pages"] == 0, what="the dead engine's reservations to be aborted"
        )
        d = dram(daemon)
        assert d["slot_bytes_used"] == 0 and d["pages"] == 0  # its slots came back
        assert kv.lookup(keys).hits == 0
        # the same keys can be stored again, and what is read back is the new writer's bytes
        r = kv.store(keys, [page_bytes_for(k, kv.page_bytes) for k in keys])
        assert r.stored == 4 and r.existing == 0
        got = kv.load(keys)
        assert got.loaded == 4 and bad_pages(kv, keys, got.views) == []
        del got.views
        kv.release(got.lease)
    assert daemon.stats()["counters"]["aborted_pages"] == 4


def test_engine_killed_while_holding_a_lease(daemon, engine_procs) -> None:
    tokens = chain_tokens(2, 4)
    with daemon.engine(engine_id="writer") as kv:
        keys = store_chain(kv, tokens)
    holder = engine_procs(daemon.engine_socket, [["load", tokens], ["hang"]], engine_id="holder")
    assert holder.expect("loaded")["loaded"] == 4
    holder.expect("hanging")
    assert dram(daemon)["pinned_pages"] == 4
    with daemon.control() as ctl:
        assert ctl.evict("dram", 1 << 30) == 0  # pinned pages cannot be evicted
        assert dram(daemon)["pages"] == 4
        holder.kill()
        wait_for(lambda: dram(daemon)["pinned_pages"] == 0, what="the dead engine's pins to drop")
        assert ctl.evict("dram", 1 << 30) == 4 * TEST_NS.page_bytes  # evictable again
    assert dram(daemon)["pages"] == 0
    with daemon.engine() as kv:
        assert kv.lookup(keys).tiers == [Tier.DISK] * 4


def test_connected_engine_that_never_releases_loses_its_lease(daemon_factory) -> None:
    d = daemon_factory({"daemon.lease_seconds": "1s"})
    with d.engine(engine_id="forgetful") as kv:
        assert kv.lease_seconds == 1.0
        keys = store_chain(kv, chain_tokens(3, 3))
        r = kv.load(keys)
        loaded_at = time.monotonic()
        del r.views
        pending = kv.reserve(kv.page_keys(chain_tokens(4, 2)))  # a reservation it never commits
        assert all(o >= 0 for o in pending)
        assert dram(d)["pinned_pages"] == 3 and dram(d)["reserved_pages"] == 2
        wait_for(
            lambda: dram(d)["pinned_pages"] == 0 and dram(d)["reserved_pages"] == 0,
            timeout=10,
            what="lease expiry",
        )
        assert time.monotonic() - loaded_at >= 0.9  # not before lease_seconds
        with pytest.raises(PageNotFound):
            kv.release(r.lease)  # already expired
        with pytest.raises(PolarKVError) as info:
            kv.commit(kv.page_keys(chain_tokens(4, 2)))  # its reservation expired too
        assert info.value.code is ErrorCode.NOT_RESERVED
        # the session itself is fine, and the pages are evictable again
        assert kv.lookup(keys).hits == 3
        with d.control() as ctl:
            assert ctl.evict("dram", 1 << 30) == 3 * TEST_NS.page_bytes
    assert d.stats()["counters"]["expired"] >= 2


def test_lease_and_reservation_expiry_timing_with_an_injected_clock() -> None:
    """The expiry rule itself, in-process: nothing expires a moment before lease_seconds, all at it."""
    m, clock = make_manager(32, **{"daemon.lease_seconds": "30s"})
    s = m.attach(TEST_NS, "t")
    keys = page_keys(s.ns.digest, range(64), 16)
    assert all(o >= 0 for o in m.reserve(s, keys[:2], None))
    m.commit(s, keys[:2])
    _tiers, lease = m.lookup(s, keys[:2], pin=True)
    assert lease is not None
    clock.now += 10
    m.reserve(s, keys[2:], keys[1])  # reserved 10 s after the lease was taken
    clock.now += 19.75  # binary fractions: the sums below are exact
    assert m.expire() == 0 and m.stats()["tiers"]["dram"]["pinned_pages"] == 2
    clock.now += 0.25  # exactly lease_seconds after the lookup
    assert m.expire() == 1
    assert m.stats()["tiers"]["dram"]["pinned_pages"] == 0 and len(s.reserved) == 2
    clock.now += 9.75
    assert m.expire() == 0 and len(s.reserved) == 2
    clock.now += 0.25  # and lease_seconds after the reservation
    assert m.expire() == 2 and not s.reserved
    assert m.lookup(s, keys[2:])[0] == []  # the expired reservations are invisible ...
    # ... but their slots stay out of use while the (slow, still connected) engine may write into them
    assert m.allocator.used_bytes == 4 * s.ns.slot_bytes
    assert m.stats()["tiers"]["dram"]["quarantined_pages"] == 2
    with pytest.raises(PageNotFound):
        m.release(s, lease)
    m.detach(s)  # the connection closed: now nothing can write there any more
    assert m.allocator.used_bytes == 2 * s.ns.slot_bytes  # only the committed pages hold slots


def _page_files(root: Path) -> dict[bytes, Path]:
    return {bytes.fromhex(p.name[:32]): p for p in root.glob("??/*.pkv")}


def test_daemon_killed_during_a_stream_of_stores(daemon_factory, engine_procs) -> None:
    sets = {"dram.capacity": "4MiB", "disk.index_flush_seconds": "200ms"}  # 128 pages: demoting all the time
    d = daemon_factory(sets)
    writer = engine_procs(d.engine_socket, [["stream", 7, 5000, 4]], engine_id="streamer")
    disk_root = Path(d.sets["daemon.state_dir"]) / "pages"
    # Let it run until an index snapshot exists and then 100 more pages went to disk, so the restart
    # has to reconcile a stale snapshot with newer files (and whatever write the kill cut short).
    index = disk_root / "index.msgpack"
    wait_for(lambda: d.stats()["tiers"]["disk"]["pages"] >= 100, timeout=60, what="pages on disk")
    since = time.time()
    wait_for(lambda: index.exists() and index.stat().st_mtime > since, timeout=60, what="an index snapshot")
    first = d.stats()["tiers"]["disk"]["pages"]
    wait_for(lambda: d.stats()["tiers"]["disk"]["pages"] >= first + 100, timeout=60, what="pages on disk")
    d.kill()
    writer.expect("daemon_gone", timeout=30)
    writer.wait()
    written = {bytes.fromhex(k) for e in writer.events("chain") for k in e["keys"]}

    # the killed daemon's files: every one names a page the engine wrote; spoil one to prove it is caught
    files = _page_files(disk_root)
    assert len(files) >= 100 and set(files) <= written
    spoiled_key, spoiled = sorted(files.items())[0]
    raw = bytearray(spoiled.read_bytes())
    raw[HEADER_SIZE + 100] ^= 0xFF
    spoiled.write_bytes(bytes(raw))

    seen = len(d.log())
    d.start()
    log = d.log()[seen:]  # the restart's own lines
    opened = re.search(
        r"disk tier \S+: (\d+) pages .* verified in [0-9.]+s; (\d+) recovered, (\d+) dropped", log
    )
    assert opened is not None and "polarkvd ready" in log, log
    listed = d.stats()["tiers"]["disk"]["pages"]
    assert int(opened.group(1)) == listed == len(files)  # every file of the killed daemon is listed
    files = _page_files(disk_root)
    assert set(files) <= written and len(files) == listed

    served = 0
    with d.engine(engine_id="checker") as kv:
        for key in files:
            r = kv.load([key])
            if key == spoiled_key:
                assert r.loaded == 0  # corrupt on disk: dropped, never served
                continue
            assert r.loaded == 1 and r.tiers == [Tier.DISK], key.hex()
            assert np.array_equal(np.frombuffer(r.views[0], np.uint8), page_bytes_for(key, kv.page_bytes)), (
                key.hex()
            )
            served += 1
            del r.views
            kv.release(r.lease)
        assert kv.lookup([spoiled_key]).hits == 0
    assert served == len(files) - 1
    st = d.stats()
    assert st["counters"]["corrupt_pages"] == 1 and st["tiers"]["disk"]["corrupt_dropped"] == 1
    assert st["counters"]["loaded_pages_disk"] == served

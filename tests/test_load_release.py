"""`load` with `release` and `serial`: what a load in batches beside a computing engine asks for.

The connector's background loads (polarkvd/connectors/vllm/background.py) copy a batch out, then ask
for the next one with the first batch's lease in `release`: one daemon round trip per batch. The
lease must be gone after that call, the new pages pinned, and a lease the daemon no longer holds must
fail the whole call (the copies made under it may be stale) with nothing loaded. With `serial` the
daemon reads the batch's disk pages one after another on one I/O thread.
"""

from __future__ import annotations

import asyncio

import pytest

from polarkvd.errors import LeaseExpired, ProtocolError
from polarkvd.index import READY
from polarkvd.types import Tier
from tests.conftest import TEST_NS, bad_pages, chain_tokens, page_bytes_for, store_chain, wait_for
from tests.test_pipeline import _disk_manager, _pages_on_disk


def _pinned(daemon) -> int:
    return daemon.stats()["tiers"]["dram"]["pinned_pages"]


def test_a_load_releases_the_batch_before_in_the_same_call(daemon) -> None:
    with daemon.engine() as kv:
        keys = store_chain(kv, chain_tokens(41, 4))
        with daemon.control() as ctl:
            ctl.evict("dram", 1 << 40)  # on disk: every batch is a promotion
        wait_for(lambda: daemon.stats()["tiers"]["disk"]["pages"] == 4, what="the pages on disk")
        first = kv.load(keys[:2])
        assert first.tiers == [Tier.DISK, Tier.DISK] and bad_pages(kv, keys[:2], first.views) == []
        del first.views
        assert _pinned(daemon) == 2
        second = kv.load(keys[2:], release=first.lease)
        assert second.tiers == [Tier.DISK, Tier.DISK] and bad_pages(kv, keys[2:], second.views) == []
        del second.views
        assert _pinned(daemon) == 2  # the first batch's pins went with the call, the second's came
        with pytest.raises(LeaseExpired):
            kv.release(first.lease)  # released already
        kv.release(second.lease)
        assert _pinned(daemon) == 0


def test_a_load_naming_a_lease_it_does_not_hold_loads_nothing(daemon) -> None:
    with daemon.engine() as kv:
        keys = store_chain(kv, chain_tokens(42, 2))
        r = kv.load(keys[:1])
        kv.release(r.lease)
        loads = daemon.stats()["counters"]["loads"]
        with pytest.raises(LeaseExpired, match=f"lease {r.lease}"):
            kv.load(keys[1:], release=r.lease)  # gone: what was read under it may be stale
        assert daemon.stats()["counters"]["loads"] == loads and _pinned(daemon) == 0
        with daemon.engine(engine_id="other") as other:  # another session's lease is not this one's
            theirs = other.load(keys[:1])
            with pytest.raises(LeaseExpired):
                kv.load(keys[1:], release=theirs.lease)
            assert _pinned(daemon) == 1
            other.release(theirs.lease)


@pytest.mark.parametrize("bad", ["7", 1.5, True, None, [1]])
def test_a_release_that_is_not_a_lease_id_is_refused_and_the_session_goes_on(daemon, bad) -> None:
    with daemon.engine() as kv:
        keys = store_chain(kv, chain_tokens(43, 1))
        with pytest.raises(ProtocolError, match="release must be an integer"):
            kv._ch.call("load", {"keys": keys, "release": bad})
        assert _pinned(daemon) == 0
        r = kv.load(keys)  # the connection still serves
        assert r.loaded == 1
        del r.views
        kv.release(r.lease)


def test_a_serial_load_reads_its_disk_pages_in_one_job_and_ends_at_a_corrupt_one(tmp_path) -> None:
    """`serial`: a paced background batch's disk pages are read one after another by one I/O job
    (one core, one wakeup of the loop), and a page that fails its checksum still ends the prefix."""
    m, gated, disk = _disk_manager(tmp_path)
    session = m.attach(TEST_NS, "e")

    async def run() -> None:
        keys = await _pages_on_disk(m, gated, session, 44, 4)
        path = disk._page_path(keys[2])
        raw = bytearray(open(path, "rb").read())
        raw[-1] ^= 0xFF  # the last byte of its last layer group
        open(path, "wb").write(raw)
        task = asyncio.ensure_future(m.load(session, keys, serial=True))
        assert await gated.run() == 1  # one job read the four pages
        offsets, tiers, lease = await task
        assert tiers == [Tier.DISK, Tier.DISK] and lease is not None
        for key, off in zip(keys, offsets):
            assert (
                bytes(m.arena[off : off + TEST_NS.page_bytes])
                == page_bytes_for(key, TEST_NS.page_bytes).tobytes()
            )
        assert m.index.get(keys[2]) is None and m.counters["corrupt_pages"] == 1  # never published
        assert m.index.get(keys[3]).state == READY  # read fine: a DRAM hit next time
        assert m.release(session, lease) == 2

    asyncio.run(run())


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_a_serial_that_is_not_a_bool_is_refused(daemon, bad) -> None:
    with daemon.engine() as kv:
        keys = store_chain(kv, chain_tokens(45, 1))
        with pytest.raises(ProtocolError, match="serial must be true or false"):
            kv._ch.call("load", {"keys": keys, "serial": bad})
        assert _pinned(daemon) == 0
        r = kv.load(keys, serial=True)  # the connection still serves; DRAM pages need no read
        assert r.loaded == 1 and r.tiers == [Tier.DRAM]
        del r.views
        kv.release(r.lease)

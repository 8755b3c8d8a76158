"""`load` with `release`: a load in batches releases the batch before in the same round trip.

The connector's background loads (polarkvd/connectors/vllm/background.py) copy a batch out, then ask
for the next one with the first batch's lease in `release`: one daemon round trip per batch. The
lease must be gone after that call, the new pages pinned, and a lease the daemon no longer holds must
fail the whole call (the copies made under it may be stale) with nothing loaded.
"""

from __future__ import annotations

import pytest

from polarkvd.errors import LeaseExpired, ProtocolError
from polarkvd.types import Tier
from tests.conftest import bad_pages, chain_tokens, store_chain, wait_for


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

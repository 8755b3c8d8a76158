"""Capacity: DRAM never exceeds its limit, eviction is leaf-first, evicted pages go to disk or away,
and the eviction policy can be switched (and refused) at run time."""

from __future__ import annotations

import numpy as np
import pytest

from polarkvd.errors import ErrorCode, PolarKVError
from polarkvd.types import Tier
from tests.conftest import TEST_NS, bad_pages, chain_tokens, page_bytes_for, store_chain, wait_for

CAP = "4MiB"  # 1 MiB slabs of 32 slots: exactly 128 pages of TEST_NS
CAP_PAGES = (4 << 20) // TEST_NS.page_bytes


def check_dram(daemon) -> dict:  # type: ignore[no-untyped-def]
    d = daemon.stats()["tiers"]["dram"]
    assert d["capacity_bytes"] == 4 << 20
    assert d["bytes"] <= d["capacity_bytes"] and d["slot_bytes_used"] <= d["capacity_bytes"], d
    assert d["pages"] <= CAP_PAGES
    return d


def test_dram_stays_within_capacity_and_evicted_pages_miss_without_disk(daemon_factory) -> None:
    d = daemon_factory({"dram.capacity": CAP, "disk.enabled": "false"})
    chains = []
    with d.engine() as kv:
        for batch in range(10):  # 40 chains of 8 pages: 2.5x what fits
            for c in range(4):
                chains.append(store_chain(kv, chain_tokens(batch * 4 + c, 8)))
            check_dram(d)
        st = d.stats()
        assert "disk" not in st["tiers"]
        dram = st["tiers"]["dram"]
        assert dram["pages"] == CAP_PAGES  # full, not over
        assert st["counters"]["stored_pages"] == 320
        assert st["counters"]["evicted_pages_dram_capacity"] == 320 - CAP_PAGES
        # the newest 16 chains are all there; the oldest are gone: misses, not disk hits
        for keys in chains[-16:]:
            assert kv.lookup(keys).tiers == [Tier.DRAM] * 8
        for keys in chains[:20]:
            assert kv.lookup(keys).hits == 0
            assert kv.load(keys).loaded == 0
        r = kv.load(chains[-1])
        assert r.loaded == 8 and bad_pages(kv, chains[-1], r.views) == []


def test_eviction_is_leaf_first(daemon_factory) -> None:
    """Roots outlive their leaves, so a chain that loses pages still hits its prefix.

    Root-first eviction (or eviction without the leaf veto) fails this: chain 0 was stored root
    first, so its root is its oldest page, and chain 4's root is older than anything stored after it.
    """
    d = daemon_factory({"dram.capacity": CAP, "disk.enabled": "false"})
    with d.engine() as kv:
        chains = [store_chain(kv, chain_tokens(100 + i, 16)) for i in range(8)]  # exactly full
        assert check_dram(d)["pages"] == CAP_PAGES
        for keys in chains[4:]:
            assert kv.lookup(keys).hits == 16  # chains 4..7 are used again; 0..3 are colder

        store_chain(kv, chain_tokens(200, 8))  # 8 evictions: from the coldest chain, leaves first
        assert kv.lookup(chains[0]).hits == 8  # its first half still hits (and is now recent)

        store_chain(kv, chain_tokens(201, 56))  # 56 more: chains 1..3 whole, then chain 4's leaves
        hits = [kv.lookup(keys).hits for keys in chains]
        assert hits == [8, 0, 0, 0, 8, 16, 16, 16]
        assert check_dram(d)["pages"] == CAP_PAGES
        assert d.stats()["counters"]["evicted_pages_dram_capacity"] == 64
        # what survived is intact
        r = kv.load(chains[4])
        assert r.loaded == 8 and bad_pages(kv, chains[4], r.views) == []


def test_with_disk_evicted_pages_become_disk_hits(daemon_factory) -> None:
    d = daemon_factory({"dram.capacity": CAP})
    chains = []
    with d.engine() as kv:
        for batch in range(5):  # 160 pages into a 128-page DRAM tier
            for c in range(4):
                chains.append(store_chain(kv, chain_tokens(300 + batch * 4 + c, 8)))
            check_dram(d)
        wait_for(lambda: d.stats()["tiers"]["disk"]["pending_pages"] == 0, what="demotions to finish")
        st = d.stats()
        evicted = st["counters"]["evicted_pages_dram_capacity"]
        assert evicted == 160 - CAP_PAGES
        assert st["counters"]["demoted_pages"] == evicted and st["tiers"]["disk"]["pages"] == evicted
        assert st["counters"].get("demotions_dropped", 0) == 0
        for keys in chains:
            assert kv.lookup(keys).hits == 8  # every page still hits, in one tier or the other
        assert kv.lookup(chains[0]).tiers == [Tier.DISK] * 8
        assert kv.lookup(chains[-1]).tiers == [Tier.DRAM] * 8
        outs = [np.empty(kv.page_bytes, np.uint8) for _ in range(8)]
        r = kv.load(chains[0])
        assert r.tiers == [Tier.DISK] * 8
        for view, out in zip(r.views, outs):
            out[:] = np.frombuffer(view, np.uint8)
        del r.views
        kv.release(r.lease)
        for k, out in zip(chains[0], outs):
            assert np.array_equal(out, page_bytes_for(k, kv.page_bytes))
        check_dram(d)


def _hot_chain_survives_a_scan(d, kv, seed: int) -> int:  # type: ignore[no-untyped-def]
    hot = store_chain(kv, chain_tokens(seed, 8))
    for _ in range(2):
        assert kv.lookup(hot).hits == 8
    for i in range(30):  # a one-pass scan: 240 new pages through a 128-page tier
        store_chain(kv, chain_tokens(seed + 1 + i, 8))
        check_dram(d)
    return kv.lookup(hot).hits


def test_policy_switch_at_run_time(daemon_factory) -> None:
    d = daemon_factory({"dram.capacity": CAP, "disk.enabled": "false"})
    with d.engine() as kv, d.control() as ctl:
        assert ctl.knobs()["dram.policy"] == "lru"
        assert _hot_chain_survives_a_scan(d, kv, 1000) == 0  # LRU: the scan flushes the hot chain
        pages = d.stats()["tiers"]["dram"]["pages"]

        knobs = ctl.set_knobs({"dram.policy": "s3fifo"})
        assert knobs["dram.policy"] == "s3fifo" and ctl.knobs()["dram.policy"] == "s3fifo"
        st = d.stats()
        assert st["tiers"]["dram"]["policy"] == "s3fifo" and st["tiers"]["dram"]["pages"] == pages
        assert _hot_chain_survives_a_scan(d, kv, 2000) == 8  # S3-FIFO: it survives

        before = ctl.knobs()
        for bad in (
            {"dram.policy": "mru"},
            {"dram.policy": "lru", "daemon.lease_seconds": "never"},  # one bad value: nothing applied
            {"dram.capacity": "8MiB"},  # not a live knob
            {"dram.policy": "lru", "no.such": 1},
        ):
            with pytest.raises(PolarKVError) as info:
                ctl.set_knobs(bad)
            assert info.value.code is ErrorCode.BAD_VALUE
            assert ctl.knobs() == before
            assert d.stats()["tiers"]["dram"]["policy"] == "s3fifo"
        assert "mru" in str(_refusal(ctl, {"dram.policy": "mru"}))

        assert (
            ctl.set_knobs({"dram.policy": "lru", "daemon.lease_seconds": "45s"})["daemon.lease_seconds"]
            == 45.0
        )
        st = d.stats()
        assert st["tiers"]["dram"]["policy"] == "lru" and st["tiers"]["dram"]["pages"] == CAP_PAGES


def _refusal(ctl, knobs) -> PolarKVError:  # type: ignore[no-untyped-def]
    with pytest.raises(PolarKVError) as info:
        ctl.set_knobs(knobs)
    return info.value

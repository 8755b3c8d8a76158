"""The engine API end to end: several engine processes, real shared memory, DRAM and disk tiers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from polarkvd.errors import NamespaceError
from polarkvd.keys import namespace_digest
from polarkvd.seed import load_seed_file
from polarkvd.types import Tier
from tests.conftest import TEST_NS, bad_pages, chain_tokens, page_bytes_for, store_chain, wait_for

PAGES = 6  # pages per sequence
SEQS = 3


def test_engines_share_prefixes_across_processes_and_tiers(daemon, engine_procs) -> None:
    seqs = [chain_tokens(100 + s, PAGES) for s in range(SEQS)]
    # Engine i stores the first 2(i+1) pages of every sequence: overlapping prefixes, all at once.
    procs = []
    for i in range(3):
        n = 16 * 2 * (i + 1)
        steps = [["wait"]] + [["store", s[:n]] for s in seqs] + [["verify", s[:n]] for s in seqs]
        procs.append(engine_procs(daemon.engine_socket, steps, engine_id=f"engine-{i}"))
    for p in procs:
        p.expect("attached")
    for p in procs:
        p.go()
    stored = 0
    for i, p in enumerate(procs):
        for _ in seqs:
            stored += p.expect("stored")["stored"]
        for _ in seqs:
            v = p.expect("verified")
            assert v["loaded"] == 2 * (i + 1) and v["bad"] == [], v
            assert v["tiers"] == [int(Tier.DRAM)] * v["loaded"]
        p.wait()
    # Every page was written exactly once, whichever engine got there first.
    assert stored == SEQS * PAGES
    st = daemon.stats()
    assert st["counters"]["stored_pages"] == SEQS * PAGES
    assert st["counters"]["stored_bytes"] == SEQS * PAGES * TEST_NS.page_bytes
    assert st["tiers"]["dram"]["pages"] == SEQS * PAGES
    assert st["counters"]["sessions_attached"] == 3
    wait_for(lambda: daemon.stats()["sessions"] == [], what="the engines' sessions to close")

    with daemon.engine(engine_id="reader") as kv:
        # the digest is keyed with the seed the daemon created in its state directory
        seed = load_seed_file(daemon.root / "state" / "page-seed", create=False)
        assert kv.ns_digest == namespace_digest(TEST_NS, seed)
        keys = [kv.page_keys(s) for s in seqs]
        before = daemon.stats()["counters"]
        for ks in keys:
            hit = kv.lookup(ks)
            assert hit.tiers == [Tier.DRAM] * PAGES
        c = daemon.stats()["counters"]
        assert c["hit_pages_dram"] - before.get("hit_pages_dram", 0) == SEQS * PAGES
        assert c["lookup_pages"] - before["lookup_pages"] == SEQS * PAGES

        # Force every page down to disk.
        with daemon.control() as ctl:
            freed = ctl.evict("dram", 1 << 40)
        assert freed == SEQS * PAGES * TEST_NS.page_bytes
        wait_for(
            lambda: daemon.stats()["counters"].get("demoted_pages", 0) == SEQS * PAGES,
            what="demotion to disk",
        )
        st = daemon.stats()
        assert st["tiers"]["dram"]["pages"] == 0 and st["tiers"]["dram"]["bytes"] == 0
        assert st["tiers"]["disk"]["pages"] == SEQS * PAGES
        assert st["counters"]["evicted_pages_dram_operator"] == SEQS * PAGES

        before = st["counters"]
        for ks in keys:
            assert kv.lookup(ks).tiers == [Tier.DISK] * PAGES
        for ks in keys:
            r = kv.load(ks)
            assert r.loaded == PAGES and r.tiers == [Tier.DISK] * PAGES
            assert bad_pages(kv, ks, r.views) == []
            del r.views
            kv.release(r.lease)
        c = daemon.stats()["counters"]
        assert c["hit_pages_disk"] - before.get("hit_pages_disk", 0) == SEQS * PAGES
        assert c["loaded_pages_disk"] == SEQS * PAGES
        assert c["loaded_pages"] - before["loaded_pages"] == SEQS * PAGES
        assert c["promoted_pages"] == SEQS * PAGES

        # Promoted on that load: back in DRAM, still exact.
        for ks in keys:
            assert kv.lookup(ks).tiers == [Tier.DRAM] * PAGES
            outs = [np.empty(kv.page_bytes, np.uint8) for _ in ks]
            assert kv.load_into(ks, outs) == PAGES
            for k, o in zip(ks, outs):
                assert np.array_equal(o, page_bytes_for(k, kv.page_bytes))
        assert daemon.stats()["tiers"]["dram"]["pinned_pages"] == 0


def test_lookup_reports_the_tier_of_each_page(daemon) -> None:
    with daemon.engine() as kv:
        keys = store_chain(kv, chain_tokens(1, 4))
        # evict just the last page (leaf first): it goes to disk, the rest stay in DRAM
        with daemon.control() as ctl:
            assert ctl.evict("dram", 1) == kv.page_bytes
        assert kv.lookup(keys).tiers == [Tier.DRAM, Tier.DRAM, Tier.DRAM, Tier.DISK]
        r = kv.load(keys)
        assert r.tiers == [Tier.DRAM, Tier.DRAM, Tier.DRAM, Tier.DISK] and bad_pages(kv, keys, r.views) == []
        del r.views
        kv.release(r.lease)
        # a miss in the middle ends the prefix: lookups never report pages past a gap
        other = kv.page_keys(chain_tokens(2, 2))
        assert kv.lookup(keys[:2] + other + keys[2:]).tiers == [Tier.DRAM, Tier.DRAM]


def test_different_cache_salt_never_hits(daemon) -> None:
    tokens = chain_tokens(5, 4)
    with daemon.engine() as kv:
        keys = store_chain(kv, tokens)
        assert kv.lookup(keys).hits == 4
        salted_ns = dataclasses.replace(TEST_NS, cache_salt="tenant-b")
        with daemon.engine(salted_ns, "salted") as other:
            salted = other.page_keys(tokens)
            assert not set(salted) & set(keys)
            assert other.lookup(salted).hits == 0
            assert other.load(salted).loaded == 0
            # even with the other tenant's keys in hand, a session cannot read them
            assert other.lookup(keys).hits == 0
            with pytest.raises(NamespaceError):
                other.load(keys)
            # and it stores its own copy, which the first tenant in turn never sees
            store_chain(other, tokens)
            assert other.lookup(salted).hits == 4
            assert kv.lookup(salted).hits == 0
        assert daemon.stats()["namespaces"] == 2


def test_history_plus_new_turn_hits_every_full_history_page(daemon) -> None:
    history = chain_tokens(9, 7)[:100]  # 6 full pages and 4 tokens of a 7th
    turn = chain_tokens(10, 3)[:40]
    with daemon.engine() as kv:
        stored = store_chain(kv, history)
        assert len(stored) == 6  # the partial page is never stored
        keys = kv.page_keys(history + turn)
        assert len(keys) == 8 and keys[:6] == stored
        hit = kv.lookup(keys)
        assert hit.hits == 6 and hit.tiers == [Tier.DRAM] * 6
        # store only the new pages, chained to the history
        r = kv.store(keys[6:], [page_bytes_for(k, kv.page_bytes) for k in keys[6:]], parent=keys[5])
        assert r.stored == 2 and r.existing == 0
        assert kv.lookup(keys).hits == 8
        again = kv.store(keys, [page_bytes_for(k, kv.page_bytes) for k in keys])
        assert again.stored == 0 and again.existing == 8
        outs = [bytearray(kv.page_bytes) for _ in keys]
        assert kv.load_into(keys, outs) == 8
        assert bad_pages(kv, keys, [memoryview(o) for o in outs]) == []
        st = daemon.stats()
        (me,) = st["sessions"]
        assert me["stored_pages"] == 8 and me["lookup_pages"] == 8 + 8 and me["hit_pages"] == 6 + 8
        assert me["loaded_pages"] == 8 and st["counters"]["stored_pages"] == 8


def test_store_aborts_when_the_copy_fails(daemon) -> None:
    with daemon.engine() as kv:
        keys = kv.page_keys(chain_tokens(11, 3))
        with pytest.raises(ValueError, match="bytes"):
            kv.store(keys, [b"short"] * 3)
        st = daemon.stats()
        assert st["tiers"]["dram"]["reserved_pages"] == 0 and st["tiers"]["dram"]["slot_bytes_used"] == 0
        assert kv.lookup(keys).hits == 0
        assert store_chain(kv, chain_tokens(11, 3)) == keys
        assert kv.lookup(keys).hits == 3

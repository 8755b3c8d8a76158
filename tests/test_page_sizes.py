"""Two page sizes in one arena (two models on one host): a page of the second size gets a slab by
emptying one chosen slab, never by evicting the first size's pages in policy order until some slab
happens to empty (issue 13, defect 1)."""

from __future__ import annotations

import dataclasses

from tests.conftest import TEST_NS, bad_pages, chain_tokens, store_chain

#: 4 slabs of 4 MiB: 128 pages of TEST_NS (32 KiB) each, 512 pages in all. The more pages a slab
#: holds, the more a policy-order sweep evicts before one empties: here ~3 slabs' worth.
SETS = {"dram.capacity": "16MiB", "dram.slab_bytes": "4MiB", "disk.enabled": "false"}
PER_SLAB = (4 << 20) // TEST_NS.page_bytes
#: the second model: 2 layers, 1 KV head: 8 KiB pages
SMALL_NS = dataclasses.replace(TEST_NS, model="small-model@0", num_layers=2, num_kv_heads=1)


def test_second_page_size_empties_one_slab_and_spares_the_other_chains(daemon_factory) -> None:
    d = daemon_factory(SETS)
    chains: list[list[bytes]] = []
    with d.engine() as a:
        # the workload: each new chain, then two earlier ones loaded again (hot again)
        for c in range(128):
            chains.append(store_chain(a, chain_tokens(c, 8)))
            for old in (c // 2, c // 3):
                r = a.load(chains[old])
                del r.views
                if r.lease is not None:
                    a.release(r.lease)
        before = d.stats()
        assert before["tiers"]["dram"]["slot_bytes_used"] == 16 << 20  # full of 32 KiB pages

        with d.engine(SMALL_NS, "small") as b:
            keys = b.page_keys(chain_tokens(1000, 1, SMALL_NS.page_tokens))
            r = b.store(keys, [bytes([7]) * b.page_bytes for _ in keys])
            assert r.stored == 1
            got = b.load(keys)
            assert got.loaded == 1 and bytes(got.views[0]) == bytes([7]) * b.page_bytes
            del got.views
            b.release(got.lease)

        after = d.stats()
        c0, c1 = before["counters"], after["counters"]
        evicted = sum(c1.get(k, 0) - c0.get(k, 0) for k in c1 if k.startswith("evicted_pages_dram_"))
        moved = c1.get("slab_moved_pages", 0) - c0.get("slab_moved_pages", 0)
        assert evicted + moved <= PER_SLAB, (evicted, moved)
        assert c1.get("slab_reclaims", 0) - c0.get("slab_reclaims", 0) == 1
        # the first engine's other pages are still there, and whole
        held = before["tiers"]["dram"]["pages"]
        assert after["tiers"]["dram"]["pages"] >= held - PER_SLAB + 1
        for keys in chains:
            r = a.load(keys)
            assert not bad_pages(a, keys[: r.loaded], r.views[: r.loaded])
            del r.views
            if r.lease is not None:
                a.release(r.lease)


def test_pages_moved_out_of_the_emptied_slab_keep_their_bytes(daemon_factory) -> None:
    """With free slots of the first size scattered over every slab, the chosen slab's pages move
    into them (a copy in the arena) instead of being evicted, and read back intact."""
    d = daemon_factory(SETS)
    with d.engine() as a, d.control() as ctl:
        chains = [store_chain(a, chain_tokens(c, 4)) for c in range(128)]  # 512 pages: full
        gone = chains[::4]  # a quarter of the chains, spread over every slab
        ctl.evict_keys([keys[0] for keys in gone])
        kept = [keys for i, keys in enumerate(chains) if i % 4]
        before = d.stats()["counters"]

        with d.engine(SMALL_NS, "small") as b:
            keys = b.page_keys(chain_tokens(1000, 1, SMALL_NS.page_tokens))
            assert b.store(keys, [bytes([7]) * b.page_bytes for _ in keys]).stored == 1

        after = d.stats()["counters"]
        moved = after.get("slab_moved_pages", 0) - before.get("slab_moved_pages", 0)
        evicted = sum(
            after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("evicted_pages_dram_")
        )
        assert moved > 0 and evicted == 0, (moved, evicted)
        for keys in kept:
            r = a.load(keys)
            assert r.loaded == len(keys)
            assert not bad_pages(a, keys, r.views)
            del r.views
            a.release(r.lease)

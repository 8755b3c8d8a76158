"""The operator's `evict --tier vram`: L1 pages moved to DRAM on demand (in-process, over the L1
stand-in of tests/test_manager_vram.py: host memory playing the pool, NOT CUDA), and what the CLI
says for it."""

from __future__ import annotations

import asyncio

from polarkvd.cli import main
from polarkvd.index import READY, READY_VRAM
from polarkvd.types import Tier
from tests.conftest import TEST_NS, DaemonProc, page_bytes_for
from tests.test_manager_vram import L1, PB, keys_of


def test_evict_vram_moves_the_coldest_leaves_to_dram_byte_exact() -> None:
    t = L1(pool_slabs=1, dram_slabs=4)
    m = t.m
    s = m.attach(TEST_NS, "gpu", vram=True)
    chain = keys_of(m, 1, 6)
    t.store(s, chain)

    freed = asyncio.run(m.evict_vram(2 * PB))
    assert freed == 2 * PB
    assert m.lookup(s, chain)[0] == [Tier.VRAM] * 4 + [Tier.DRAM] * 2  # the leaves went, the prefix stays
    for key in chain[4:]:
        page = m.index.get(key)
        assert page.state == READY
        assert bytes(t.arena[page.offset : page.offset + PB]) == page_bytes_for(key, PB).tobytes()
    assert m.stats()["counters"]["demoted_pages_vram"] == 2


def test_evict_vram_leaves_pinned_pages_and_stops_when_nothing_can_move() -> None:
    t = L1(pool_slabs=1, dram_slabs=4)
    m = t.m
    s = m.attach(TEST_NS, "gpu", vram=True)
    chain = keys_of(m, 1, 4)
    t.store(s, chain)
    _, lease = m.lookup(s, chain[:2], pin=True)  # an engine holds the first two pages
    assert lease is not None

    freed = asyncio.run(m.evict_vram(1 << 30))  # "everything"
    assert freed == 2 * PB
    assert [m.index.get(k).state for k in chain] == [READY_VRAM] * 2 + [READY] * 2
    m.release(s, lease)
    assert asyncio.run(m.evict_vram(1 << 30)) == 2 * PB and t.pool.slots.used_bytes == 0


def test_cli_evict_vram_on_a_daemon_without_l1_says_so(daemon: DaemonProc, capsys) -> None:
    rc = main(["evict", "--tier", "vram", "--bytes", "1MiB", "--socket", str(daemon.control_socket)])
    out = capsys.readouterr()
    assert rc != 0
    assert "no L1" in out.err

"""Layer-pipelined loads: an engine reads layer 0 of its pages before the last layer has arrived, and a
transfer that fails part-way surfaces as "pages from here on are not loaded" — never as garbage.
Remote pages arrive layer group by layer group, and so do disk pages (stored in layer groups, each
with its own checksum: a corrupt group is caught before its layers are published).

In-process manager with a scripted peer (`ScriptedPeer`): the order in which layer groups arrive and
the failure of one page in one layer group are faults a real peer cannot produce on demand. The real
network path is covered with daemons in tests/cluster/test_daemons.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import mmap
import multiprocessing
import os
import struct
import time
from typing import Any

from polarkvd.config import load_config
from polarkvd.index import PROMOTING, READY
from polarkvd.keys import page_keys
from polarkvd.manager import Manager
from polarkvd.tiers.disk import HEADER_SIZE, DiskTier
from polarkvd.tiers.dram import SlabAllocator
from polarkvd.transport.pipeline import LoadProgress, SignalBoard, layer_groups
from polarkvd.types import Tier
from polarkvd.wire.signals import SIGNAL_NONE
from tests.conftest import TEST_NS, chain_tokens, make_manager, manager_store, page_bytes_for

L, LB = TEST_NS.num_layers, TEST_NS.layer_bytes


class ScriptedPeer:
    """Stands in for ClusterPool: holds pages of another member; releases layer groups on command."""

    fetch_batch = 8
    layer_groups = L  # one layer per group: the finest ordering to observe

    def __init__(self, keys: list[bytes], fail: tuple[int, int] | None = None) -> None:
        self.keys = keys
        self.hints = {k: ("peer",) for k in keys}
        self.fail = fail  # (page index among `keys`, layer) that fails
        self.gates: dict[int, asyncio.Event] = {}
        self.served: list[tuple[int, int]] = []

    def gate(self, lo: int) -> asyncio.Event:
        return self.gates.setdefault(lo, asyncio.Event())

    async def locate(self, keys):
        return [("peer",) for k in keys if k in self.hints]

    async def fetch(self, holder, ns, keys, views, layers=None):
        lo, hi, lb = layers
        await self.gate(lo).wait()
        out = []
        for key, view in zip(keys, views):
            i = self.keys.index(key)
            if self.fail is not None and i == self.fail[0] and lo <= self.fail[1] < hi:
                out.append(False)
                break
            view[:] = page_bytes_for(key, TEST_NS.page_bytes)[lo * lb : hi * lb].tobytes()
            out.append(self.keys[i - 1] if i else None)
            self.served.append((i, lo))
        return out + [False] * (len(keys) - len(out))


def _signal(m, slot) -> tuple[int, int]:
    return m.signals.read(slot)


def _layer(m, offset: int, layer: int) -> bytes:
    return bytes(m.arena[offset + layer * LB : offset + (layer + 1) * LB])


def test_layer_zero_is_readable_before_the_last_layer_arrives() -> None:
    m, _ = make_manager(64)
    session = m.attach(TEST_NS, "e")
    local = [bytes(k) for k in page_keys(session.ns.digest, chain_tokens(1, 3), TEST_NS.page_tokens)]
    manager_store(m, session, local)
    remote = [bytes(k) for k in page_keys(session.ns.digest, chain_tokens(1, 8), TEST_NS.page_tokens)][3:]
    peer = ScriptedPeer(remote)
    m.cluster = peer

    async def run() -> None:
        offsets, tiers, lease, slot = await m.load_pipelined(session, local + remote)
        assert tiers == [Tier.DRAM] * 3 + [Tier.DMP] * 5 and slot is not None and lease is not None
        assert _signal(m, slot) == (0, SIGNAL_NONE)  # nothing of the remote pages yet
        seen = []
        for layer in range(L):
            peer.gate(layer).set()
            for _ in range(100):
                await asyncio.sleep(0)
                if _signal(m, slot)[0] > layer:
                    break
            ready, failed = _signal(m, slot)
            seen.append(ready)
            assert failed == SIGNAL_NONE
            # the engine reads layer `layer` of every page now: it is all there ...
            for key, off in zip(local + remote, offsets):
                assert (
                    _layer(m, off, layer)
                    == page_bytes_for(key, TEST_NS.page_bytes)[layer * LB : (layer + 1) * LB].tobytes()
                )
            # ... while the next layer of the remote pages has not arrived
            if layer + 1 < L:
                assert (
                    _layer(m, offsets[3], layer + 1)
                    != page_bytes_for(remote[0], TEST_NS.page_bytes)[
                        (layer + 1) * LB : (layer + 2) * LB
                    ].tobytes()
                )
        assert seen == list(range(1, L + 1))
        await asyncio.sleep(0)
        assert all(m.index.get(k).state == 1 for k in remote)  # READY: a local hit from now on
        assert m.release(session, lease) == 8
        assert m.signals.in_use == 0

    asyncio.run(run())


def test_a_failure_in_layer_k_cuts_the_load_at_that_page() -> None:
    m, _ = make_manager(64)
    session = m.attach(TEST_NS, "e")
    keys = [bytes(k) for k in page_keys(session.ns.digest, chain_tokens(2, 6), TEST_NS.page_tokens)]
    peer = ScriptedPeer(keys, fail=(3, 2))  # page 3 fails in layer 2
    m.cluster = peer

    async def run() -> None:
        offsets, tiers, lease, slot = await m.load_pipelined(session, keys)
        assert len(offsets) == 6 and slot is not None
        for layer in range(L):
            peer.gate(layer).set()
        for _ in range(200):
            await asyncio.sleep(0)
            if _signal(m, slot)[0] == L:
                break
        ready, failed = _signal(m, slot)
        assert (ready, failed) == (L, 3)  # pages 0-2 complete; 3 and after: recompute
        for key, off in zip(keys[:3], offsets):
            assert (
                bytes(m.arena[off : off + TEST_NS.page_bytes])
                == page_bytes_for(key, TEST_NS.page_bytes).tobytes()
            )
        assert all(m.index.get(k) is not None and m.index.get(k).state == 1 for k in keys[:3])
        assert all(m.index.get(k) is None for k in keys[3:])  # nothing half-filled stays visible
        assert (3, 3) not in peer.served  # no layer after the failure was asked for page 3
        m.release(session, lease)
        tiers_now, _ = m.lookup(session, keys)
        assert tiers_now == [Tier.DRAM] * 3

    asyncio.run(run())


def test_progress_word_and_groups() -> None:
    board = SignalBoard(memoryview(bytearray(64)))
    assert board.slots == 8
    slot = board.alloc()
    p = LoadProgress(board, slot, 3, 4)
    p.page_done(0)
    assert board.read(slot) == (0, SIGNAL_NONE)
    p.layers_done([1, 2], 2)
    assert board.read(slot) == (2, SIGNAL_NONE)
    p.fail(2)
    assert board.read(slot) == (2, 2)
    p.layers_done([1], 4)
    assert board.read(slot) == (4, 2) and p.finished
    assert struct.unpack_from("<II", board.view, slot * 8) == (4, 2)  # the layout PROTOCOL.md gives
    p.close()
    assert board.in_use == 0
    p.layers_done([1], 4)  # after close: nothing written, nothing raised
    for n, g in [(30, 8), (4, 8), (1, 3), (7, 1)]:
        groups = layer_groups(n, g)
        assert groups[0][0] == 0 and groups[-1][1] == n and len(groups) <= g
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        if g > 1 and n > 1:
            assert groups[0] == (0, 1)  # the first layer arrives on its own, early


# ------------------------------------------------------------------------------ disk pages, group by group


class GatedExecutor(concurrent.futures.Executor):
    """Runs submitted calls only when the test says, in order, on the test's thread: which disk reads
    and decodes have finished is the test's choice (a real disk cannot be told to finish one read
    and hold the next). The calls themselves are the real disk tier's."""

    def __init__(self) -> None:
        self.queue: list[tuple[concurrent.futures.Future[Any], Any, tuple[Any, ...]]] = []

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        f: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.queue.append((f, fn, args))
        return f

    async def run(self, n: int | None = None) -> int:
        """Let the loop submit what it will, run the next `n` queued calls (all: None), then let the
        loop see their results."""
        for _ in range(20):
            await asyncio.sleep(0)
        todo, self.queue = (self.queue, []) if n is None else (self.queue[:n], self.queue[n:])
        for f, fn, args in todo:
            try:
                f.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting side
                f.set_exception(e)
        for _ in range(20):
            await asyncio.sleep(0)
        return len(todo)


def _disk_manager(tmp_path) -> tuple[Manager, GatedExecutor, DiskTier]:
    cap = 4 << 20
    cfg = load_config(
        env={},
        overrides={
            "dram.capacity": str(cap),
            "dram.slab_bytes": str(1 << 20),
            "disk.path": str(tmp_path / "disk"),
        },
    )
    disk = DiskTier(tmp_path / "disk", 64 << 20)
    disk.open()
    gated = GatedExecutor()
    return Manager(cfg, memoryview(bytearray(cap)), SlabAllocator(cap, 1 << 20), disk, gated), gated, disk


async def _pages_on_disk(m: Manager, gated: GatedExecutor, session: Any, seed: int, n: int) -> list[bytes]:
    keys = [bytes(k) for k in page_keys(session.ns.digest, chain_tokens(seed, n), TEST_NS.page_tokens)]
    manager_store(m, session, keys)
    m.evict_prefixes([keys[0]])  # to disk (written by the I/O "threads" below), out of DRAM
    await gated.run()
    assert all(m.disk.entry(k) is not None for k in keys) and not m.pending
    return keys


def test_disk_pages_arrive_layer_group_by_layer_group(tmp_path) -> None:
    m, gated, disk = _disk_manager(tmp_path)
    session = m.attach(TEST_NS, "e")

    async def run() -> None:
        keys = await _pages_on_disk(m, gated, session, 40, 4)
        assert all(len(disk.open_grouped(k).ranges) == L for k in keys)  # stored in layer groups
        offsets, tiers, lease, slot = await m.load_pipelined(session, keys)
        assert tiers == [Tier.DISK] * 4 and slot is not None and lease is not None
        assert await gated.run(4) == 4  # every page's file read
        assert _signal(m, slot) == (0, SIGNAL_NONE)
        for group in range(L):
            assert await gated.run(4) == 4  # group `group` of every page decoded and verified
            assert _signal(m, slot) == (group + 1, SIGNAL_NONE)
            for key, off in zip(keys, offsets):  # the engine reads this layer of every page now ...
                want = page_bytes_for(key, TEST_NS.page_bytes)
                assert _layer(m, off, group) == want[group * LB : (group + 1) * LB].tobytes()
            if group + 1 < L:  # ... while the pages are still arriving
                assert all(m.index.get(k).state == PROMOTING for k in keys)
        assert all(m.index.get(k).state == READY for k in keys)  # a local hit from now on
        assert m.release(session, lease) == 4

    asyncio.run(run())


def test_a_corrupt_layer_group_on_disk_cuts_the_load_at_its_page(tmp_path) -> None:
    m, gated, disk = _disk_manager(tmp_path)
    session = m.attach(TEST_NS, "e")

    async def run() -> None:
        keys = await _pages_on_disk(m, gated, session, 41, 4)
        # flip a byte inside page 2's second layer group (its blob, after the groups table)
        path = disk._page_path(keys[2])
        raw = bytearray(open(path, "rb").read())
        n = struct.unpack_from("<H", raw, HEADER_SIZE)[0]
        first_blob = struct.unpack_from("<IIBQ", raw, HEADER_SIZE + 2)[1]
        raw[HEADER_SIZE + 2 + n * 17 + first_blob + 3] ^= 0xFF
        open(path, "wb").write(raw)
        offsets, tiers, lease, slot = await m.load_pipelined(session, keys)
        await gated.run(4)
        await gated.run(4)  # group 0: everything fine
        assert _signal(m, slot) == (1, SIGNAL_NONE)
        await gated.run(4)  # group 1: page 2 fails its group checksum
        assert _signal(m, slot) == (2, 2)  # pages 0 and 1 go on; from page 2 on: recompute
        await gated.run()
        await gated.run()
        assert _signal(m, slot) == (L, 2)
        assert m.disk.entry(keys[2]) is None and m.counters["corrupt_pages"] == 1  # dropped, counted
        assert m.index.get(keys[2]) is None  # never published
        for key, off in zip(keys[:2], offsets):
            assert (
                bytes(m.arena[off : off + TEST_NS.page_bytes])
                == page_bytes_for(key, TEST_NS.page_bytes).tobytes()
            )
        m.release(session, lease)

    asyncio.run(run())


def _publish_layers(path: str, seconds: float) -> None:
    """Writer process: a load's signal slot going 0..30 layers, over and over, no page failing."""
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, 64)
    os.close(fd)
    board = SignalBoard(memoryview(m))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for layers in range(31):
            board.write(3, layers, SIGNAL_NONE)
    board.words.release()


def test_an_engine_never_reads_a_signal_the_daemon_did_not_write(tmp_path) -> None:
    """The daemon publishes a load's progress while the engine polls it from another process: every
    read is a word that was written. (With struct.pack_into, which zeroes the slot before writing
    its two halves, the engine read "30 layers, failed from page 0" a third of the time under this
    load, and dropped every page of a load that had arrived whole.)"""
    path = tmp_path / "board"
    path.write_bytes(bytes(64))
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, 64)
    os.close(fd)
    board = SignalBoard(memoryview(m))
    board.write(3, 0, SIGNAL_NONE)  # as `alloc` does before the slot is handed out
    writer = multiprocessing.get_context("spawn").Process(target=_publish_layers, args=(str(path), 1.0))
    writer.start()
    seen: set[tuple[int, int]] = set()
    try:
        while writer.is_alive() or not seen:
            for _ in range(1000):
                seen.add(board.read(3))
    finally:
        writer.join(10)
    assert writer.exitcode == 0
    assert {failed for _, failed in seen} == {SIGNAL_NONE}
    assert {layers for layers, _ in seen} <= set(range(31)) and len(seen) > 1

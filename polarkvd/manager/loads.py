"""Loads: pinning the longest loadable prefix (promoting disk pages into DRAM, waiting for remote
ones), pipelined loads that answer at once and fill in layer group by layer group, and bringing
pages into DRAM for peers.

A part of the manager (polarkvd/manager/__init__.py): it holds no state of its own beyond what
is named here; the shared state is the manager's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from polarkvd.errors import (
    NamespaceError,
    PageCorrupt,
    PageNotFound,
)
from polarkvd.index import (
    PROMOTING,
    READY,
    READY_VRAM,
    VRAM,
    Page,
)
from polarkvd.manager.events import PageStored
from polarkvd.manager.records import Lease, NamespaceInfo, Session, unpin_all
from polarkvd.tiers.dram import slot_size
from polarkvd.transport.pipeline import (
    LoadProgress,
)
from polarkvd.types import Tier

if TYPE_CHECKING:
    from polarkvd.manager import Manager

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class Loads:
    """Loads and promotions."""

    def __init__(self, m: Manager) -> None:
        self.m = m

    async def load(
        self, session: Session, keys: list[bytes], *, serial: bool = False
    ) -> tuple[list[int], list[Tier], int | None]:
        """Pin the longest loadable prefix of `keys` in DRAM (promoting disk and remote pages first).

        `serial`: read its disk pages on one I/O thread, one after another, and finish them in one
        wakeup of the loop: a paced load beside an engine that computes wants less CPU at once
        rather than speed (a batch's pages in parallel take both cores of a small host).

        Returns (offsets, source tier of each, lease id). An offset is in the pool for a page whose
        tier is VRAM (only sessions attached with L1 get those; for the others L1 pages are moved
        to DRAM first, like disk pages), in the arena for every other. The engine copies the pages
        out, then releases the lease. A page that fails on the way (evicted meanwhile, corrupt on disk, a peer
        gone) ends the prefix there: the engine recomputes from that page on.
        """
        keys = self._worth_fetching(session, keys)
        from_disk: list[tuple[int, Page, asyncio.Future[bool]]] | None = [] if serial else None
        pinned, tiers, waits, remote_from = self._pin_prefix(session, keys, from_disk)
        if from_disk:
            self._promote_serial([(page, fut) for _, page, fut in from_disk])
        if remote_from is not None:
            for page, fut in await self.m.fetches.start_fetches(
                session.ns, keys[remote_from:], vram=session.vram
            ):
                page.pins += 1
                pinned.append(page)
                tiers.append(Tier.DMP)
                waits.append((len(pinned) - 1, fut))
        if waits:
            results = await asyncio.gather(*(f for _, f in waits))
            for (pos, _), ok in zip(waits, results):
                if not ok:
                    unpin_all(pinned[pos:])
                    del pinned[pos:]
                    del tiers[pos:]
                    break
            # pages that arrived in L1 (a peer's, READ straight into the pool): their offsets are
            # in the pool now, and the tier says so (only L1 sessions wait for such pages)
            landed = 0
            for pos, _ in waits:
                if pos < len(pinned) and pinned[pos].state & VRAM:
                    landed += tiers[pos] is Tier.DMP
                    tiers[pos] = Tier.VRAM
            if landed:
                self.m.counters["loaded_pages_remote"] += landed  # `_loaded` counts them as L1 loads
        lease = self._loaded(session, keys, pinned, tiers)
        return [p.offset for p in pinned], tiers, lease.id if lease is not None else None

    async def load_pipelined(
        self, session: Session, keys: list[bytes]
    ) -> tuple[list[int], list[Tier], int | None, int | None]:
        """Like `load`, but answers at once: (offsets, tiers, lease id, signal slot).

        Pages still on their way (disk pages, read and decoded one layer group at a time; remote pages,
        fetched one layer group at a time)
        fill in behind the answer; the signal slot (see transport/pipeline.py) says how many leading
        layers every page has, and from which page on the load failed. None when nothing is on its way.
        """
        ns = session.ns
        from_disk: list[tuple[int, Page, asyncio.Future[bool]]] = []  # read layer group by group
        keys = self._worth_fetching(session, keys)
        pinned, tiers, waits, remote_from = self._pin_prefix(session, keys, from_disk)
        layered: list[tuple[int, Page, asyncio.Future[bool], str]] = []
        if remote_from is not None:
            started = await self.m.fetches.start_fetches(ns, keys[remote_from:], layered=True)
            for page, fut, holder in started:
                page.pins += 1
                pinned.append(page)
                tiers.append(Tier.DMP)
                layered.append((len(pinned) - 1, page, fut, holder))
        slot = self.m.signals.alloc() if (waits or layered) else None
        if (waits or layered) and slot is None:  # every slot taken: behave like a plain load
            self.m.counters["pipelined_loads_unsignalled"] += 1
            if from_disk:
                self._promote_layered(ns, from_disk, None)
            if layered:
                self.m.fetches.fetch_layered(ns, layered, None)
            results = await asyncio.gather(*(f for _, f in waits), *(f for _, _, f, _ in layered))
            positions = [pos for pos, _ in waits] + [pos for pos, _, _, _ in layered]
            bad = [pos for pos, ok in zip(positions, results) if not ok]
            if bad:
                cut = min(bad)
                unpin_all(pinned[cut:])
                del pinned[cut:]
                del tiers[cut:]
            lease = self._loaded(session, keys, pinned, tiers)
            return [p.offset for p in pinned], tiers, lease.id if lease is not None else None, None
        lease = self._loaded(session, keys, pinned, tiers)
        if slot is None or lease is None:
            if slot is not None:
                self.m.signals.free(slot)
            if from_disk:  # (nothing pinned: no lease) the reads still finish their promotions
                self._promote_layered(ns, from_disk, None)
            return [p.offset for p in pinned], tiers, lease.id if lease is not None else None, None
        progress = LoadProgress(self.m.signals, slot, len(pinned), ns.ns.num_layers)
        lease.progress = progress
        waiting = {pos for pos, _ in waits} | {pos for pos, _, _, _ in layered}
        for i in range(len(pinned)):
            if i not in waiting:
                progress.page_done(i)
        for pos, fut in waits:
            fut.add_done_callback(functools.partial(_signal_page, progress, pos))
        if from_disk:
            self._promote_layered(ns, from_disk, progress)
        if layered:
            self.m.fetches.fetch_layered(ns, layered, progress)
        self.m.counters["pipelined_loads"] += 1
        return [p.offset for p in pinned], tiers, lease.id, slot

    def _worth_fetching(self, session: Session, keys: list[bytes]) -> list[bytes]:
        """The keys a load should bring, fetch or recompute decided (worth.worth_fetching): engines
        that answer their lookups from the shared table ask the daemon first here. Keys past the
        local prefix, in a cluster, are taken to be on peers."""
        if self.m.policy.name != "cost":
            return keys
        tiers, _ = self.m.lookups.probe(session.ns, keys)
        if self.m.cluster is not None:
            tiers = tiers + [Tier.DMP] * (len(keys) - len(tiers))
        n = self.m.worth.worth_fetching(session.ns.id, keys, tiers)
        if n == len(tiers):
            return keys
        self.m.counters["recompute_instead_pages"] += len(tiers) - n
        return keys[:n]

    def _pin_prefix(
        self,
        session: Session,
        keys: list[bytes],
        from_disk: list[tuple[int, Page, asyncio.Future[bool]]] | None = None,
    ) -> tuple[list[Page], list[Tier], list[tuple[int, asyncio.Future[bool]]], int | None]:
        """Pin what is in DRAM, start promotions of what is on disk, for the longest prefix; says
        where the remote part would begin (None when the cluster cannot continue it). With
        `from_disk`, disk pages get their slots but are not read: they are listed there for
        `_promote_layered` (their futures are in the waits all the same)."""
        ns = session.ns
        pinned: list[Page] = []
        tiers: list[Tier] = []
        waits: list[tuple[int, asyncio.Future[bool]]] = []
        remote_from: int | None = None
        to_dram: list[tuple[int, Page]] = []  # L1 pages a session without L1 asked for
        for key in keys:
            page = self.m.index.get(key)
            if page is not None and page.state & ~VRAM == READY:
                if page.ns != ns.id:
                    unpin_all(pinned)
                    raise NamespaceError(f"key {key.hex()} belongs to another namespace")
                if page.state & VRAM and not session.vram:
                    if page.pins:  # an L1 engine is reading it: it cannot move now
                        break
                    to_dram.append((len(pinned), page))
                page.pins += 1
                pinned.append(page)
                # a tier says where the offset is: VRAM the pool, anything else the arena
                tiers.append(Tier.VRAM if page.state & VRAM and session.vram else Tier.DRAM)
                continue
            if page is not None and page.state & ~VRAM == PROMOTING:
                fut = self.m._promotions.get(key)
                # a page landing in L1 may still move to DRAM (an RDMA fallback): only a plain load
                # of an L1 session, whose offsets are read after the wait, can wait for it
                if fut is None or (page.state & VRAM and (not session.vram or from_disk is not None)):
                    break
                page.pins += 1
                pinned.append(page)
                tiers.append(Tier.DISK)
                waits.append((len(pinned) - 1, fut))
                continue
            if page is not None:  # RESERVED by someone: not readable yet
                break
            if not self.m.lookups.on_disk(key, ns.digest):
                if self.m.lookups.on_disk_any_ns(key):
                    unpin_all(pinned)
                    raise NamespaceError(f"key {key.hex()} belongs to another namespace")
                if self.m.cluster is not None:
                    remote_from = len(pinned)
                break
            promoted = self._start_promotion(ns, key, read=from_disk is None)
            if promoted is None:
                break
            page, fut = promoted
            page.pins += 1
            pinned.append(page)
            tiers.append(Tier.DISK)
            waits.append((len(pinned) - 1, fut))
            if from_disk is not None and not fut.done():  # (a pending demotion is copied at once)
                from_disk.append((len(pinned) - 1, page, fut))
        if to_dram:
            moved = self.m.l1.start_vram_demotion([p for _, p in to_dram])
            for (pos, _), fut in zip(to_dram, moved):
                waits.append((pos, fut))
            if len(moved) < len(to_dram):  # no DRAM slot for the rest: the prefix ends there
                cut = to_dram[len(moved)][0]
                unpin_all(pinned[cut:])
                del pinned[cut:], tiers[cut:]
                waits[:] = [(pos, f) for pos, f in waits if pos < cut]
                if remote_from is not None and remote_from > cut:
                    remote_from = None
            waits.sort(key=lambda w: w[0])
        return pinned, tiers, waits, remote_from

    def _loaded(
        self, session: Session, keys: list[bytes], pinned: list[Page], tiers: list[Tier]
    ) -> Lease | None:
        """Account a load and put its pinned pages under a lease (None when nothing was pinned)."""
        ns = session.ns
        self.m.lookups.touch(pinned[::-1])
        n = len(pinned)
        self.m.counters["loads"] += 1
        self.m.counters["loaded_pages"] += n
        self.m.counters["loaded_bytes"] += n * ns.ns.page_bytes
        if self.m.vram is not None:
            self.m.counters["loaded_pages_vram"] += tiers.count(Tier.VRAM)
        self.m.counters["loaded_pages_disk"] += tiers.count(Tier.DISK)
        self.m.counters["loaded_pages_remote"] += tiers.count(Tier.DMP)
        self.m.counters["load_short_pages"] += len(keys) - n
        session.loaded_pages += n
        if not pinned:
            return None
        if session.vram and self.m.cfg.vram.promote_after_loads:
            self.m.l1.note_l1_loads(pinned)
        self.m.operator.count_prefix_hit(keys[0], n)
        lease = Lease(next(self.m._ids), session, pinned, self.m.clock() + self.m.cfg.daemon.lease_seconds)
        session.leases[lease.id] = lease
        return lease

    def promote_for_peer(
        self,
        ns_digest: bytes,
        keys: list[bytes],
        held_elsewhere: Callable[[bytes], bool],
        *,
        vram_ok: bool = False,
        from_vram: list[bytes] | None = None,
    ) -> list[asyncio.Future[bool]]:
        """A peer asks for `keys`: start bringing the disk pages and the L1 pages of the longest
        prefix held here into DRAM, so they can be sent like DRAM pages. Returns the futures of
        pages on their way (True: in DRAM now). Pages in DRAM, keys `held_elsewhere` (the lent DMP
        region) and, with `vram_ok` (the peer READs our pool directly), L1 pages need nothing; the
        walk stops at the first key held nowhere here, and at an L1 page that is pinned (an engine
        reading it, a peer's lease): it cannot move now. L1 pages go down through the demotion path
        engines without L1 use (`l1.start_vram_demotion`, one batch); their keys go to `from_vram`. A
        namespace no engine attached to since this daemon started is not known here (its page size
        and slots): nothing is promoted, and its disk pages are announced only once one does
        (`ClusterPool.announce_disk_pages`)."""
        info = self.m.namespaces.get(ns_digest)
        if info is None:
            return []
        futs: list[asyncio.Future[bool]] = []
        to_dram: list[Page] = []
        for key in keys:
            page = self.m.index.get(key)
            if page is not None:
                if page.state == READY or (page.state == READY_VRAM and vram_ok):
                    continue
                if page.state == READY_VRAM:
                    if page.pins or page.ns != info.id:
                        break
                    to_dram.append(page)
                    continue
                fut = self.m._promotions.get(key) if page.state & ~VRAM == PROMOTING else None
                if fut is None:
                    break
                futs.append(fut)
                continue
            if held_elsewhere(key):
                continue
            if not self.m.lookups.on_disk(key, ns_digest):
                break
            promoted = self._start_promotion(info, key)
            if promoted is None:
                break
            futs.append(promoted[1])
            self.m.counters["promoted_pages_for_peers"] += 1
        if to_dram and self.m.vram is not None:
            moved = self.m.l1.start_vram_demotion(to_dram)
            futs.extend(moved)
            self.m.counters["demoted_pages_vram_for_peers"] += len(moved)
            if from_vram is not None:
                from_vram.extend(p.key for p in to_dram[: len(moved)])
        return futs

    def _start_promotion(
        self, ns: NamespaceInfo, key: bytes, read: bool = True
    ) -> tuple[Page, asyncio.Future[bool]] | None:
        """A DRAM slot for a disk page (PROMOTING) and the future of its arrival; its bytes come from
        a pending demotion at once, else from the disk tier on an I/O thread (or, `read=False`,
        from `_promote_layered`, which the caller runs)."""
        pending, disk = self.m.pending.get(key), self.m.disk
        if pending is not None:
            parent = pending.parent
        else:
            entry = disk.entry(key) if disk is not None else None
            if entry is None:  # dropped from disk since the lookup (an I/O thread evicted it): a miss
                return None
            parent = entry.parent
        offset = self.m.space.alloc(ns.slot_bytes)
        if offset is None:
            return None
        page = Page(key, ns.id, offset, ns.ns.page_bytes, parent, PROMOTING)
        self.m.index.add(page)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self.m._promotions[key] = fut
        view = self.m.arena[offset : offset + page.size]
        if pending is not None:
            view[:] = pending.data
            self.finish_promotion(page, fut, None, on_disk=False)
        elif read:
            assert disk is not None
            io = loop.run_in_executor(self.m.executor, _timed, disk.get_into, key, view)

            def landed(f: asyncio.Future[tuple[None, float]]) -> None:
                error = PageNotFound("read cancelled") if f.cancelled() else f.exception()
                if error is None:  # the disk's fetch rate: a read and decode on an I/O thread
                    self.m.worth.fetch.observe(Tier.DISK, page.size, f.result()[1])
                self.finish_promotion(page, fut, error, on_disk=True)

            io.add_done_callback(landed)
        return page, fut

    def _promote_serial(self, items: list[tuple[Page, asyncio.Future[bool]]]) -> None:
        """Read the pages of `items` (PROMOTING, slots allocated) from disk on one I/O thread in
        turn; finish their promotions, in order, once all are read (`load(serial=True)`)."""
        disk, loop = self.m.disk, asyncio.get_running_loop()
        assert disk is not None  # these pages are on it

        def read_all() -> list[tuple[BaseException | None, float]]:
            out: list[tuple[BaseException | None, float]] = []
            for page, _ in items:
                started = time.perf_counter()
                try:
                    disk.get_into(page.key, self.m.arena[page.offset : page.offset + page.size])
                except Exception as e:  # noqa: BLE001 - this page fails, the others may not
                    out.append((e, 0.0))
                    continue
                out.append((None, time.perf_counter() - started))
            return out

        def landed(f: asyncio.Future[list[tuple[BaseException | None, float]]]) -> None:
            error = PageNotFound("read cancelled") if f.cancelled() else f.exception()
            results = [(error, 0.0)] * len(items) if error is not None else f.result()
            for (page, fut), (why, seconds) in zip(items, results):
                if why is None:  # the disk's fetch rate: a read on an I/O thread
                    self.m.worth.fetch.observe(Tier.DISK, page.size, seconds)
                self.finish_promotion(page, fut, why, on_disk=True)

        loop.run_in_executor(self.m.executor, read_all).add_done_callback(landed)

    def _promote_layered(
        self,
        ns: NamespaceInfo,
        items: list[tuple[int, Page, asyncio.Future[bool]]],
        progress: LoadProgress | None,
    ) -> None:
        task = asyncio.ensure_future(self._promote_layer_groups(ns, items, progress))
        self.m._disk_reads.add(task)
        task.add_done_callback(self.m._disk_reads.discard)

    async def _promote_layer_groups(
        self,
        ns: NamespaceInfo,
        items: list[tuple[int, Page, asyncio.Future[bool]]],
        progress: LoadProgress | None,
    ) -> None:
        """Disk pages of a pipelined load, layer group by layer group: every page's file is read,
        then group 0 of every page is decoded and verified (on the I/O threads), published, then
        group 1, ... Pages stored in layer groups (`DiskTier.put(groups=...)`) give the engine layer
        0 of the whole prefix after 1/8 of the decoding; a page stored whole arrives whole. A page
        that fails (gone, corrupt) ends the load there, as a failed remote page does."""
        loop, disk = asyncio.get_running_loop(), self.m.disk
        assert disk is not None  # these pages are on it
        run = functools.partial(loop.run_in_executor, self.m.executor)
        lb = ns.ns.layer_bytes
        opened = await asyncio.gather(
            *(run(_timed, disk.open_grouped, page.key) for _, page, _ in items), return_exceptions=True
        )
        live: list[tuple[int, Page, asyncio.Future[bool], Any]] = []
        spent: dict[int, float] = {}  # per page: seconds of reading and decoding on I/O threads
        for (pos, page, fut), got in zip(items, opened):
            if isinstance(got, BaseException):
                self.finish_promotion(page, fut, _read_error(got), on_disk=True)
            else:
                live.append((pos, page, fut, got[0]))
                spent[pos] = got[1]
        group = 0
        while live:
            batch = [it for it in live if group < len(it[3].ranges)]
            results = await asyncio.gather(
                *(
                    run(_timed, grouped.decode, group, self.m.arena[page.offset : page.offset + page.size])
                    for _, page, _, grouped in batch
                ),
                return_exceptions=True,
            )
            ready: list[int] = []
            for (pos, page, fut, grouped), res in zip(batch, results):
                if isinstance(res, BaseException):
                    self.finish_promotion(page, fut, _read_error(res), on_disk=True)
                    continue
                spent[pos] += res[1]
                if group + 1 == len(grouped.ranges):
                    self.m.worth.fetch.observe(Tier.DISK, page.size, spent[pos])  # the disk's fetch rate
                    self.finish_promotion(page, fut, None, on_disk=True)  # whole: READY
                else:
                    ready.append(pos)
            if progress is not None and ready and lb > 0:
                ends = {pos: grouped.ranges[group][1] for pos, _, _, grouped in batch}
                for layers in sorted({ends[p] // lb for p in ready}):
                    progress.layers_done([p for p in ready if ends[p] // lb == layers], layers)
            live = [it for it in live if not it[2].done()]
            group += 1

    def finish_promotion(
        self, page: Page, fut: asyncio.Future[bool], error: BaseException | None, *, on_disk: bool
    ) -> None:
        self.m._promotions.pop(page.key, None)
        in_vram = bool(page.state & VRAM)  # a peer's page READ into L1 (GPUDirect)
        if error is None:
            page.on_disk = on_disk
            self.m.index.mark_ready(page)
            (self.m.vram_policy if in_vram else self.m.policy).insert(page)  # type: ignore[union-attr]
            if self.m.events.wanted:
                self.m.events.emit(PageStored(page.key, Tier.VRAM if in_vram else Tier.DRAM))
            self.m.counters["promoted_pages"] += 1
            self.m.counters["promoted_bytes"] += page.size
            fut.set_result(True)
            return
        if isinstance(error, PageCorrupt):
            self.m.counters["corrupt_pages"] += 1
            log.warning("disk page %s failed its checksum and was dropped: %s", page.key.hex(), error)
        elif not isinstance(error, PageNotFound):
            log.error("promotion of %s failed: %r", page.key.hex(), error)
        else:  # gone since the lookup (evicted, deleted): the engine recomputes it
            log.debug("promotion of %s: %s", page.key.hex(), error)
        self.m.counters["promotion_failures"] += 1
        self.m.index.remove(page.key)
        if in_vram:
            self.m.vram.free(page.offset)  # type: ignore[union-attr]
        else:
            self.m.allocator.free(page.offset, slot_size(page.size))
        fut.set_result(False)


def _timed(fn: Callable[..., _T], *args: object) -> tuple[_T, float]:
    """Run `fn(*args)` (on an I/O thread): what it returned, and the seconds it took."""
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def _read_error(e: BaseException) -> BaseException:
    """A disk read that the I/O pool's shutdown cancelled is a miss, not an error to log."""
    return PageNotFound("read cancelled") if isinstance(e, asyncio.CancelledError) else e


def _signal_page(progress: LoadProgress, pos: int, fut: asyncio.Future[bool]) -> None:
    """A pipelined load's page `pos` arrived (or failed): tell the engine through its signal slot."""
    if not fut.cancelled() and fut.result():
        progress.page_done(pos)
    else:
        progress.fail(pos)

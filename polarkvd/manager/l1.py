"""L1 moves: demotion of L1 pages to DRAM (under pressure, for loaders without L1, by the
operator) and promotion of DRAM pages that L1 sessions load often into L1.

A part of the manager (polarkvd/manager/__init__.py): it holds no state of its own beyond what
is named here; the shared state is the manager's.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any

from polarkvd.config.values import format_size
from polarkvd.errors import (
    ErrorCode,
    PolarKVError,
)
from polarkvd.index import (
    READY,
    READY_VRAM,
    VRAM,
    Page,
)
from polarkvd.manager.events import PageRemoved, PageStored
from polarkvd.tiers.dram import slot_size
from polarkvd.types import Tier

if TYPE_CHECKING:
    from polarkvd.manager import Manager

log = logging.getLogger(__name__)

#: How many DRAM pages loaded by L1 sessions the promotion count remembers (~100 B each).
L1_LOADS_REMEMBERED = 1 << 16


class L1Moves:
    """L1 demotion and promotion."""

    def __init__(self, m: Manager) -> None:
        self.m = m

    def schedule_vram_demotion(self, min_pages: int = 0) -> None:
        """Start a background demotion of L1 when it is above vram.high_watermark, or (`min_pages`)
        when a reserve found it full; one at a time. Loop only (a periodic chore, and reserves); a
        no-op outside a running loop (in-process tests call `demote_vram` themselves)."""
        pool = self.m.vram
        if pool is None or (self.m._vram_task is not None and not self.m._vram_task.done()):
            return
        if not min_pages and pool.slots.used_bytes <= self.m.cfg.vram.high_watermark * pool.capacity:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.m._vram_task = loop.create_task(self.demote_vram(min_pages))

    async def demote_vram(
        self, min_pages: int = 0, *, everything: bool = False, batch_bytes: int = 256 << 20
    ) -> int:
        """Move L1 pages to DRAM until L1 is at vram.low_watermark and at least `min_pages` moved
        (`everything`: every page that can). Victims come from L1's policy, leaf first, unpinned only;
        each batch (at most `batch_bytes`) is one pool -> arena copy in the I/O pool. Returns the pages
        moved. A batch that fails leaves its pages in L1 and ends the call."""
        pool = self.m.vram
        if pool is None:
            return 0
        moved = 0
        while True:
            target = 0 if everything else self.m.cfg.vram.low_watermark * pool.capacity
            if pool.slots.used_bytes <= target and moved >= min_pages:
                break
            want = min(batch_bytes, max(0, int(pool.slots.used_bytes - target)))
            victims = self.vram_victims(want, max(0, min_pages - moved))
            futs = self.start_vram_demotion(victims) if victims else []
            if not futs:
                break
            ok = sum(await asyncio.gather(*futs))
            moved += ok
            if ok < len(futs):
                break
        return moved

    def note_l1_loads(self, pages: list[Page]) -> None:
        """An L1 session loaded `pages`: those in DRAM count a load, and once loaded
        `vram.promote_after_loads` times (within the last L1_LOADS_REMEMBERED such loads) are due
        for promotion into L1. Pages loaded once (a scan) never are."""
        due, seen = self.m.cfg.vram.promote_after_loads, self.m._l1_loads
        for page in pages:
            if page.state & VRAM:
                continue
            n = seen.pop(page.key, 0) + 1
            if n >= due:
                self.m._l1_due[page.key] = None
            else:
                seen[page.key] = n  # re-inserted: now the newest
        while len(seen) > L1_LOADS_REMEMBERED:
            del seen[next(iter(seen))]
        while len(self.m._l1_due) > L1_LOADS_REMEMBERED:
            del self.m._l1_due[next(iter(self.m._l1_due))]

    def schedule_vram_promotion(self, batch_bytes: int = 256 << 20) -> int:
        """Start copying the DRAM pages due for L1 into free L1 slots: one batch (`VramPool.from_host`
        in the I/O pool) at a time. A chore (loop only), after loads: never on a load's path.

        The page stays READY in DRAM while its bytes are copied (lookups and loads go on; a pin keeps
        its slot from eviction), and moves to L1 only if nobody pinned it meanwhile. Pages being
        read wait for the next round; pages gone or moved are forgotten. Promotion never makes room:
        it stops at `vram.high_watermark`, during a demotion and while draining. Returns the pages
        whose copy started."""
        pool = self.m.vram
        if pool is None or not self.m._l1_due or self.m.draining:
            return 0
        if self.m._vram_promotion is not None and not self.m._vram_promotion.done():
            return 0
        if self.m._vram_task is not None and not self.m._vram_task.done():
            return 0
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return 0
        limit = self.m.cfg.vram.high_watermark * pool.capacity
        if pool.slots.used_bytes >= limit:
            return 0  # no room: the due pages wait (every 0.25 s, so not a walk over all of them)
        moves: list[tuple[Page, int]] = []
        total = 0
        for key in list(self.m._l1_due):
            page = self.m.index.get(key)
            if page is None or page.state != READY or key in self.m.operator_pins:
                del self.m._l1_due[key]  # gone, moved, or pinned in DRAM by the operator
                continue
            if page.pins:
                continue  # an engine is reading it: next round
            if pool.slots.used_bytes + page.size > limit or total >= batch_bytes:
                break
            offset = pool.alloc(page.size)
            if offset is None:
                break
            del self.m._l1_due[key]
            page.pins += 1  # the copy reads its DRAM slot
            moves.append((page, offset))
            total += page.size
        if not moves:
            return 0
        items = [(page.offset, offset, page.size) for page, offset in moves]
        host = self.m.vram_host
        assert host is not None  # the daemon registers the arena with the pool it creates
        io = loop.run_in_executor(self.m.executor, pool.from_host, host, items)
        self.m._vram_promotion = io
        io.add_done_callback(lambda f: self._finish_vram_promotion(moves, f))
        return len(moves)

    def _finish_vram_promotion(self, moves: list[tuple[Page, int]], f: asyncio.Future[Any]) -> None:
        error = asyncio.CancelledError() if f.cancelled() else f.exception()
        if error is not None:
            log.error("vram: copying %d pages into L1 failed; they stay in DRAM: %r", len(moves), error)
            self.m.counters["promotion_failures_vram"] += len(moves)
        pool, pol = self.m.vram, self.m.vram_policy
        assert pool is not None and pol is not None
        for page, offset in moves:
            page.pins -= 1
            current = self.m.index.get(page.key) is page and page.state == READY
            if error is not None or not current or page.pins:
                pool.free(offset)
                if error is None and current:
                    self.m._l1_due[page.key] = None  # pinned while copied: again next round
                continue
            self.m.policy.remove(page)
            self.m.allocator.free(page.offset, slot_size(page.size))
            self.m.index.move_to_vram(page, offset)
            pol.insert(page)
            if self.m.events.wanted:  # still ours, one tier up (added first: never a gap)
                self.m.events.emit(PageStored(page.key, Tier.VRAM))
                self.m.events.emit(PageRemoved(page.key, Tier.DRAM))
            self.m.counters["promoted_pages_vram"] += 1
            self.m.counters["promoted_bytes_vram"] += page.size

    def vram_victims(self, max_bytes: int, min_pages: int = 0) -> list[Page]:
        """Unpinned L1 pages in L1's policy order, unlinked from it: first those without cached
        children (leaves), then, when none is left, the coldest of the rest (interior pages whose
        leaves went down to DRAM already: moving them keeps the prefix in memory). Enough pages to
        free `max_bytes` of slots, and at least `min_pages`."""
        self.m.lookups.apply_touches()
        self.m.lookups.apply_table_touches()
        pol = self.m.vram_policy
        assert pol is not None

        taken: collections.Counter[bytes] = collections.Counter()  # children already chosen, by parent

        def leaf(node: Any) -> bool:  # a Page: L1's policy holds only pages
            return bool(node.pins == 0 and node.children == taken[node.key] and node.state == READY_VRAM)

        def unpinned(node: Any) -> bool:
            return bool(node.pins == 0 and node.state == READY_VRAM)

        out: list[Page] = []
        total = 0
        test = leaf
        while total < max_bytes or len(out) < min_pages:
            got = pol.victims(1, test)
            if not got:
                if test is unpinned:
                    break
                test = unpinned
                continue
            page: Page = got[0]  # type: ignore[assignment]
            out.append(page)
            total += page.size
            if page.linked and page.parent is not None:
                taken[page.parent] += 1
        return out

    def start_vram_demotion(self, pages: list[Page]) -> list[asyncio.Future[bool]]:
        """Start moving READY_VRAM `pages` to DRAM: a DRAM slot each (while DRAM has room; the rest
        stay in L1), PROMOTING meanwhile (lookups miss them, loads wait for them), one batched copy
        `VramPool.to_host` in the I/O pool (ctypes releases the GIL: the loop runs on). One future
        per page started, in order: True once it is READY in DRAM, False when it stayed in L1."""
        loop = asyncio.get_running_loop()
        pol = self.m.vram_policy
        assert pol is not None and self.m.vram is not None
        moves: list[tuple[Page, int, asyncio.Future[bool]]] = []
        for page in pages:
            offset = self.m.space.alloc(self.m._ns_by_id[page.ns].slot_bytes)
            if offset is None:
                break
            pol.remove(page)
            pool_offset = page.offset
            self.m.index.unready(page, offset)
            fut: asyncio.Future[bool] = loop.create_future()
            self.m._promotions[page.key] = fut
            moves.append((page, pool_offset, fut))
        for page in pages[len(moves) :]:
            pol.insert(page)  # no room in DRAM: stays in L1 (a no-op when it never left the policy)
        if not moves:
            return []
        items = [(pool_offset, page.offset, page.size) for page, pool_offset, _ in moves]
        host = self.m.vram_host
        assert host is not None  # the daemon registers the arena with the pool it creates
        io = loop.run_in_executor(self.m.executor, self.m.vram.to_host, host, items)
        io.add_done_callback(lambda f: self._finish_vram_demotion(moves, f))
        return [fut for _, _, fut in moves]

    def _finish_vram_demotion(
        self, moves: list[tuple[Page, int, asyncio.Future[bool]]], f: asyncio.Future[Any]
    ) -> None:
        error = asyncio.CancelledError() if f.cancelled() else f.exception()
        if error is not None:
            log.error("vram: copying %d pages to DRAM failed; they stay in L1: %r", len(moves), error)
            self.m.counters["demotion_failures_vram"] += len(moves)
        for page, pool_offset, fut in moves:
            self.m._promotions.pop(page.key, None)
            if error is None:
                self.m.vram.free(pool_offset)  # type: ignore[union-attr]
                self.m.index.mark_ready(page)  # PROMOTING -> READY in DRAM
                self.m.policy.insert(page)
                if self.m.events.wanted:  # still ours, one tier down (added first: never a gap)
                    self.m.events.emit(PageStored(page.key, Tier.DRAM))
                    self.m.events.emit(PageRemoved(page.key, Tier.VRAM))
                self.m.counters["demoted_pages_vram"] += 1
                self.m.counters["demoted_bytes_vram"] += page.size
            else:
                self.m.allocator.free(page.offset, slot_size(page.size))
                self.m.index.restore_vram(page, pool_offset)
                self.m.vram_policy.insert(page)  # type: ignore[union-attr]
            if not fut.done():
                fut.set_result(error is None)

    async def evict_vram(self, nbytes: int, *, batch_bytes: int = 256 << 20) -> int:
        """Operator eviction from L1: move at least `nbytes` of unpinned L1 pages to DRAM (as a
        demotion under pressure does: L1's policy order, leaves first, batched copies), or every page
        that can move. Returns the bytes of L1 freed. Pages pinned by a lease stay; so do pages DRAM has
        no room for (the call then ends short)."""
        if self.m.vram is None:
            raise PolarKVError("this daemon has no L1 (VRAM) tier", code=ErrorCode.BAD_VALUE)
        freed = 0
        while freed < nbytes:
            victims = self.vram_victims(min(batch_bytes, nbytes - freed), 1)
            sizes = [p.size for p in victims]
            futs = self.start_vram_demotion(victims) if victims else []
            if not futs:
                break
            moved = await asyncio.gather(*futs)
            freed += sum(size for size, ok in zip(sizes, moved) if ok)
            if not all(moved):
                break
        if freed:  # counted with every demotion in demoted_pages_vram / demoted_bytes_vram
            log.info("operator: moved %s of L1 pages to DRAM", format_size(freed))
        return freed

"""Room for another page size: empty one chosen slab of the arena, a bounded batch at a time.

Owns the emptying of a slab when a page size has no free slot, no page of its own size to evict
and no empty slab (two models on one host: docs/DESIGN-NOTES.md, "Two page sizes in one arena").
The allocator (tiers/dram.py) picks the slab from prices this module gives per page (`cost`);
this module moves the slab's pages into free slots of their size elsewhere or evicts them through
the manager's normal eviction (demotion to peers or disk), in slices of a few milliseconds on the
event loop, and hands the empty slab to the size that asked. It never touches a pinned page, a
page being written (RESERVED) or filled (PROMOTING), or a slot it cannot name (an expired
reservation's quarantined slot): engines may hold those offsets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from polarkvd.index import READY, Page
from polarkvd.tiers.dram import SlabPlan

if TYPE_CHECKING:
    from polarkvd.manager import Manager

log = logging.getLogger(__name__)

#: Slabs priced before one is chosen (~2 ms each at 2,048 pages a slab, one per turn of the loop).
MAX_SLABS = 4
#: Event-loop time one slice of a reclaim may take before it yields to other requests.
SLICE_SECONDS = 0.002
#: How long a reclaim waits for pages of its slab that were pinned meanwhile (a load's lease),
#: before it gives up and the slab serves its old size again.
PINNED_WAIT_SECONDS = 0.2
#: The coldest pages of the policy that price as cold (cheaper to evict than the others).
COLD_PAGES = 8192


@dataclasses.dataclass
class Reclaim:
    target: int  # the slot size that gets the slab
    started: float
    plan: SlabPlan | None = None
    queue: list[tuple[int, Page, bool]] = dataclasses.field(default_factory=list)  # (offset, page, move)
    done: asyncio.Future[bool] | None = None
    moved: int = 0
    evicted: int = 0


class SlabReclaimer:
    def __init__(self, manager: Manager) -> None:
        self.m = manager
        self.inflight: dict[int, Reclaim] = {}  # target slot size -> its reclaim
        self._tasks: set[asyncio.Future[Any]] = set()

    def pending(self, slot_bytes: int) -> asyncio.Future[bool] | None:
        """The future of a reclaim under way for `slot_bytes` (True: a slab of it is free now)."""
        r = self.inflight.get(slot_bytes)
        return r.done if r is not None else None

    def room(self, slot_bytes: int) -> int | None:
        """A slot of `slot_bytes` by emptying a slab of another size, or None: none to take, or
        (with an event loop) a reclaim runs in the background and `pending` says when it is done."""
        m = self.m
        if slot_bytes in self.inflight or not m.allocator.other_sizes(slot_bytes):
            return None
        r = Reclaim(slot_bytes, time.monotonic())
        if m._loop is None:  # in-process tests: all at once
            r.plan = m.allocator.choose_slab(slot_bytes, self._cost())
            if r.plan is None:
                return None
            self._start(r)
            if not self._step(r, deadline=None):
                self._step(r, deadline=None)  # the pages its first pass found pinned are still pinned
            return m.allocator.alloc(slot_bytes) if self._finish(r) else None
        r.done = m._loop.create_future()
        self.inflight[slot_bytes] = r
        task = asyncio.ensure_future(self._run(r))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None

    def _cost(self) -> Callable[[int, Any], int | None]:
        """The price of evicting each page (allocator.SlotCost), as the policy sees them now."""
        m = self.m
        m.apply_touches()
        m.apply_table_touches()
        cold = {id(n) for n in m.policy.coldest(COLD_PAGES)}
        get = m.index.get

        def cost(offset: int, page: Any) -> int | None:
            if (
                type(page) is not Page
                or page.offset != offset
                or page.state != READY
                or page.pins
                or get(page.key) is not page
            ):
                return None
            # a page with cached children breaks their chain in DRAM when it goes; a warm one is
            # likely to be asked for again
            return 1 + (page.children > 0) + (id(page) not in cold)

        return cost

    async def _choose(self, r: Reclaim) -> SlabPlan | None:
        """allocator.choose_slab, one slab priced per turn of the loop."""
        alloc = self.m.allocator
        cost = self._cost()
        best, best_cost = None, 0.0
        for bound, slab in alloc.candidates(r.target)[:MAX_SLABS]:
            if best is not None and bound >= best_cost:
                break
            c = alloc.price(slab, cost)
            if c is not None and (best is None or c < best_cost):
                best, best_cost = slab, c
            await asyncio.sleep(0)
        if best is None:
            return None
        return alloc.plan(best, cost)

    def _start(self, r: Reclaim) -> None:
        assert r.plan is not None
        self.m.allocator.drain(r.plan.slab)
        r.queue = [(o, p, False) for o, p in reversed(r.plan.evicts)]
        r.queue += [(o, p, True) for o, p in reversed(r.plan.moves)]  # popped first

    async def _run(self, r: Reclaim) -> None:
        ok = False
        try:
            r.plan = await self._choose(r)
            if r.plan is None:
                self.m.counters["slab_reclaims_failed"] += 1
                return
            self._start(r)
            while not self._step(r, deadline=time.monotonic() + SLICE_SECONDS):
                if time.monotonic() - r.started > PINNED_WAIT_SECONDS:
                    break
                # a queue left over is pages pinned meanwhile: give their loads a moment
                await asyncio.sleep(0 if r.queue else 0.001)
            ok = self._finish(r)
        finally:
            self.inflight.pop(r.target, None)
            if not ok and r.plan is not None and r.plan.slab in self.m.allocator.draining:
                self.m.allocator.undrain(r.plan.slab)
            if r.done is not None and not r.done.done():
                r.done.set_result(ok)

    def _step(self, r: Reclaim, deadline: float | None) -> bool:
        """Move or evict queued pages until `deadline`; True once the slab is empty."""
        m, alloc = self.m, self.m.allocator
        queue, plan = r.queue, r.plan
        assert plan is not None  # planned before the first step
        while queue:
            if deadline is not None and time.monotonic() > deadline:
                return False
            offset, page, move = queue.pop()
            if page.offset != offset or m.index.get(page.key) is not page:
                continue  # gone meanwhile (evicted, loaded into L1): its slot is free already
            if page.state != READY or page.pins:
                continue  # pinned meanwhile: looked at again below
            target = alloc.alloc(plan.slot_bytes, carve=False) if move else None
            if target is not None:
                m.arena[target : target + page.size] = m.arena[offset : offset + page.size]
                page.offset = target
                alloc.claim(target, page)
                alloc.free(offset, plan.slot_bytes)
                r.moved += 1
            else:
                m.policy.remove(page)
                m.space.evict_page(page, "slab")
                r.evicted += 1
        if alloc.slots_in_use(plan.slab) == 0:
            return True
        # pages pinned since the plan was made, or slots of pages that left without freeing them:
        # queue the ones that can go now; the others keep the slab from emptying for a while
        for off, page in alloc.occupants(plan.slab):
            if (
                type(page) is Page
                and page.offset == off
                and page.state == READY
                and not page.pins
                and m.index.get(page.key) is page
            ):
                queue.append((off, page, False))
        return False

    def _finish(self, r: Reclaim) -> bool:
        m, alloc = self.m, self.m.allocator
        plan = r.plan
        assert plan is not None  # planned before it finishes
        ms = (time.monotonic() - r.started) * 1e3
        m.counters["slab_moved_pages"] += r.moved
        if alloc.slots_in_use(plan.slab) != 0:
            alloc.undrain(plan.slab)
            m.counters["slab_reclaims_failed"] += 1
            log.info(
                "could not empty a slab for %d-byte slots: %d pages stayed pinned (moved %d, "
                "evicted %d, %.1f ms)", r.target, alloc.slots_in_use(plan.slab), r.moved, r.evicted, ms
            )  # fmt: skip
            return False
        alloc.give(plan.slab, r.target)
        m.counters["slab_reclaims"] += 1
        log.info(
            "slab %d now holds %d-byte slots (was %d): moved %d and evicted %d pages in %.1f ms",
            plan.slab, r.target, plan.slot_bytes, r.moved, r.evicted, ms,
        )  # fmt: skip
        return True

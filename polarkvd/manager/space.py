"""DRAM space: allocating slots (evicting, or emptying a slab of another size), eviction,
demotion of evicted pages to peers or disk, the disk write queue, watermarks, operator eviction,
and draining.

A part of the manager (polarkvd/manager/__init__.py): it holds no state of its own beyond what
is named here; the shared state is the manager's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

from polarkvd.errors import (
    ErrorCode,
    PolarKVError,
)
from polarkvd.index import (
    READY,
    Page,
)
from polarkvd.manager.events import PageRemoved, PageStored
from polarkvd.manager.records import PendingDemotion
from polarkvd.policy import switch_policy
from polarkvd.tiers.dram import slot_size
from polarkvd.transport.pipeline import (
    layer_group_ends,
)
from polarkvd.types import Tier

if TYPE_CHECKING:
    from polarkvd.manager import Manager

log = logging.getLogger(__name__)

#: Pages of its own size the policy is searched for when a reserve needs a slot (beyond them, a
#: slab of another size is emptied: slab_reclaim.py).
SAME_SIZE_SCAN = 1024


class Space:
    """DRAM space and demotion."""

    def __init__(self, m: Manager) -> None:
        self.m = m

    def alloc(self, slot_bytes: int) -> int | None:
        """A free slot, else one freed by evicting a page of the same size (a bounded search in
        policy order), else a slab of another size emptied (slab_reclaim.py: at once when small,
        else in the background: None, and `reclaim.pending` says when to ask again), else the
        whole policy searched for a page of this size."""
        offset = self.m.allocator.alloc(slot_bytes)
        while offset is None:
            if not self._evict_one(slot_bytes, "capacity", SAME_SIZE_SCAN):
                offset = self.m.reclaim.room(slot_bytes)
                if offset is None and self.m.reclaim.pending(slot_bytes) is None:
                    if self._evict_one(slot_bytes, "capacity"):
                        offset = self.m.allocator.alloc(slot_bytes)
                return offset
            offset = self.m.allocator.alloc(slot_bytes)
        return offset

    def _evict_one(self, slot_bytes: int | None, reason: str, limit: int | None = None) -> bool:
        """Evict the policy's first unpinned leaf in DRAM: of `slot_bytes` if given (among the
        first `limit` pages), else of any size."""
        self.m.lookups.apply_touches()  # the policy must know every lookup answered so far before it picks
        self.m.lookups.apply_table_touches()

        def evictable_same(node: Any) -> bool:  # a Page: the DRAM policy holds only pages
            return bool(
                node.pins == 0
                and node.children == 0
                and node.state == READY
                and slot_size(node.size) == slot_bytes
            )

        def evictable_any(node: Any) -> bool:
            return bool(node.pins == 0 and node.children == 0 and node.state == READY)

        if slot_bytes is not None:
            victims = self.m.policy.victims(1, evictable_same, limit)
        else:
            victims = self.m.policy.victims(1, evictable_any)
        if not victims:
            return False
        page = victims[0]
        assert isinstance(page, Page)
        self.evict_page(page, reason)
        return True

    def evict_page(self, page: Page, reason: str) -> None:
        """A READY page leaves DRAM (already out of the policy): demoted, its slot freed."""
        self.demote(page)
        self.m.index.remove(page.key)
        self.m.allocator.free(page.offset, slot_size(page.size))
        self.m.counters[f"evicted_pages_dram_{reason}"] += 1
        self.m.counters["evicted_bytes_dram"] += page.size

    def demote(self, page: Page) -> None:
        """An evicted page leaves DRAM: to peers' lent DRAM (L3) when the cluster has room, else
        queued for the disk tier (unless it is there already)."""
        if self.m.events.wanted:
            self.m.events.emit(PageRemoved(page.key, Tier.DRAM))
        if self.m.cluster is not None:
            if not page.on_disk and self._demote_to_pool(page):
                return
        if self.m.disk is None:
            return
        if page.on_disk:  # used in DRAM until now: recent on disk too, as if written now
            self.m.disk.touch(page.key)
            return
        if self.m.policy.name == "cost" and self.m.worth.cheaper_to_recompute(page):
            self.m.counters["dropped_pages_cheap"] += 1  # recomputing it costs less than reading it back
            return
        if self.m.pending_bytes + page.size > self.m.cfg.disk.max_pending_bytes:
            self.m.counters["demotions_dropped"] += 1
            return
        self.write_to_disk(page.key, self._pend(page))

    def _pend(self, page: Page) -> PendingDemotion:
        """A copy of a page leaving DRAM, readable (lookups, promotions) until it lands elsewhere."""
        info = self.m._ns_by_id[page.ns]
        item = PendingDemotion(
            bytes(self.m.arena[page.offset : page.offset + page.size]),
            info.digest,
            page.parent,
            info.ns.itemsize,
            page.depth,
        )
        self.m.pending[page.key] = item
        self.m.pending_bytes += page.size
        return item

    def _unpend(self, key: bytes, item: PendingDemotion) -> None:
        if self.m.pending.get(key) is item:
            del self.m.pending[key]
            self.m.pending_bytes -= len(item.data)

    def _demote_to_pool(self, page: Page) -> bool:
        """Send an evicted page to the peers `cluster.replicas` picks; the disk gets it if they fail."""
        cluster = self.m.cluster
        assert cluster is not None  # only called in a cluster
        targets = cluster.demote_targets(page.key, page.size)
        if not targets or self.m.pending_bytes + page.size > self.m.cfg.disk.max_pending_bytes:
            return False
        info = self.m._ns_by_id[page.ns]
        item = self._pend(page)
        fut = asyncio.ensure_future(cluster.demote(info.digest, page.key, page.parent, item.data, targets))
        self.m._cluster_tasks.add(fut)

        def done(f: asyncio.Future[int]) -> None:
            self.m._cluster_tasks.discard(f)
            stored = 0 if f.cancelled() or f.exception() is not None else f.result()
            if stored:
                self.m.counters["demoted_pages_dmp"] += 1
                self.m.counters["demoted_bytes_dmp"] += len(item.data)
                self._unpend(page.key, item)
                self.m.table_upkeep.sync_disk_entry(page.key)  # on peers now, not on our disk
            elif self.m.pending.get(page.key) is not item:
                pass  # a later demotion of the same page replaced it
            elif self.m.disk is not None:
                self.m.counters["demotions_dmp_to_disk"] += 1
                self.write_to_disk(page.key, item)  # the pending entry stays until written
            else:
                self._unpend(page.key, item)
                self.m.table_upkeep.sync_disk_entry(page.key)
                self.m.counters["demotions_dropped"] += 1

        fut.add_done_callback(done)
        return True

    def write_to_disk(
        self, key: bytes, item: PendingDemotion, counter: str = "demoted_pages", durable: bool = False
    ) -> asyncio.Future[Any]:
        """`durable`: through the group commit (synced before the future is done)."""
        loop = asyncio.get_running_loop()
        info = self.m.namespaces.get(item.ns_digest)
        # stored in layer groups, each readable and verifiable on its own: a pipelined load can
        # hand the engine layer 0 of every page before the last group is decoded
        groups = (
            layer_group_ends(info.ns.num_layers, info.ns.layer_bytes, len(item.data))
            if info is not None
            else None
        )
        if durable:
            assert self.m.group_commit is not None  # write-through needs the disk tier
            fut = self.m.group_commit.submit(
                key, item.parent, item.ns_digest, item.data, item.itemsize, groups, item.depth
            )
        else:
            assert self.m.disk is not None  # only called with a disk tier
            put = functools.partial(self.m.disk.put, depth=item.depth)
            fut = loop.run_in_executor(
                self.m.executor, put, key, item.parent, item.ns_digest, item.data, item.itemsize, groups
            )
        self.m._disk_writes.add(fut)

        def done(f: asyncio.Future[Any]) -> None:
            self.m._disk_writes.discard(f)
            self._unpend(key, item)
            self.m.table_upkeep.sync_disk_entry(
                key
            )  # on disk now, or (failed, dropped) nowhere but maybe DRAM
            if f.cancelled():  # the I/O pool shut down under it (daemon stopping)
                self.m.counters["demotions_cancelled"] += 1
            elif f.exception() is not None:
                self.m.counters["demotion_failures"] += 1
                log.error("writing page %s to disk failed: %r", key.hex(), f.exception())
            elif f.result():
                self.m.counters[counter] += 1
                self.m.counters[counter.replace("_pages", "_bytes")] += len(item.data)
                page = self.m.index.get(key)
                if page is not None:
                    page.on_disk = True
                if self.m.events.wanted:  # peers can have it from our disk too
                    self.m.events.emit(PageStored(key, Tier.DISK))
            else:
                self.m.counters["write_through_failed_pages" if durable else "demotions_dropped"] += 1

        fut.add_done_callback(done)
        return fut

    def evict_bytes(self, tier: Tier, nbytes: int) -> int:
        """Operator eviction from DRAM (demoting to disk). Returns bytes freed."""
        if tier is not Tier.DRAM:
            raise PolarKVError(f"evict from {tier.label} goes through evict_disk", code=ErrorCode.BAD_VALUE)
        freed = 0
        while freed < nbytes:
            before = self.m.index.ready_bytes
            if not self._evict_one(None, "operator"):
                break
            freed += before - self.m.index.ready_bytes
        return freed

    async def evict_disk(self, nbytes: int) -> int:
        if self.m.disk is None:
            return 0
        return await asyncio.get_running_loop().run_in_executor(
            self.m.executor, self.m.disk.evict_bytes, nbytes
        )

    def set_policy(self, tier: Tier, name: str) -> None:
        if tier is Tier.DRAM:
            if name != self.m.policy.name:
                self.m.policy = switch_policy(self.m.policy, name)
                self.m.worth.attach(self.m.policy)
            self.m.cfg.dram.policy = name
        elif tier is Tier.DISK and self.m.disk is not None:
            self.m.disk.set_policy(name)
            self.m.cfg.disk.policy = name
        log.info("eviction policy of %s is now %s", tier.label, name)

    def enforce_watermarks(self, budget_bytes: int = 64 << 20) -> int:
        """Background demotion (a periodic chore): above dram.high_watermark, evict down to low.

        Evicts like a full arena would (policy order, leaf-first, pinned pages stay), demoting to
        disk. Frees at most `budget_bytes` per call so the loop stays responsive, and stops before
        the disk queue (disk.max_pending_bytes) would have to drop a demotion: background work waits
        for the disk rather than losing pages. Returns the pages evicted.
        """
        cap = self.m.allocator.capacity
        if self.m.allocator.used_bytes <= self.m.cfg.dram.high_watermark * cap:
            return 0
        target = self.m.cfg.dram.low_watermark * cap
        largest = max((info.ns.page_bytes for info in self.m.namespaces.values()), default=0)
        freed = evicted = 0
        while self.m.allocator.used_bytes > target and freed < budget_bytes:
            if self.m.disk is not None and self.m.pending_bytes + largest > self.m.cfg.disk.max_pending_bytes:
                break
            before = self.m.allocator.used_bytes
            if not self._evict_one(None, "watermark"):
                break
            freed += before - self.m.allocator.used_bytes
            evicted += 1
        return evicted

    async def drain(self) -> dict[str, int]:
        """Stop taking new pages; write every DRAM page that is not on disk yet; flush the disk index."""
        self.m.draining = True
        writes: list[asyncio.Future[Any]] = []
        if self.m.vram is not None:  # L1 pages go down to DRAM first, and from there to disk below
            await self.m.l1.demote_vram(everything=True)
        if self.m.disk is not None:
            for page in self.m.index:
                if page.state == READY and not page.on_disk and page.key not in self.m.pending:
                    info = self.m._ns_by_id[page.ns]
                    while (
                        self.m._disk_writes
                        and self.m.pending_bytes + page.size > self.m.cfg.disk.max_pending_bytes
                    ):
                        # bounded like demotions: never a second copy of the whole arena in memory
                        await asyncio.wait(list(self.m._disk_writes), return_when=asyncio.FIRST_COMPLETED)
                    if page.state != READY or page.key in self.m.pending:
                        continue  # evicted or being written while we waited
                    data = bytes(self.m.arena[page.offset : page.offset + page.size])
                    item = PendingDemotion(data, info.digest, page.parent, info.ns.itemsize, page.depth)
                    self.m.pending[page.key] = item
                    self.m.pending_bytes += page.size
                    writes.append(self.write_to_disk(page.key, item))
            await self.flush()
        # counted once written: a full or failing disk refuses some (the disk tier logs why)
        written = sum(1 for f in writes if not f.cancelled() and f.exception() is None and f.result())
        log.log(
            logging.WARNING if written < len(writes) else logging.INFO,
            "drained: %d pages written to disk%s; new stores are refused until `polarkvd resume`",
            written,
            f", {len(writes) - written} could not be written (they stay in DRAM only)"
            if written < len(writes)
            else "",
        )
        return {
            "written_pages": written,
            "unwritten_pages": len(writes) - written,
            "dram_pages": self.m.index.ready_pages,
        }

    async def flush(self) -> None:
        """Wait for queued disk writes and persist the disk index."""
        while self.m._disk_writes:
            await asyncio.gather(*list(self.m._disk_writes), return_exceptions=True)
        if self.m.disk is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(self.m.executor, self.m.disk.flush_index)
            except OSError as e:  # e.g. the disk is full: the pages are there, the index is rebuilt at start
                log.error("saving the disk index failed: %s (it is rebuilt from page headers at start)", e)

    def resume(self) -> None:
        self.m.draining = False

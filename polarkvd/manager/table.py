"""Disk pages in the shared lookup table: listing a namespace's disk pages when it becomes known,
keeping each entry true as copies reach or leave the disk, and rebuilding the table.

A part of the manager (polarkvd/manager/__init__.py): it holds no state of its own beyond what
is named here; the shared state is the manager's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from polarkvd.index import (
    READY,
    VRAM,
    Page,
)
from polarkvd.manager.events import DiskPagesRemoved
from polarkvd.manager.records import NamespaceInfo
from polarkvd.types import Tier
from polarkvd.wire.lookup_table import TIER_DISK

if TYPE_CHECKING:
    from polarkvd.manager import Manager

log = logging.getLogger(__name__)

#: Disk pages put in the shared lookup table per turn of the event loop when listing them (a
#: namespace's pages on disk, or the disk entries a rebuild puts back): ~2-3 us each, ~5 ms a turn.
LIST_BATCH = 2048


class TableUpkeep:
    """The lookup table's disk entries."""

    def __init__(self, m: Manager) -> None:
        self.m = m

    def final_miss(self, info: NamespaceInfo) -> bool:
        """Whether a key of this namespace missing from the shared table is cached nowhere: no
        cluster (peers are not listed), and no disk tier or the namespace's disk pages are listed."""
        return self.m.cluster is None and (self.m.disk is None or info.id in self.m._disk_listed)

    def held_on_disk(self, page: Page) -> bool:
        """PageIndex's hook: a page leaving L1 and DRAM keeps its table entry (tier DISK) when a copy
        is on disk or queued for it."""
        info = self.m._ns_by_id.get(page.ns)
        return info is not None and self.m.lookups.on_disk(page.key, info.digest)

    def sync_disk_entry(self, key: bytes) -> None:
        """Make `key`'s table entry true after its disk copy came or went (a write finished, failed
        or was dropped; the disk tier evicted or removed it). Loop only. A page READY in L1 or DRAM
        keeps its own entry; otherwise the entry is DISK while a copy is on disk or queued (of a
        namespace known here: the entry carries its id), and gone when none is."""
        table = self.m.table
        if table is None:
            return
        page = self.m.index.get(key)
        if page is not None and page.state & ~VRAM == READY:
            return
        pending = self.m.pending.get(key)
        if pending is not None:
            digest: bytes | None = pending.ns_digest
        else:
            entry = self.m.disk.entry(key) if self.m.disk is not None else None
            digest = entry.ns if entry is not None else None
        info = self.m.namespaces.get(digest) if digest is not None else None
        if info is None:
            table.remove(key)
        else:
            table.put(key, info.id, TIER_DISK)

    def disk_removed(self, keys: list[bytes]) -> None:
        """DiskTier.on_removed (any thread): pages left the disk tier. The cluster withdraws their
        announcements; on the loop, pages still in DRAM or L1 lose their `on_disk` mark (they are
        written again when they leave memory, not dropped) and table entries follow."""
        if self.m.events.wanted:
            self.m.events.emit(DiskPagesRemoved(tuple(keys)))
        loop = self.m._loop
        if loop is None:  # no event loop (in-process tests): this is the only thread
            self._disk_copies_gone(keys)
            return
        try:
            loop.call_soon_threadsafe(self._disk_copies_gone, keys)
        except RuntimeError:  # the loop is closed: the daemon has stopped, and so has its table
            pass

    def _disk_copies_gone(self, keys: list[bytes]) -> None:
        disk = self.m.disk
        for key in keys:
            page = self.m.index.get(key)
            if page is not None and page.on_disk and (disk is None or disk.entry(key) is None):
                page.on_disk = False  # (unless a new write of it already landed: then it is there)
        if self.m.table is not None:
            self._sync_disk_entries(keys)

    def _sync_disk_entries(self, keys: list[bytes]) -> None:
        for key in keys:
            self.sync_disk_entry(key)

    def list_disk_pages(self, info: NamespaceInfo) -> None:
        """List the namespace's pages already on disk (from before this daemon started, or written
        by an earlier session) in the shared table: its misses become final when done. The disk
        index is scanned on an I/O thread; the entries go in on the loop, LIST_BATCH a turn."""
        if self.m._loop is None:  # in-process tests: at once
            self._sync_disk_entries(self.m.disk.keys_of(info.digest))  # type: ignore[union-attr]
            self._listed(info)
            return

        async def run() -> None:
            keys = await self.m._loop.run_in_executor(self.m.executor, self.m.disk.keys_of, info.digest)  # type: ignore[union-attr]
            await self._put_disk_entries(keys)
            self._listed(info)
            log.debug("lookup table: %d disk pages of namespace %d listed", len(keys), info.id)

        self._table_task(run())

    def _listed(self, info: NamespaceInfo) -> None:
        if self.m._ns_by_id.get(info.id) is not info:
            return  # forgotten meanwhile
        self.m._disk_listed.add(info.id)
        final = self.final_miss(info)
        for s in self.m.sessions.values():
            if s.ns is info and s.table_slot is not None:
                self.m.table.set_final(s.table_slot, final)  # type: ignore[union-attr]

    async def _put_live_entries(self, pages: list[Page]) -> None:
        """A rebuild's READY pages after its first batch, LIST_BATCH a turn of the loop: each is put
        back only if it is still READY here (a page evicted meanwhile has no entry to get back)."""
        table, get = self.m.table, self.m.index.get
        assert table is not None
        for i in range(0, len(pages), LIST_BATCH):
            await asyncio.sleep(0)
            for page in pages[i : i + LIST_BATCH]:
                if get(page.key) is page and page.state & ~VRAM == READY:
                    table.put(*_live_entry(page))

    async def _put_disk_entries(self, keys: list[bytes]) -> None:
        """`sync_disk_entry` for each key, LIST_BATCH a turn of the loop: every entry is checked
        against the disk tier when it goes in, so a page dropped since the scan is not listed."""
        for i in range(0, len(keys), LIST_BATCH):
            if i:
                await asyncio.sleep(0)
            self._sync_disk_entries(keys[i : i + LIST_BATCH])

    def _table_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.m._table_tasks.add(task)

        def done(t: asyncio.Future[Any]) -> None:
            self.m._table_tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("listing disk pages in the lookup table failed: %r", t.exception())

        task.add_done_callback(done)

    def rebuild_table(self) -> None:
        """Rebuild the shared table without its tombstones (or, after it was full, with room again).

        What it costs the loop: LIST_BATCH of the READY pages of L1 and DRAM go back at once, ~1 us
        each; the rest of them, and the disk entries, which can be many more, go back LIST_BATCH per
        turn of the loop (~2-5 ms each) with the table marked incomplete, so no miss is final (engines ask the socket for
        the rest) until they are all in; no other rebuild starts meanwhile. They are taken from the
        table itself (a C-speed copy of its tier column), or, when it was full and refused some,
        from the disk index again (scanned on an I/O thread) for every namespace known here."""
        table = self.m.table
        assert table is not None
        lost = table.overflow  # entries were refused: only the disk index knows every disk page
        disk_keys = [] if lost else [key for key, _ in table.entries_in(TIER_DISK)]
        # every namespace known here: a listing still in flight put some of its entries already
        relist = list(self.m.namespaces) if lost and self.m.disk is not None else []
        live = [p for p in self.m.index if p.state & ~VRAM == READY]
        # the first batch at once; with a loop, the rest LIST_BATCH a turn like the disk entries
        now, later = (live, []) if self.m._loop is None else (live[:LIST_BATCH], live[LIST_BATCH:])
        more = bool(disk_keys or relist or later)
        table.rebuild([_live_entry(p) for p in now], incomplete=more)
        if not more:
            return
        if self.m._loop is None:  # in-process tests: at once
            for digest in relist:
                disk_keys += self.m.disk.keys_of(digest)  # type: ignore[union-attr]
            self._sync_disk_entries(disk_keys)
            table.set_incomplete(False)
            return
        self.m._refilling = True

        async def refill(keys: list[bytes]) -> None:
            try:
                await self._put_live_entries(later)
                for digest in relist:
                    keys += await self.m._loop.run_in_executor(self.m.executor, self.m.disk.keys_of, digest)  # type: ignore[union-attr]
                await self._put_disk_entries(keys)
            finally:
                self.m._refilling = False
                table.set_incomplete(False)

        self._table_task(refill(disk_keys))


def _live_entry(page: Page) -> tuple[bytes, int, int]:
    """A READY page's table entry: key, namespace id, tier (L1 or DRAM)."""
    return page.key, page.ns, int(Tier.VRAM if page.state & VRAM else Tier.DRAM)

"""Stores: reserve (slots in L1 or DRAM for new pages), commit (publish; under write-through,
write and sync to disk first) and abort.

A part of the manager (polarkvd/manager/__init__.py): it holds no state of its own beyond what
is named here; the shared state is the manager's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from polarkvd.errors import (
    ErrorCode,
    PolarKVError,
    ProtocolError,
)
from polarkvd.index import (
    RESERVED,
    RESERVED_VRAM,
    VRAM,
    Page,
)
from polarkvd.manager.events import PageStored
from polarkvd.manager.records import NamespaceInfo, PendingDemotion, Session
from polarkvd.types import Tier
from polarkvd.wire.frames import Reserved

if TYPE_CHECKING:
    from polarkvd.manager import Manager

log = logging.getLogger(__name__)


class Store:
    """Two-phase stores."""

    def __init__(self, m: Manager) -> None:
        self.m = m

    def reserve(self, session: Session, keys: list[bytes], parent: bytes | None) -> list[int]:
        """An arena offset per key to write, or Reserved.EXISTS / Reserved.NO_SPACE."""
        return self.reserve_in(session, keys, parent)[0]

    def reserve_in(
        self, session: Session, keys: list[bytes], parent: bytes | None, prefer: Tier = Tier.DRAM
    ) -> tuple[list[int], list[int]]:
        """Per key an offset to write and the tier it is in (VRAM: in the pool; DRAM: in the arena),
        or Reserved.EXISTS / Reserved.NO_SPACE (tier 0). With `prefer` = VRAM, a session attached with
        L1 gets pool slots while the pool has room, then DRAM slots; a full pool starts a background
        demotion (the reserve itself never waits for a copy)."""
        if self.m.draining:
            raise PolarKVError("the daemon is draining and accepts no new pages", code=ErrorCode.DRAINING)
        if keys and parent == keys[0]:  # it would count as its own child: never a leaf, never evicted
            raise ProtocolError("reserve: parent is the first key itself; nothing reserved")
        ns = session.ns
        size = ns.ns.page_bytes
        need = self.m.cfg.dram.min_prefix_pages
        if keys and need > len(keys) and self._chain_length(parent, need) + len(keys) < need:
            session.reserved_at = self.m.clock()
            self.m.counters["not_admitted_pages"] += len(keys)
            return [Reserved.NO_SPACE] * len(keys), [0] * len(keys)
        out: list[int] = []
        tiers: list[int] = []
        prev = parent
        now = self.m.clock()
        pool = self.m.vram if prefer is Tier.VRAM and session.vram else None
        tenant = self.m.quotas.join(ns)
        for i, key in enumerate(keys):
            if (
                key in self.m.index
                or key in self.m.pending
                or (self.m.disk is not None and self.m.disk.entry(key) is not None)
            ):
                out.append(Reserved.EXISTS)
                tiers.append(0)
                prev = key
                continue
            offset = pool.alloc(size) if pool is not None else None
            if offset is not None:
                page = Page(key, ns.id, offset, size, prev, RESERVED_VRAM)
                tiers.append(Tier.VRAM)
            else:
                if pool is not None:  # the pool is full: DRAM for the rest, and make room for next time
                    pool = None
                    self.m.counters["reserve_vram_full_pages"] += len(keys) - i
                    self.m.l1.schedule_vram_demotion(len(keys) - i)
                if not self.m.quotas.make_room(tenant, key, size, self.m):  # over: its own pages go first
                    self.m.counters["reserve_over_quota"] += len(keys) - i
                    out.extend([Reserved.NO_SPACE] * (len(keys) - i))
                    tiers.extend([0] * (len(keys) - i))
                    break
                offset = self.m.space.alloc(ns.slot_bytes)
                if offset is None:
                    if self.m.reclaim.pending(ns.slot_bytes) is None:  # else the engine API waits for it
                        self.m.counters["reserve_no_space"] += len(keys) - i
                    out.extend([Reserved.NO_SPACE] * (len(keys) - i))
                    tiers.extend([0] * (len(keys) - i))
                    break
                page = Page(key, ns.id, offset, size, prev, RESERVED)
                tiers.append(Tier.DRAM)
            self.m.index.add(page)
            session.reserved[key] = page
            out.append(offset)
            prev = key
        session.reserved_at = now
        if pool is not None:
            self.m.l1.schedule_vram_demotion()  # above vram.high_watermark now? (a no-op below it)
        return out, tiers

    def _chain_length(self, key: bytes | None, limit: int) -> int:
        """Pages from the root of a sequence up to `key` inclusive, counting at most `limit`.

        A parent the daemon no longer holds still counts (the engine's sequence has it); its own
        ancestors are then unknown, so the count stops there.
        """
        n = 0
        while key is not None and n < limit:
            n += 1
            page = self.m.index.get(key)
            if page is not None:
                key = page.parent
                continue
            pending = self.m.pending.get(key)
            if pending is not None:
                key = pending.parent
                continue
            entry = self.m.disk.entry(key) if self.m.disk is not None else None
            key = entry.parent if entry is not None else None
        return n

    def commit(self, session: Session, keys: list[bytes]) -> int:
        return self.commit_pages(session, keys)[0]

    def commit_pages(
        self, session: Session, keys: list[bytes]
    ) -> tuple[int, list[asyncio.Future[bool]] | None]:
        """Commit; with write-through, also the futures of the pages' durable disk writes (True: on
        disk and synced), which the engine's reply waits for. None under write-back."""
        _refuse_duplicates(keys, "commit")
        missing = [k for k in keys if k not in session.reserved]
        if missing:
            raise PolarKVError(
                f"{len(missing)} of {len(keys)} keys were not reserved by this session "
                f"(first: {missing[0].hex()}); nothing committed",
                code=ErrorCode.NOT_RESERVED,
            )
        write_through = self.m.cfg.disk.write_through and self.m.disk is not None
        writes: list[asyncio.Future[bool]] | None = [] if write_through else None
        in_vram, events = 0, self.m.events
        for key in keys:
            page = session.reserved.pop(key)
            self.m.index.mark_ready(page)
            if page.state & VRAM:
                # L1 pages are not written through (the disk tier reads the arena): they are once
                # demoted there. Peers may have them (cluster/pool/: by RDMA from the pool's dma-buf, or
                # through DRAM), so they are announced with their tier.
                self.m.vram_policy.insert(page)  # type: ignore[union-attr]
                if events.wanted:
                    events.emit(PageStored(key, Tier.VRAM))
                in_vram += 1
                continue
            self.m.policy.insert(page)
            if writes is not None:
                writes.append(self._write_through(session.ns, page))
            if events.wanted:
                events.emit(PageStored(key, Tier.DRAM))
        if in_vram:
            self.m.counters["stored_pages_vram"] += in_vram
            self.m.counters["stored_bytes_vram"] += in_vram * session.ns.ns.page_bytes
        session.stored_pages += len(keys)
        self.m.counters["stored_pages"] += len(keys)
        self.m.counters["stored_bytes"] += len(keys) * session.ns.ns.page_bytes
        return len(keys), writes

    def _write_through(self, info: NamespaceInfo, page: Page) -> asyncio.Future[bool]:
        """Write a just-committed page to disk durably (disk.write_through). Not bounded by
        max_pending_bytes: each commit waits for its own writes, which bounds the queue."""
        data = bytes(self.m.arena[page.offset : page.offset + page.size])
        self.m.write_through_bytes += page.size
        item = PendingDemotion(data, info.digest, page.parent, info.ns.itemsize, page.depth)
        fut = self.m.space.write_to_disk(page.key, item, counter="written_through_pages", durable=True)

        def done(_: object, size: int = page.size) -> None:
            self.m.write_through_bytes -= size

        fut.add_done_callback(done)
        return fut

    def abort(self, session: Session, keys: list[bytes]) -> int:
        _refuse_duplicates(keys, "abort")
        missing = [k for k in keys if k not in session.reserved]
        if missing:
            raise PolarKVError(
                f"{len(missing)} of {len(keys)} keys were not reserved by this session; nothing aborted",
                code=ErrorCode.NOT_RESERVED,
            )
        return self.abort_reserved(session, keys)

    def abort_reserved(self, session: Session, keys: list[bytes]) -> int:
        for key in keys:
            page = session.reserved.pop(key)
            self.m.index.remove(key)
            if page.state & VRAM:
                self.m.vram.free(page.offset)  # type: ignore[union-attr]
            else:
                self.m.allocator.free(page.offset, session.ns.slot_bytes)
        self.m.counters["aborted_pages"] += len(keys)
        return len(keys)


def _refuse_duplicates(keys: list[bytes], op: str) -> None:
    """A key twice in one commit/abort would pop its reservation twice and fail halfway through."""
    if len(set(keys)) != len(keys):
        raise ProtocolError(f"{op}: duplicate keys in one request; nothing done")

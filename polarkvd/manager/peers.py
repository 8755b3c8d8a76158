"""The manager's face to the cluster pool: what peers may have of this host's pages.

The pool (polarkvd/cluster/pool/) sees the manager only through this part: the DRAM arena and
the L1 pool as regions to register for RDMA, which namespaces are known, which pages are on disk,
whether a page can be sent as it is, bringing disk and L1 pages into DRAM for a peer, and pinning a
page for the time it is sent (`PeerPin`, let go with `release`). Never the index, the pages' states
or their pins.

Threads: `readable`, `on_disk`, `disk_keys` and `hold` are called on transport or I/O threads (reads
only: single dict gets, the disk tier's own lock, the allocator's hold lock); everything else on the
loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from polarkvd.index import READY, READY_VRAM, Page
from polarkvd.manager.events import EventLog
from polarkvd.manager.records import Counters

if TYPE_CHECKING:
    from polarkvd.manager import Manager


@dataclasses.dataclass
class PeerPin:
    """A page pinned for a peer: where its bytes are, and how to let it go."""

    region: str  # "dram" (the arena) or "vram" (the L1 pool)
    offset: int
    size: int
    parent: bytes | None
    holder: Page  # keeps the page's checksum for the next send
    view: memoryview | None  # the page in the arena (None in L1: no host view)

    def release(self) -> None:
        self.holder.pins -= 1


@dataclasses.dataclass
class HeldPin(PeerPin):
    """A DRAM page held for a send by a transport thread (`PeerPages.hold`): its slot, not the page,
    is kept; the page may leave DRAM meanwhile, its bytes stay until `release` (on the loop)."""

    allocator: Any = None

    def release(self) -> None:
        self.allocator.unhold(self.offset)


class PeerPages:
    """What the cluster pool may see and do of this host's pages."""

    def __init__(self, m: Manager) -> None:
        self.m = m

    @property
    def counters(self) -> Counters:
        return self.m.counters

    @property
    def events(self) -> EventLog:
        return self.m.events

    @property
    def arena(self) -> memoryview:
        """The DRAM arena's slots, as RDMA registers them for peers' READs."""
        return self.m.arena[: self.m.allocator.capacity]

    @property
    def l1_pool(self) -> Any:
        """The L1 pool (tiers/vram.py VramPool), or None: GPUDirect registers it as a dma-buf."""
        return self.m.vram

    @property
    def has_disk(self) -> bool:
        return self.m.disk is not None

    def namespaces(self) -> list[bytes]:
        """Digests of the namespaces known here (an engine attached since the daemon started)."""
        return list(self.m.namespaces)

    def disk_keys(self, ns_digest: bytes) -> list[bytes]:
        """Keys of the namespace's pages on disk (a scan of the disk index: an I/O thread)."""
        disk = self.m.disk
        return disk.keys_of(ns_digest) if disk is not None else []

    def on_disk(self, key: bytes) -> bool:
        disk = self.m.disk
        return disk is not None and disk.entry(key) is not None

    def readable(self, key: bytes, l1_ok: bool) -> bool:
        """Whether the page can be sent as it is: READY in DRAM, or in L1 when the peer READs L1."""
        page = self.m.index.get(key)
        return page is not None and (page.state == READY or (l1_ok and page.state == READY_VRAM))

    @property
    def may_promote(self) -> bool:
        """Whether some pages may need bringing into DRAM for peers (a disk tier or L1)."""
        return self.m.disk is not None or self.m.vram is not None

    def promote(
        self,
        ns_digest: bytes,
        keys: list[bytes],
        held_elsewhere: Callable[[bytes], bool],
        *,
        vram_ok: bool = False,
        from_vram: list[bytes] | None = None,
    ) -> list[asyncio.Future[bool]]:
        """Bring the disk and L1 pages of the longest prefix held here into DRAM (manager/loads.py)."""
        return self.m.loads.promote_for_peer(
            ns_digest, keys, held_elsewhere, vram_ok=vram_ok, from_vram=from_vram
        )

    def hold(self, ns_digest: bytes, key: bytes) -> HeldPin | None:
        """Any thread: hold the page of `key` in that namespace for sending, if it is READY in DRAM
        (None otherwise), without the loop: the allocator keeps its slot from reuse until `release`,
        which runs on the loop. The slot is held only if it holds this very page (`claim`), so a page
        that moved, left or was replaced between the look and the hold is never sent."""
        m = self.m
        page = m.index.get(key)
        if page is None or page.state != READY:
            return None
        info = m._ns_by_id.get(page.ns)
        offset = page.offset
        if info is None or info.digest != ns_digest or not m.allocator.hold(offset, page):
            return None
        view = m.arena[offset : offset + page.size]
        return HeldPin("dram", offset, page.size, page.parent, page, view, m.allocator)

    def pin(self, ns_digest: bytes, key: bytes, l1_ok: bool) -> PeerPin | None:
        """Pin the page of `key` in that namespace for sending: READY in DRAM, or with `l1_ok` in
        L1. None when it is neither. A pinned page is not evicted, demoted or moved until released."""
        m = self.m
        page = m.index.get(key)
        if page is None or m.namespace_digest(page.ns) != ns_digest:
            return None
        if page.state == READY:
            page.pins += 1
            return PeerPin(
                "dram",
                page.offset,
                page.size,
                page.parent,
                page,
                m.arena[page.offset : page.offset + page.size],
            )
        if l1_ok and page.state == READY_VRAM:
            page.pins += 1  # an L1 page with pins is never demoted nor freed (manager/l1.py)
            return PeerPin("vram", page.offset, page.size, page.parent, page, None)
        return None

"""The DRAM page index: one small node per page held in the L2 arena.

Owns per-page metadata and the parent/child links that make eviction leaf-first; nothing about
bytes, sockets or other tiers. Every node is also the eviction policy's node (see policy.py), so a
page costs one object, one key and one dict entry: measured ~220 bytes per page in the daemon
(`tests/test_index.py` measures it, the datapath benchmark reports it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from polarkvd.lookup_table import LookupTable
from polarkvd.policy import PolicyNode

# Page states.
RESERVED = 0  # slot handed to an engine that is writing it; invisible to lookups
READY = 1  # committed: visible, loadable, evictable when unpinned and childless
PROMOTING = 2  # being filled from a lower tier; visible to nobody but its loader


class Page(PolicyNode):
    __slots__ = (
        "ns",
        "offset",
        "size",
        "parent",
        "children",
        "pins",
        "state",
        "on_disk",
        "linked",
        "checksum",
    )

    def __init__(self, key: bytes, ns: int, offset: int, size: int, parent: bytes | None, state: int) -> None:
        super().__init__(key)
        self.ns = ns  # namespace id (small int, see Manager.namespaces)
        self.offset = offset
        self.size = size  # page bytes (the slot may be larger: rounded to 4 KiB)
        self.parent = parent  # key of the previous page in its chain, or None at the root
        self.children = 0  # READY pages in DRAM whose parent this is
        self.pins = 0  # leases and in-flight loads holding it
        self.state = state
        self.on_disk = False  # a copy already sits in L4: evicting it needs no write
        self.linked = False  # counted in its parent's `children`
        self.checksum: int | None = None  # xxh3_64 of the bytes, once known (sent to or received from a peer)


class PageIndex:
    """key -> Page for the DRAM tier, with leaf-first bookkeeping."""

    def __init__(self) -> None:
        self._pages: dict[bytes, Page] = {}
        #: key -> Page or None. The dict's own bound `get`: no Python frame per probe (the lookup path)
        self.get: Callable[[bytes], Page | None] = self._pages.get
        self.ready_bytes = 0
        self.ready_pages = 0
        #: the engines' copy of which keys are READY (lookup_table.py), kept by add/mark_ready/remove
        self.table: LookupTable | None = None

    def __contains__(self, key: bytes) -> bool:
        return key in self._pages

    def __len__(self) -> int:
        return len(self._pages)

    def __iter__(self) -> Iterator[Page]:
        return iter(list(self._pages.values()))

    def add(self, page: Page) -> None:
        self._pages[page.key] = page
        if page.state == READY:
            self._became_ready(page)

    def mark_ready(self, page: Page) -> None:
        page.state = READY
        self._became_ready(page)

    def _became_ready(self, page: Page) -> None:
        self.ready_bytes += page.size
        self.ready_pages += 1
        if self.table is not None:
            self.table.put(page.key, page.ns)
        parent = self._pages.get(page.parent) if page.parent is not None else None
        if parent is not None and parent.state == READY:
            parent.children += 1
            page.parent = parent.key  # share the parent's key object instead of holding a copy
            page.linked = True

    def remove(self, key: bytes) -> Page | None:
        page = self._pages.pop(key, None)
        if page is None:
            return None
        if page.state == READY:
            self.ready_bytes -= page.size
            self.ready_pages -= 1
            if self.table is not None:
                self.table.remove(key)
        if page.linked:
            parent = self._pages.get(page.parent) if page.parent is not None else None
            if parent is not None:
                parent.children = max(0, parent.children - 1)
            page.linked = False
        return page

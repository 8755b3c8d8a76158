"""The page index of the memory tiers: one small node per page held in the L2 arena or the L1 pool.

Owns per-page metadata and the parent/child links that make eviction leaf-first; nothing about
bytes, sockets or other tiers. Every node is also the eviction policy's node (see policy.py), so a
page costs one object, one key and one dict entry: measured ~237 bytes per page in the daemon
(the datapath benchmark reports it).

Which tier a page's slot is in is a bit of its `state` (`VRAM`), not another attribute: L1 costs
DRAM pages no memory, and every check written as `state == READY` (eviction, drain, serving peers,
writing to disk) means "READY *in DRAM*" and so can never read an L1 page's pool offset as an arena
offset. Code that accepts both tiers says so (`state & ~VRAM == READY`). `offset` is within the
page's tier: the arena for DRAM, the pool for L1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from polarkvd.policy import PolicyNode
from polarkvd.wire.lookup_table import TIER_DISK, TIER_DRAM, TIER_VRAM, LookupTable

# Page states.
RESERVED = 0  # slot handed to an engine that is writing it; invisible to lookups
READY = 1  # committed: visible, loadable, evictable when unpinned and childless
PROMOTING = 2  # being filled from another tier (disk, a peer, L1); visible to nobody but its loader
VRAM = 4  # flag: the slot is in the L1 pool (with RESERVED, READY, and PROMOTING: a peer's page on
#          its way into an L1 slot by RDMA READ, docs/RDMA.md "GPUDirect")
RESERVED_VRAM = RESERVED | VRAM
READY_VRAM = READY | VRAM
PROMOTING_VRAM = PROMOTING | VRAM


def depth_of(code: int) -> int:
    """The depth (pages before it in its chain) a page's depth code stands for: exact below 128, then
    16 codes per doubling up to 255 (~31,000 pages: 4M tokens of 128-token pages). Codes are small
    integers, which Python shares: a page pays 8 bytes for its depth whatever it is."""
    return code if code < 128 else round(128 * 2 ** ((code - 128) / 16))


def child_depth(code: int, key: bytes) -> int:
    """The depth code of a page whose parent's is `code`: one more below 128; above, one more with
    probability 1 / (the pages the code spans), drawn from the key's bits (keys are uniform hashes):
    approximate counting, right on average along a chain, and the same for the same key."""
    if code < 127:
        return code + 1
    if code >= 255:
        return 255
    span = depth_of(code + 1) - depth_of(code)
    return code + 1 if (int.from_bytes(key[8:12], "little") * span) >> 32 == 0 else code


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
        "depth",
    )

    def __init__(self, key: bytes, ns: int, offset: int, size: int, parent: bytes | None, state: int) -> None:
        super().__init__(key)
        self.ns = ns  # namespace id (small int, see Manager.namespaces)
        self.offset = offset
        self.size = size  # page bytes (the slot may be larger: rounded to 4 KiB)
        self.parent = parent  # key of the previous page in its chain, or None at the root
        self.children = 0  # READY pages in DRAM or L1 whose parent this is
        self.pins = 0  # leases and in-flight loads holding it
        self.state = state
        self.on_disk = False  # a copy already sits in L4: evicting it needs no write
        self.linked = False  # counted in its parent's `children`
        self.checksum: int | None = None  # xxh3_64 of the bytes, once known (sent to or received from a peer)
        #: pages before it in its chain as far as the index knew its parent (PageIndex.add), as a
        #: depth code (`depth_of`, `child_depth`: 0..255, a shared small int, no object of its own)
        self.depth = 0


class PageIndex:
    """key -> Page for the DRAM and L1 tiers, with leaf-first bookkeeping across both (a page with a
    READY child in either tier counts it in `children`)."""

    def __init__(self) -> None:
        self._pages: dict[bytes, Page] = {}
        #: key -> Page or None. The dict's own bound `get`: no Python frame per probe (the lookup path)
        self.get: Callable[[bytes], Page | None] = self._pages.get
        self.ready_bytes = 0  # READY in DRAM
        self.ready_pages = 0
        self.vram_bytes = 0  # READY in L1
        self.vram_pages = 0
        #: pages per namespace id, in any state: a namespace with none (and no session, nothing
        #: queued for disk) can be forgotten (Manager.forget_idle_namespaces)
        self.ns_pages: dict[int, int] = {}
        #: namespace id -> bytes of its pages holding a DRAM slot (any state): tenants' DRAM usage
        self.dram_bytes_ns: dict[int, int] = {}
        #: the engines' copy of which keys are READY (lookup_table.py), kept by add/mark_ready/remove
        self.table: LookupTable | None = None
        #: set by the manager (this index knows nothing of disk): whether a page leaving L1 and DRAM
        #: has a copy on disk or queued for it; its table entry then stays, with tier DISK
        self.held_on_disk: Callable[[Page], bool] | None = None
        #: set by the manager: told (offset, page) whenever a page takes an arena slot, so the
        #: allocator knows what each slot holds (tiers/dram.py `claim`)
        self.claim: Callable[[int, Page], None] | None = None

    def __contains__(self, key: bytes) -> bool:
        return key in self._pages

    def __len__(self) -> int:
        return len(self._pages)

    def __iter__(self) -> Iterator[Page]:
        return iter(list(self._pages.values()))

    def add(self, page: Page) -> None:
        replaced = self._pages.get(page.key)
        if replaced is not None:
            self._uncount(replaced)
            if not replaced.state & VRAM:
                self._dram_slot(replaced, -replaced.size)
        self._pages[page.key] = page
        if page.parent is not None:  # the parent's depth + 1; one page at least when it is not here
            parent = self._pages.get(page.parent)
            page.depth = child_depth(parent.depth, page.key) if parent is not None else 1
        self.ns_pages[page.ns] = self.ns_pages.get(page.ns, 0) + 1
        if not page.state & VRAM:
            self._dram_slot(page, page.size)
            if self.claim is not None:
                self.claim(page.offset, page)
        if page.state & ~VRAM == READY:
            self._became_ready(page)

    def mark_ready(self, page: Page) -> None:
        """RESERVED -> READY in the page's own tier; PROMOTING -> READY in DRAM; PROMOTING_VRAM ->
        READY_VRAM."""
        page.state = READY | (page.state & VRAM)
        self._became_ready(page)

    def unready(self, page: Page, offset: int) -> None:
        """A READY page starts moving to DRAM slot `offset` (L1 -> L2): PROMOTING, so lookups stop
        seeing it and loads wait for it, until `mark_ready` (moved) or `restore_vram` (failed)."""
        self._left_ready(page)
        page.state = PROMOTING
        page.offset = offset
        self._dram_slot(page, page.size)
        if self.claim is not None:
            self.claim(offset, page)

    def land_in_dram(self, page: Page, offset: int) -> None:
        """A page on its way into L1 (PROMOTING_VRAM) will arrive in DRAM slot `offset` instead."""
        assert page.state == PROMOTING_VRAM
        page.state = PROMOTING
        page.offset = offset
        self._dram_slot(page, page.size)
        if self.claim is not None:
            self.claim(offset, page)

    def restore_vram(self, page: Page, offset: int) -> None:
        """A move out of L1 failed: READY in L1 again, at its pool `offset`."""
        self._dram_slot(page, -page.size)
        page.state = READY_VRAM
        page.offset = offset
        self._became_ready(page)

    def move_to_vram(self, page: Page, offset: int) -> None:
        """A READY page in DRAM now lives in L1 slot `offset` (its bytes were copied there: a
        promotion). It stays visible throughout: the counts and the lookup table's tier byte follow."""
        assert page.state == READY
        self.ready_bytes -= page.size
        self.ready_pages -= 1
        self.vram_bytes += page.size
        self.vram_pages += 1
        self._dram_slot(page, -page.size)
        page.state = READY_VRAM
        page.offset = offset
        if self.table is not None:
            self.table.set_tier(page.key, TIER_VRAM)

    def _dram_slot(self, page: Page, nbytes: int) -> None:
        by_ns = self.dram_bytes_ns
        by_ns[page.ns] = by_ns.get(page.ns, 0) + nbytes

    def _became_ready(self, page: Page) -> None:
        if page.state & VRAM:
            self.vram_bytes += page.size
            self.vram_pages += 1
        else:
            self.ready_bytes += page.size
            self.ready_pages += 1
        if self.table is not None:
            self.table.put(page.key, page.ns, TIER_VRAM if page.state & VRAM else TIER_DRAM)
        if page.linked:
            return
        parent = self._pages.get(page.parent) if page.parent is not None else None
        if parent is not None and parent.state & ~VRAM == READY:
            parent.children += 1
            page.parent = parent.key  # share the parent's key object instead of holding a copy
            page.linked = True

    def _left_ready(self, page: Page) -> None:
        if page.state & VRAM:
            self.vram_bytes -= page.size
            self.vram_pages -= 1
        else:
            self.ready_bytes -= page.size
            self.ready_pages -= 1
        if self.table is not None:
            held = self.held_on_disk
            if held is None or not held(page) or not self.table.set_tier(page.key, TIER_DISK):
                self.table.remove(page.key)

    def remove(self, key: bytes) -> Page | None:
        page = self._pages.pop(key, None)
        if page is None:
            return None
        self._uncount(page)
        if page.state & ~VRAM == READY:
            self._left_ready(page)
        if not page.state & VRAM:
            self._dram_slot(page, -page.size)
        if page.linked:
            parent = self._pages.get(page.parent) if page.parent is not None else None
            if parent is not None:
                parent.children = max(0, parent.children - 1)
            page.linked = False
        return page

    def _uncount(self, page: Page) -> None:
        left = self.ns_pages[page.ns] - 1
        if left:
            self.ns_pages[page.ns] = left
        else:
            del self.ns_pages[page.ns]

"""The disk tier's index: which pages are on disk, their eviction order, and the bytes they take.

Owns every page's metadata (`DiskEntry`), the eviction policy over them, and the byte counts (in
all, per namespace, held by puts in flight); it does no I/O. `DiskTier` (`disk.py`) holds its lock
around every call and does the file work the index's answers call for: the keys an eviction or a
removal returns go into `deleting` here until the tier has unlinked their files, so a put of the same
key waits rather than have its new file unlinked.

Eviction is leaf-first: a page with cached children on disk is never a victim (`children` counts
them, including children that arrived before their parent, the usual order when DRAM demotes leaves
first: those wait in `waiting` by parent key), and among leaves the policy (`lru` or `s3fifo`,
switchable live) decides. A tenant over its disk quota evicts among its own namespaces only.

Memory: ~227 bytes of Python heap per page (tracemalloc, pages in chains of 10, one namespace;
`tests/tiers/test_disk.py::index_bytes_per_page`): the slotted `DiskEntry` 104, its key 49, the dict
slot the rest. Namespaces, page sizes, stored sizes and parent keys of pages on disk are shared
objects. A page whose parent is not on disk costs ~150 more (its own parent key and a pending
children count).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Container

from polarkvd.policy import CostPolicy, EvictionPolicy, PolicyNode, make_policy, switch_policy
from polarkvd.tiers.disk_format import Row

_MAX_INTERNED = 4096  # distinct namespaces and page sizes shared between entries
_MAX_STORED_SIZES = 1 << 16

#: for a page's namespace: (the tenant's disk quota in bytes, the namespaces sharing it)
Quota = tuple[int, frozenset[bytes]]


class DiskEntry(PolicyNode):
    """One page on disk. Owned and mutated by the index under the tier's lock: callers read, never write."""

    __slots__ = ("parent", "ns", "raw_bytes", "stored_bytes", "children", "depth")

    def __init__(
        self, key: bytes, parent: bytes | None, ns: bytes, raw_bytes: int, stored_bytes: int, depth: int = 0
    ) -> None:
        super().__init__(key)
        self.parent = parent
        self.ns = ns
        self.raw_bytes = raw_bytes
        self.stored_bytes = stored_bytes  # file size, header included, rounded up (disk_format.stored_size)
        self.children = 0  # pages on disk whose parent is this page
        self.depth = depth  # its chain position as the manager knew it (index.depth_of code; 0: unknown)


class DiskIndex:
    """The pages on disk and their counts. Not thread-safe: the tier's lock is held for every call."""

    def __init__(self, policy: str) -> None:
        self.policy: EvictionPolicy = make_policy(policy)
        #: the `cost` policy's valuer (set by the manager: what a page is worth keeping, per byte)
        self.valuer: Callable[[PolicyNode], float] | None = None
        self.entries: dict[bytes, DiskEntry] = {}
        self.waiting: dict[bytes, int] = {}  # children that reached disk before their parent, by parent
        self._interned: dict[object, object] = {}  # namespaces and page sizes, shared by entries
        self._sizes: dict[int, int] = {}  # stored sizes, shared by entries
        self.deleting: set[bytes] = set()  # detached, their files not unlinked yet
        self.stored = 0
        self.raw = 0
        self.reserved = 0  # bytes held by puts in flight
        self.evictions = 0
        self.corrupt = 0
        self.ns_stored: dict[bytes, int] = {}  # namespace -> stored bytes
        self.ns_reserved: dict[bytes, int] = {}  # namespace -> bytes of its puts in flight
        self.quota_evicted: dict[bytes, int] = {}  # namespace -> pages evicted by its quota
        self.changes = 0  # changes since the last snapshot

    def clear(self) -> None:
        """Forget every page (reopening: the files are read again)."""
        self.entries.clear()
        self.waiting.clear()
        self.policy = make_policy(self.policy.name)
        self._attach_valuer()
        self.stored = self.raw = 0
        self.ns_stored.clear()

    def set_policy(self, name: str) -> None:
        """Switch eviction policy, carrying pages over coldest first."""
        self.policy = switch_policy(self.policy, name)
        self._attach_valuer()

    def set_valuer(self, valuer: Callable[[PolicyNode], float] | None) -> None:
        self.valuer = valuer
        self._attach_valuer()

    def _attach_valuer(self) -> None:
        if isinstance(self.policy, CostPolicy):
            self.policy.valuer = self.valuer

    def admit(
        self, key: bytes, parent: bytes | None, ns: bytes, raw_bytes: int, stored_bytes: int, depth: int = 0
    ) -> None:
        """List a page whose file is complete (no-op if listed)."""
        if key in self.entries:
            return
        if parent is not None:
            p = self.entries.get(parent)
            if p is not None:
                parent = p.key  # share the parent's bytes object
                p.children += 1
            else:
                self.waiting[parent] = self.waiting.get(parent, 0) + 1
        if len(self._interned) < _MAX_INTERNED:
            ns = self._interned.setdefault(ns, ns)  # type: ignore[assignment]  # a bytes key maps to itself
            raw_bytes = self._interned.setdefault(raw_bytes, raw_bytes)  # type: ignore[assignment]  # an int likewise
        if len(self._sizes) < _MAX_STORED_SIZES:
            stored_bytes = self._sizes.setdefault(stored_bytes, stored_bytes)
        e = DiskEntry(key, parent, ns, raw_bytes, stored_bytes, depth)
        e.children = self.waiting.pop(key, 0)
        self.entries[key] = e
        self.policy.insert(e)
        self.stored += stored_bytes
        self.raw += raw_bytes
        self.ns_stored[ns] = self.ns_stored.get(ns, 0) + stored_bytes

    def admit_rows(self, rows: list[Row]) -> None:
        for row in rows:
            self.admit(*row)

    def reserve(self, ns: bytes, size: int) -> None:
        """Space held (size > 0) or let go (< 0) by a put in flight."""
        self.reserved += size
        left = self.ns_reserved.get(ns, 0) + size
        if left > 0:
            self.ns_reserved[ns] = left
        else:
            self.ns_reserved.pop(ns, None)

    def make_room(self, ns: bytes, size: int, capacity: int, quota: Quota | None) -> tuple[bool, list[bytes]]:
        """Hold `size` bytes for a put of namespace `ns`, evicting to make room: (whether it fits
        and is held, keys evicted). A tenant over its quota evicts among its own pages first."""
        doomed: list[bytes] = []
        fits = True
        if quota is not None:
            limit, group = quota
            held = sum(self.ns_stored.get(d, 0) + self.ns_reserved.get(d, 0) for d in group)
            over = held + size - limit
            if over > 0:
                freed, doomed = self.evict(over, group)
                fits = freed >= over
        need = self.stored + self.reserved + size - capacity
        if fits and need > 0:
            doomed += self.evict(need)[1]
        fits = fits and self.stored + self.reserved + size <= capacity
        if fits:
            self.reserve(ns, size)
        return fits, doomed

    def detach(self, e: DiskEntry) -> None:
        """Take `e` out of index, policy and counts; its key stays in `deleting` until the tier
        has unlinked its file."""
        del self.entries[e.key]
        self.policy.remove(e)
        self.stored -= e.stored_bytes
        self.raw -= e.raw_bytes
        left = self.ns_stored.get(e.ns, 0) - e.stored_bytes
        if left > 0:
            self.ns_stored[e.ns] = left
        else:
            self.ns_stored.pop(e.ns, None)
        if e.parent is not None:
            p = self.entries.get(e.parent)
            if p is not None:
                p.children -= 1
            else:
                left = self.waiting.get(e.parent, 0) - 1
                if left > 0:
                    self.waiting[e.parent] = left
                else:
                    self.waiting.pop(e.parent, None)
        if e.children:
            self.waiting[e.key] = e.children
        self.deleting.add(e.key)
        self.changes += 1

    def evict(self, need: int, group: frozenset[bytes] | None = None) -> tuple[int, list[bytes]]:
        """Evict leaf-first in policy order until `need` bytes are freed, or nothing evictable is
        left: (bytes freed, keys detached). With `group`, only pages of those namespaces."""
        freed = 0
        doomed: list[bytes] = []
        if group is None:
            evictable, pool = _is_leaf, len(self.entries)
        else:
            evictable = functools.partial(_is_leaf_in, group)
            pool = sum(1 for d in group if self.ns_stored.get(d))
        while freed < need and pool:
            avg = max(1, self.stored // len(self.entries))
            k = max(1, min(len(self.entries), -(-(need - freed) // avg)))
            got = self.policy.victims(k, evictable)
            if not got and k > 1:  # fewer leaves than the estimate: one at a time frees parents
                got = self.policy.victims(1, evictable)
            if not got:
                break
            for node in got:
                assert isinstance(node, DiskEntry)
                self.detach(node)
                freed += node.stored_bytes
                doomed.append(node.key)
                if group is not None:
                    self.quota_evicted[node.ns] = self.quota_evicted.get(node.ns, 0) + 1
            self.evictions += len(got)
            pool = len(self.entries)
        return freed, doomed

    def snapshot_rows(self) -> tuple[list[bytes], list[tuple[bytes, bytes | None, int, int, int, int]]]:
        """(namespaces, rows coldest first) for `disk_format.write_snapshot`."""
        namespaces: dict[bytes, int] = {}
        pages = []
        for e in self.policy.coldest_first():
            assert isinstance(e, DiskEntry)
            ns_id = namespaces.setdefault(e.ns, len(namespaces))
            pages.append((e.key, e.parent, ns_id, e.raw_bytes, e.stored_bytes, e.depth))
        return list(namespaces), pages


def _is_leaf(node: PolicyNode) -> bool:
    assert isinstance(node, DiskEntry)  # the disk policy holds only entries
    return node.children == 0


def _is_leaf_in(group: Container[bytes], node: PolicyNode) -> bool:
    """A leaf of one of the namespaces in `group`."""
    assert isinstance(node, DiskEntry)
    return node.children == 0 and node.ns in group

"""L3, this host's share: the DRAM a daemon lends to the cluster's pool (`cluster.dmp_bytes`).

Peers demote pages here when their own DRAM is full; any member may later fetch them back. This
module owns the lent region's bytes (one private anonymous mapping, never shared with engines), its
slots (the same slab allocator as L2), an index of what it holds (key, namespace digest, parent,
size) and its eviction order (LRU over unpinned pages). It does not decide what to demote where
(the manager and `polarkvd.cluster.ring` do) and does no I/O: transports read and write the views
it hands out, pinned for as long as they do.

All methods run on the daemon's event loop thread; only the bytes of pinned views are touched from
transport threads.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

from polarkvd.policy import PolicyNode, make_policy
from polarkvd.tiers.dram import SlabAllocator, slot_size

# DMP page states
WRITING = 0  # a peer is sending the bytes; invisible
READY = 1


class DmpEntry(PolicyNode):
    __slots__ = ("ns", "parent", "offset", "size", "pins", "state", "checksum")

    def __init__(self, key: bytes, ns: bytes, parent: bytes | None, offset: int, size: int) -> None:
        super().__init__(key)
        self.ns = ns  # namespace digest
        self.parent = parent
        self.offset = offset
        self.size = size
        self.pins = 0  # sends in flight
        self.state = WRITING
        self.checksum: int | None = None  # xxh3_64, verified when the page arrived


class DmpStore:
    def __init__(self, capacity: int, slab_bytes: int) -> None:
        self.capacity = capacity
        self._map = mmap.mmap(-1, max(capacity, mmap.PAGESIZE))
        self.view = memoryview(self._map)
        self.allocator = SlabAllocator(capacity, slab_bytes)
        self.policy = make_policy("lru")
        self.pages: dict[bytes, DmpEntry] = {}
        self.ready_bytes = 0
        self.stats = {
            "stored_pages": 0,
            "evicted_pages": 0,
            "served_pages": 0,
            "refused_pages": 0,  # no room (too large, everything pinned)
            "duplicate_pages": 0,  # sent again while already here: kept, counted as stored
        }

    # ------------------------------------------------------------------ writes from peers

    def reserve(
        self, key: bytes, ns: bytes, parent: bytes | None, size: int
    ) -> tuple[DmpEntry | None, list[bytes]]:
        """A slot for a page a peer is about to send, evicting LRU pages if needed.

        Returns (entry, keys evicted to make room); entry is None when the page cannot fit (too
        large, everything pinned) or is already here. The entry stays invisible until `commit`.
        """
        if key in self.pages:  # being written by another put, or already here
            return None, []
        if not self.allocator.fits(slot_size(size)):
            self.stats["refused_pages"] += 1
            return None, []
        slot = slot_size(size)
        evicted: list[bytes] = []
        offset = self.allocator.alloc(slot)
        while offset is None:
            victims = self.policy.victims(1, lambda n: n.pins == 0 and n.state == READY)  # type: ignore[attr-defined]
            if not victims:
                self.stats["refused_pages"] += 1
                return None, evicted
            v = victims[0]
            assert isinstance(v, DmpEntry)
            self._drop(v)
            evicted.append(v.key)
            self.stats["evicted_pages"] += 1
            offset = self.allocator.alloc(slot)
        entry = DmpEntry(key, ns, parent, offset, size)
        self.pages[key] = entry
        return entry, evicted

    def commit(self, entry: DmpEntry) -> None:
        entry.state = READY
        self.ready_bytes += entry.size
        self.policy.insert(entry)
        self.stats["stored_pages"] += 1

    def abort(self, entry: DmpEntry) -> None:
        if self.pages.get(entry.key) is entry and entry.state == WRITING:
            del self.pages[entry.key]
            self.allocator.free(entry.offset, slot_size(entry.size))

    # ------------------------------------------------------------------ reads

    def get(self, key: bytes) -> DmpEntry | None:
        e = self.pages.get(key)
        return e if e is not None and e.state == READY else None

    def slot_view(self, entry: DmpEntry) -> memoryview:
        return self.view[entry.offset : entry.offset + entry.size]

    def pin(self, entry: DmpEntry) -> memoryview:
        entry.pins += 1
        self.policy.touch(entry)
        self.stats["served_pages"] += 1
        return self.slot_view(entry)

    def unpin(self, entry: DmpEntry) -> None:
        entry.pins -= 1
        if entry.pins == 0 and self.pages.get(entry.key) is not entry:
            self.allocator.free(entry.offset, slot_size(entry.size))  # removed while being sent

    # ------------------------------------------------------------------ removal

    def remove(self, key: bytes) -> bool:
        e = self.pages.get(key)
        if e is None or e.state != READY:
            return False
        self._drop(e)
        return True

    def _drop(self, e: DmpEntry) -> None:
        del self.pages[e.key]
        self.policy.remove(e)
        self.ready_bytes -= e.size
        if e.pins == 0:
            self.allocator.free(e.offset, slot_size(e.size))

    def keys(self) -> Iterator[bytes]:
        return (k for k, e in self.pages.items() if e.state == READY)

    def __len__(self) -> int:
        return sum(1 for e in self.pages.values() if e.state == READY)

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_bytes

    def close(self) -> None:
        self.view.release()
        self._map.close()

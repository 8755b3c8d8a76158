"""L2: slot allocation inside the shared-memory arena.

This module owns which byte ranges of the arena are in use. It knows nothing of keys, policies or
engines: the manager asks for a slot of a given size and gets an offset, or None when full.

The arena is cut into slabs of `slab_bytes`. A slab serves one slot size at a time (slot sizes are
page sizes rounded up to 4 KiB, so pages stay page-aligned for DMA and RDMA registration); an empty
slab returns to the pool and can serve another size. With one model per host (the common case) this
is an array of fixed-size slots with no fragmentation; with several page sizes the waste is bounded
by one partly used slab per size, plus the tail of each slab that holds no whole slot.
"""

from __future__ import annotations

import dataclasses

SLOT_ALIGN = 4096


def slot_size(page_bytes: int) -> int:
    return -(-page_bytes // SLOT_ALIGN) * SLOT_ALIGN


@dataclasses.dataclass
class _SlotClass:
    slot_bytes: int
    per_slab: int
    free: list[int] = dataclasses.field(default_factory=list)  # offsets, LIFO for cache warmth
    used: dict[int, int] = dataclasses.field(default_factory=dict)  # slab index -> slots in use


class SlabAllocator:
    def __init__(self, capacity: int, slab_bytes: int) -> None:
        if slab_bytes <= 0 or capacity < slab_bytes:
            raise ValueError(f"capacity {capacity} must hold at least one slab of {slab_bytes} bytes")
        self.capacity = capacity
        self.slab_bytes = slab_bytes
        self.num_slabs = capacity // slab_bytes
        self._free_slabs = list(range(self.num_slabs - 1, -1, -1))
        self._classes: dict[int, _SlotClass] = {}
        self.used_bytes = 0  # bytes of slots handed out

    def fits(self, slot_bytes: int) -> bool:
        return 0 < slot_bytes <= self.slab_bytes

    def alloc(self, slot_bytes: int) -> int | None:
        """Offset of a free slot of `slot_bytes` (a `slot_size`), or None when no slot is free."""
        cls = self._classes.get(slot_bytes)
        if cls is None:
            if not self.fits(slot_bytes):
                raise ValueError(f"slot of {slot_bytes} bytes does not fit a {self.slab_bytes}-byte slab")
            cls = self._classes[slot_bytes] = _SlotClass(slot_bytes, self.slab_bytes // slot_bytes)
        if not cls.free and not self._carve(cls):
            return None
        off = cls.free.pop()
        slab = off // self.slab_bytes
        cls.used[slab] = cls.used.get(slab, 0) + 1
        self.used_bytes += slot_bytes
        return off

    def free(self, offset: int, slot_bytes: int) -> None:
        cls = self._classes[slot_bytes]
        slab = offset // self.slab_bytes
        cls.used[slab] -= 1
        cls.free.append(offset)
        self.used_bytes -= slot_bytes

    def free_slots(self, slot_bytes: int) -> int:
        """Slots of this size obtainable without eviction."""
        cls = self._classes.get(slot_bytes)
        per_slab = self.slab_bytes // slot_bytes
        spare = sum(1 for c in self._classes.values() for n in c.used.values() if n == 0 and c is not cls)
        return (len(cls.free) if cls else 0) + (len(self._free_slabs) + spare) * per_slab

    def _carve(self, cls: _SlotClass) -> bool:
        if not self._free_slabs and not self._reclaim_empty_slab():
            return False
        slab = self._free_slabs.pop()
        base = slab * self.slab_bytes
        cls.free.extend(base + i * cls.slot_bytes for i in range(cls.per_slab - 1, -1, -1))
        cls.used[slab] = 0
        return True

    def _reclaim_empty_slab(self) -> bool:
        for cls in self._classes.values():
            for slab, n in cls.used.items():
                if n == 0:
                    del cls.used[slab]
                    lo, hi = slab * self.slab_bytes, (slab + 1) * self.slab_bytes
                    cls.free = [o for o in cls.free if not lo <= o < hi]
                    self._free_slabs.append(slab)
                    return True
        return False

    def slot_bytes_at(self, offset: int) -> int | None:
        """The slot size of the slab holding `offset`, for validating offsets a client sends."""
        slab = offset // self.slab_bytes
        for cls in self._classes.values():
            if slab in cls.used:
                return cls.slot_bytes
        return None

"""L2: slot allocation inside the shared-memory arena.

This module owns which byte ranges of the arena are in use, and which slab to empty when a page
size has no room. It knows nothing of keys, policies or engines: the manager asks for a slot of a
given size and gets an offset, or None when full, and tells the allocator what each slot holds
(`claim`) so that a slab's occupants can be priced with a cost the manager supplies (`choose_slab`).

The arena is cut into slabs of `slab_bytes`. A slab serves one slot size at a time (slot sizes are
page sizes rounded up to 4 KiB, so pages stay page-aligned for DMA and RDMA registration); an empty
slab returns to the pool and can serve another size. With one model per host (the common case) this
is an array of fixed-size slots with no fragmentation; with several page sizes the waste is bounded
by one partly used slab per size, plus the tail of each slab that holds no whole slot. A size that
needs a slab when none is empty gets one by draining a chosen slab (`drain` ... `give`): its free
slots are withheld, the manager moves or evicts its occupants, and the emptied slab goes to the size
that asked for it, never back to the pool where the drained size would take it again.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

SLOT_ALIGN = 4096
#: the owner of a slot that is not handed out (None: handed out, not claimed yet)
FREE: Any = type("Free", (), {"__repr__": lambda self: "FREE"})()


def slot_size(page_bytes: int) -> int:
    return -(-page_bytes // SLOT_ALIGN) * SLOT_ALIGN


@dataclasses.dataclass
class _SlotClass:
    slot_bytes: int
    per_slab: int
    free: list[int] = dataclasses.field(default_factory=list)  # offsets, LIFO for cache warmth
    used: dict[int, int] = dataclasses.field(default_factory=dict)  # slab index -> slots in use
    owners: dict[int, list[Any]] = dataclasses.field(default_factory=dict)  # slab -> owner per slot


@dataclasses.dataclass
class SlabPlan:
    """How to empty one slab: its occupants to move into free slots of their size elsewhere (the
    costliest to lose) and to evict (the rest), as (offset, owner) pairs, and the summed cost."""

    slab: int
    slot_bytes: int
    moves: list[tuple[int, Any]]
    evicts: list[tuple[int, Any]]
    cost: float

    @property
    def pages(self) -> int:
        return len(self.moves) + len(self.evicts)


#: cost(offset, owner) of evicting a slot's occupant (at least 1), or None when it must stay where it is
SlotCost = Callable[[int, Any], "float | None"]
#: cost of moving an occupant to a free slot of its size in another slab (a copy) instead
MOVE_COST = 0.05


class SlabAllocator:
    def __init__(self, capacity: int, slab_bytes: int) -> None:
        if slab_bytes <= 0 or capacity < slab_bytes:
            raise ValueError(f"capacity {capacity} must hold at least one slab of {slab_bytes} bytes")
        self.capacity = capacity
        self.slab_bytes = slab_bytes
        self.num_slabs = capacity // slab_bytes
        self._free_slabs = list(range(self.num_slabs - 1, -1, -1))
        self._classes: dict[int, _SlotClass] = {}
        self._slab_class: dict[int, _SlotClass] = {}  # slab index -> the class it serves
        self.draining: set[int] = set()  # slabs being emptied: their freed slots are not handed out
        self.used_bytes = 0  # bytes of slots handed out
        # slots a transport thread is sending from (`hold`): their `free` waits for the last `unhold`
        self._held: dict[int, int] = {}  # offset -> holds
        self._free_later: dict[int, int] = {}  # offset -> slot bytes, freed while held
        self._hold_lock = threading.Lock()

    def fits(self, slot_bytes: int) -> bool:
        return 0 < slot_bytes <= self.slab_bytes

    def _class(self, slot_bytes: int) -> _SlotClass:
        cls = self._classes.get(slot_bytes)
        if cls is None:
            if not self.fits(slot_bytes):
                raise ValueError(f"slot of {slot_bytes} bytes does not fit a {self.slab_bytes}-byte slab")
            cls = self._classes[slot_bytes] = _SlotClass(slot_bytes, self.slab_bytes // slot_bytes)
        return cls

    def alloc(self, slot_bytes: int, carve: bool = True) -> int | None:
        """Offset of a free slot of `slot_bytes` (a `slot_size`), or None when no slot is free.
        With `carve` False, only a free slot in a slab this size already has."""
        cls = self._class(slot_bytes)
        if not cls.free and not (carve and self._carve(cls)):
            return None
        off = cls.free.pop()
        slab, base = divmod(off, self.slab_bytes)
        cls.used[slab] += 1
        cls.owners[slab][base // slot_bytes] = None
        self.used_bytes += slot_bytes
        return off

    def free(self, offset: int, slot_bytes: int) -> None:
        with self._hold_lock:
            if offset in self._held:  # a peer is being sent its bytes: reused after `unhold`
                self._free_later[offset] = slot_bytes
                return
        cls = self._classes[slot_bytes]
        slab, base = divmod(offset, self.slab_bytes)
        cls.used[slab] -= 1
        cls.owners[slab][base // slot_bytes] = FREE
        if slab not in self.draining:
            cls.free.append(offset)
        self.used_bytes -= slot_bytes

    def claim(self, offset: int, owner: Any) -> None:
        """Record what the slot at `offset` (handed out by `alloc`) now holds, for `choose_slab`."""
        slab, base = divmod(offset, self.slab_bytes)
        cls = self._slab_class.get(slab)
        if cls is not None:
            slots = cls.owners[slab]
            i = base // cls.slot_bytes
            if slots[i] is not FREE:
                slots[i] = owner

    def hold(self, offset: int, owner: Any) -> bool:
        """Any thread: keep the slot at `offset` from being reused while its bytes are read, if it
        holds `owner` (its `claim`) now; False when it does not. A held slot freed meanwhile is
        freed at its last `unhold`, so what it held stays readable until then."""
        slab, base = divmod(offset, self.slab_bytes)
        with self._hold_lock:
            cls = self._slab_class.get(slab)
            slots = cls.owners.get(slab) if cls is not None else None
            if slots is None or slots[base // cls.slot_bytes] is not owner:  # type: ignore[union-attr]
                return False
            self._held[offset] = self._held.get(offset, 0) + 1
            return True

    def unhold(self, offset: int) -> None:
        """The manager's thread (as `alloc` and `free`): one `hold` of the slot ends."""
        with self._hold_lock:
            left = self._held[offset] - 1
            if left:
                self._held[offset] = left
                return
            del self._held[offset]
            slot_bytes = self._free_later.pop(offset, None)
        if slot_bytes is not None:
            self.free(offset, slot_bytes)

    def free_slots(self, slot_bytes: int) -> int:
        """Slots of this size obtainable without eviction."""
        cls = self._classes.get(slot_bytes)
        per_slab = self.slab_bytes // slot_bytes
        spare = sum(
            1
            for c in self._classes.values()
            for s, n in c.used.items()
            if n == 0 and c is not cls and s not in self.draining
        )
        return (len(cls.free) if cls else 0) + (len(self._free_slabs) + spare) * per_slab

    def _carve(self, cls: _SlotClass, slab: int | None = None) -> bool:
        if slab is None:
            if not self._free_slabs and not self._reclaim_empty_slab():
                return False
            slab = self._free_slabs.pop()
        base = slab * self.slab_bytes
        cls.free.extend(base + i * cls.slot_bytes for i in range(cls.per_slab - 1, -1, -1))
        cls.used[slab] = 0
        cls.owners[slab] = [FREE] * cls.per_slab
        self._slab_class[slab] = cls
        return True

    def _release(self, cls: _SlotClass, slab: int) -> None:
        """An empty slab leaves its class (its free slots with it)."""
        del cls.used[slab]
        del cls.owners[slab]
        del self._slab_class[slab]
        lo, hi = slab * self.slab_bytes, (slab + 1) * self.slab_bytes
        cls.free = [o for o in cls.free if not lo <= o < hi]

    def _reclaim_empty_slab(self) -> bool:
        for cls in self._classes.values():
            for slab, n in cls.used.items():
                if n == 0 and slab not in self.draining:
                    self._release(cls, slab)
                    self._free_slabs.append(slab)
                    return True
        return False

    def slot_bytes_at(self, offset: int) -> int | None:
        """The slot size of the slab holding `offset`, for validating offsets a client sends."""
        cls = self._slab_class.get(offset // self.slab_bytes)
        return cls.slot_bytes if cls is not None else None

    # ------------------------------------------------------------------ a slab for another size

    def other_sizes(self, slot_bytes: int) -> bool:
        """Whether any slab serves a slot size other than `slot_bytes` (one could be emptied for it)."""
        return any(c.used for s, c in self._classes.items() if s != slot_bytes)

    def choose_slab(
        self, slot_bytes: int, cost: SlotCost, move_cost: float = MOVE_COST, max_slabs: int = 4
    ) -> SlabPlan | None:
        """The cheapest slab of another size to empty so that `slot_bytes` gets one, or None when
        every slab looked at holds something that must stay (`cost` None: pinned, being written).

        A slab's occupants move into free slots of their own size in other slabs while there are
        any (`move_cost` each: a copy), the costliest to lose first; the rest are evicted at their
        `cost` (at least 1). Slabs are looked at in order of a lower bound of that total (their
        count of slots in use, `candidates`), at most `max_slabs` of them, so the work is bounded
        by a few slabs' slots whatever the arena's size. The manager's background reclaim does the
        same a slab per turn of the event loop."""
        best, best_cost = None, 0.0
        for bound, slab in self.candidates(slot_bytes)[:max_slabs]:
            if best is not None and bound >= best_cost:
                break
            c = self.price(slab, cost, move_cost)
            if c is not None and (best is None or c < best_cost):
                best, best_cost = slab, c
        return self.plan(best, cost, move_cost) if best is not None else None

    def candidates(self, slot_bytes: int, move_cost: float = MOVE_COST) -> list[tuple[float, int]]:
        """(lower bound of the cost to empty it, slab) for every slab of another size, cheapest first."""
        out: list[tuple[float, int]] = []
        for cls in self._classes.values():
            if cls.slot_bytes == slot_bytes:
                continue
            for slab, used in cls.used.items():
                if slab in self.draining:
                    continue
                moves = min(used, self._room_outside(cls, slab))
                out.append(((used - moves) + moves * move_cost, slab))
        out.sort()
        return out

    def _room_outside(self, cls: _SlotClass, slab: int) -> int:
        """Free slots of the slab's size in its other slabs."""
        return len(cls.free) - (cls.per_slab - cls.used[slab])

    def _costs(self, slab: int, cost: SlotCost) -> tuple[list[int], list[float]] | None:
        cls = self._slab_class[slab]
        base, size = slab * self.slab_bytes, cls.slot_bytes
        slots: list[int] = []
        costs: list[float] = []
        for i, owner in enumerate(cls.owners[slab]):
            if owner is FREE:
                continue
            c = cost(base + i * size, owner) if owner is not None else None
            if c is None:
                return None
            slots.append(i)
            costs.append(c)
        return slots, costs

    def price(self, slab: int, cost: SlotCost, move_cost: float = MOVE_COST) -> float | None:
        """What emptying `slab` costs now, or None when it holds something that must stay."""
        if slab not in self._slab_class or slab in self.draining:
            return None
        got = self._costs(slab, cost)
        if got is None:
            return None
        costs = got[1]
        moves = min(len(costs), self._room_outside(self._slab_class[slab], slab))
        if moves:
            costs = sorted(costs)[: len(costs) - moves]  # the costliest move instead
        return sum(costs) + moves * move_cost

    def plan(self, slab: int, cost: SlotCost, move_cost: float = MOVE_COST) -> SlabPlan | None:
        """Which pages of `slab` move (the costliest to lose, while their size has free slots
        elsewhere) and which are evicted; None when it holds something that must stay."""
        if slab not in self._slab_class or slab in self.draining:
            return None
        got = self._costs(slab, cost)
        if got is None:
            return None
        slots, costs = got
        cls = self._slab_class[slab]
        base, size = slab * self.slab_bytes, cls.slot_bytes
        order = sorted(range(len(slots)), key=costs.__getitem__, reverse=True)
        moves = min(len(order), self._room_outside(cls, slab))
        owners = cls.owners[slab]
        pairs = [(base + slots[j] * size, owners[slots[j]]) for j in order]
        total = moves * move_cost + sum(costs[j] for j in order[moves:])
        return SlabPlan(slab, size, pairs[:moves], pairs[moves:], total)

    def drain(self, slab: int) -> None:
        """Start emptying `slab`: its free slots are no longer handed out, nor those freed later."""
        cls = self._slab_class[slab]
        self.draining.add(slab)
        lo, hi = slab * self.slab_bytes, (slab + 1) * self.slab_bytes
        cls.free = [o for o in cls.free if not lo <= o < hi]

    def occupants(self, slab: int) -> list[tuple[int, Any]]:
        """(offset, owner) of every slot of `slab` in use (owner None: not claimed)."""
        cls = self._slab_class.get(slab)
        if cls is None:
            return []
        base = slab * self.slab_bytes
        return [(base + i * cls.slot_bytes, o) for i, o in enumerate(cls.owners[slab]) if o is not FREE]

    def slots_in_use(self, slab: int) -> int:
        cls = self._slab_class.get(slab)
        return cls.used[slab] if cls is not None else 0

    def undrain(self, slab: int) -> None:
        """Give up emptying `slab`: its free slots serve its size again."""
        self.draining.discard(slab)
        cls = self._slab_class.get(slab)
        if cls is None:
            return
        base = slab * self.slab_bytes
        cls.free.extend(base + i * cls.slot_bytes for i, o in enumerate(cls.owners[slab]) if o is FREE)

    def give(self, slab: int, slot_bytes: int) -> None:
        """A drained, now empty `slab` serves `slot_bytes` from here on."""
        cls = self._slab_class[slab]
        assert cls.used[slab] == 0, "give() of a slab still in use"
        self.draining.discard(slab)
        self._release(cls, slab)
        self._carve(self._class(slot_bytes), slab)

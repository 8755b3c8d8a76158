"""Layer-pipelined loads: how far a load has arrived, layer by layer, told to the engine through memory.

A pipelined load returns its arena offsets at once; the pages then fill in the background (from disk,
or from a peer one layer group at a time — pages are stored layer-major, so a layer slice of a page is
contiguous). The engine consumes layer i as soon as every page has it, while later layers are still on
the way: it computes layer i while layer i+1 is on the wire.

This module owns the *signal board* — a small table of readiness words in the tail of the shared
arena file, past the page slots, one slot per pipelined load — and `LoadProgress`, which turns "these
pages now have layers [0, k)" and "page j failed" into the word the engine reads. It moves no bytes.

The slot's word (what it means, how it is read) is part of the engine contract:
`polarkvd/wire/signals.py`. The daemon writes a slot after the bytes it announces have landed (one
thread writes each slot). Slots are freed with the load's lease.
"""

from __future__ import annotations

from polarkvd.wire.shared_words import SharedWords
from polarkvd.wire.signals import SIGNAL_BYTES, SIGNAL_NONE, read_signal, signal_word

#: Bytes of the signal board at the end of the arena file (8192 concurrent pipelined loads).
SIGNAL_BOARD_BYTES = 64 << 10


class SignalBoard:
    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.words = SharedWords(view)
        self.slots = len(view) // SIGNAL_BYTES
        self._free = list(range(self.slots - 1, -1, -1))

    def alloc(self) -> int | None:
        if not self._free:
            return None
        slot = self._free.pop()
        self.write(slot, 0, SIGNAL_NONE)
        return slot

    def write(self, slot: int, layers: int, failed_from: int) -> None:
        self.words.store64(slot * SIGNAL_BYTES, signal_word(layers, failed_from))

    def read(self, slot: int) -> tuple[int, int]:
        return read_signal(self.words, slot * SIGNAL_BYTES)

    def free(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def in_use(self) -> int:
        return self.slots - len(self._free)


class LoadProgress:
    """Readiness of one pipelined load of `n` pages of `num_layers` layers each."""

    def __init__(self, board: SignalBoard, slot: int, n: int, num_layers: int) -> None:
        self.board = board
        self.slot: int | None = slot
        self.num_layers = num_layers
        self.page_layers = [0] * n
        self.failed_from = n
        self._published = (-1, -1)

    @property
    def n(self) -> int:
        return len(self.page_layers)

    def page_done(self, i: int) -> None:
        self.page_layers[i] = self.num_layers
        self._publish()

    def layers_done(self, indexes: list[int], layers: int) -> None:
        for i in indexes:
            if layers > self.page_layers[i]:
                self.page_layers[i] = layers
        self._publish()

    def fail(self, i: int) -> None:
        if i < self.failed_from:
            self.failed_from = i
        self._publish()

    @property
    def ready_layers(self) -> int:
        head = self.page_layers[: self.failed_from]
        return min(head) if head else self.num_layers

    @property
    def finished(self) -> bool:
        return self.ready_layers == self.num_layers

    def _publish(self) -> None:
        if self.slot is None:
            return
        state = (self.ready_layers, self.failed_from)
        if state != self._published:
            self._published = state
            failed = SIGNAL_NONE if self.failed_from == self.n else self.failed_from
            self.board.write(self.slot, state[0], failed)

    def close(self) -> None:
        """The load's lease is gone: the slot goes back to the board; later progress is not published."""
        if self.slot is not None:
            self.board.free(self.slot)
            self.slot = None


#: Layer groups a pipelined load moves a page in (remote fetches; disk pages are stored so), the first
#: a single layer so the engine can start early.
LAYER_GROUPS = 8


def layer_group_ends(
    num_layers: int, layer_bytes: int, page_bytes: int, groups: int = LAYER_GROUPS
) -> list[int] | None:
    """Byte offsets where a page's layer groups end (pages are layer-major), or None when the page
    is not `num_layers` whole layers (nothing to cut)."""
    if num_layers <= 1 or layer_bytes <= 0 or num_layers * layer_bytes != page_bytes:
        return None
    return [hi * layer_bytes for _, hi in layer_groups(num_layers, groups)]


def layer_groups(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """Split [0, num_layers) into at most `groups` contiguous ranges, front-loaded with small ones
    so the first layer arrives early: the engine can start while the rest is on the way."""
    if num_layers <= 0:
        return []
    groups = max(1, min(groups, num_layers))
    out: list[tuple[int, int]] = [(0, 1)] if groups > 1 else []
    lo = out[-1][1] if out else 0
    rest = groups - len(out)
    for g in range(rest):
        hi = lo + (num_layers - lo) // (rest - g)
        out.append((lo, hi))
        lo = hi
    return [r for r in out if r[1] > r[0]]

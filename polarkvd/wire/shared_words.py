"""Words in memory shared with other processes, each stored and loaded whole.

The daemon and the engines it serves share words in the arena file's tail: a pipelined load's
signal (transport/pipeline.py), the lookup table's heartbeat, state and flags, and the counters of
each engine's session slot (lookup_table.py). One process writes a word while another reads it, with
no lock between them, so every store and every load must move the whole word at once.

`struct` cannot do that: `pack_into` first zeroes its target and then writes the fields one by
one, and `unpack_from` reads a multi-byte field a byte at a time. A reader in another process then
sees values nobody stored: a pipelined load's signal read as "every layer is here, every page
failed" (layers written, the failed-page field still zero), a heartbeat of 0, a probe stopping at
a flags word that is 0 for a moment. A memoryview cast to "I" or "Q" moves an item with one
constant-size copy, a single aligned load or store on the machines we run on (x86-64, AArch64),
which they do atomically. This module is the one place that does that; nothing else in the project
may write a shared word with `struct`.

Words are native-endian; polarkvd runs on little-endian machines only, and the layouts
(docs/PROTOCOL.md) say little-endian. Offsets are in bytes and must be multiples of the word size
from a buffer that starts word-aligned (the arena file's mappings start on a page).
"""

from __future__ import annotations

import sys
from typing import Any

if sys.byteorder != "little":  # pragma: no cover - no such machine runs polarkvd
    raise ImportError("polarkvd's shared-memory layouts are little-endian; this machine is not")


class SharedWords:
    """The 32- and 64-bit words of a shared buffer (an mmap, or a memoryview of one)."""

    __slots__ = ("_u32", "_u64")

    def __init__(self, buf: Any) -> None:
        view = memoryview(buf).cast("B")
        self._u32 = view[: len(view) // 4 * 4].cast("I")
        self._u64 = view[: len(view) // 8 * 8].cast("Q")

    def load32(self, at: int) -> int:
        if at & 3:
            raise ValueError(f"offset {at} is not 4-byte aligned")
        return self._u32[at >> 2]

    def store32(self, at: int, value: int) -> None:
        if at & 3:
            raise ValueError(f"offset {at} is not 4-byte aligned")
        self._u32[at >> 2] = value

    def load64(self, at: int) -> int:
        if at & 7:
            raise ValueError(f"offset {at} is not 8-byte aligned")
        return self._u64[at >> 3]

    def store64(self, at: int, value: int) -> None:
        if at & 7:
            raise ValueError(f"offset {at} is not 8-byte aligned")
        self._u64[at >> 3] = value

    def release(self) -> None:
        """Drop the casts (an mmap cannot close while a view of it is alive)."""
        self._u32.release()
        self._u64.release()

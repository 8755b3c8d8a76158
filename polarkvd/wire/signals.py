"""Readiness words of pipelined loads, as the engine reads them from the arena file.

A pipelined load returns its arena offsets at once and the pages fill in the background; the
daemon tells the engine how far they got through one slot of the signal board (the tail of the
arena file, `signal_offset` in `hello`'s reply; the board itself is `polarkvd/transport/pipeline.py`).

A slot is one 64-bit word: `layers` in its low 32 bits, the number of leading layers that every
page before `failed_from` holds, and `failed_from` in its high 32 bits, the index of the first page
that will not arrive (`SIGNAL_NONE` while none failed); in memory, two little-endian uint32.
`layers == num_layers` means done. The daemon writes the word after the bytes it announces have
landed (on x86 a reader that sees the word also sees the bytes before it). The word is stored and
loaded whole (shared_words.py): the two halves are only meaningful together, and a reader that saw a
new `layers` with a `failed_from` of 0 would drop every page.
"""

from __future__ import annotations

from polarkvd.wire.shared_words import SharedWords

SIGNAL_BYTES = 8  # one slot
SIGNAL_NONE = 0xFFFFFFFF  # no page failed


def signal_word(layers: int, failed_from: int) -> int:
    return layers | failed_from << 32


def read_signal(words: SharedWords, at: int = 0) -> tuple[int, int]:
    """(layers ready, first failed page or SIGNAL_NONE) of the slot at byte `at` of `words`."""
    word = words.load64(at)
    return word & 0xFFFFFFFF, word >> 32

"""A page on disk read one layer group at a time: the handle `DiskTier.open_grouped` returns.

Owns the page's open file and which ranges are left to decode; a range that fails to read, decode
or verify drops the page through its tier (`DiskTier._corrupt_page`). It does not find or lock pages.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from polarkvd.tiers.codec import GroupRange, checksum, decode_group, decode_into
from polarkvd.tiers.disk_format import HEADER_SIZE, Header
from polarkvd.tiers.disk_index import DiskEntry

if TYPE_CHECKING:
    from polarkvd.tiers.disk import DiskTier


class GroupedPage:
    """A page on disk, to be read and decoded one range (layer group) at a time: see `open_grouped`.
    Holds the file open, so a range can still be read after the page was evicted meanwhile; `close`
    when done (decoding every range, and any failure, close it too)."""

    def __init__(
        self,
        tier: DiskTier,
        key: bytes,
        entry: DiskEntry,
        header: Header,
        fd: int,
        ranges: list[GroupRange] | None,
    ) -> None:
        self._tier, self._key, self._entry, self._h, self._fd = tier, key, entry, header, fd
        self._ranges = ranges
        #: (first byte, end byte) of each range in the page, in order
        self.ranges: list[tuple[int, int]] = (
            [(r.lo, r.hi) for r in ranges] if ranges is not None else [(0, header.raw_len)]
        )
        self._left = set(range(len(self.ranges)))  # not decoded yet

    def decode(self, i: int, page: memoryview) -> None:
        """Read range `i` and decode it into its place in `page` (the whole page's slot), verified.
        Raises PageCorrupt (the page is dropped from the tier) when it does not read, decode or
        verify; `page` then holds garbage in that range, which must not be published."""
        h = self._h
        dst = memoryview(page)
        if dst.format != "B" or dst.ndim != 1:
            dst = dst.cast("B")
        try:
            if self._fd < 0:
                raise ValueError("read after close")
            if self._ranges is not None:
                r = self._ranges[i]
                part = os.pread(self._fd, r.length, HEADER_SIZE + r.at)
                if len(part) != r.length:
                    raise ValueError("file shorter than its groups table")
                decode_group(r, part, dst, h.itemsize)
            else:
                payload = os.pread(self._fd, h.payload_len, HEADER_SIZE)
                if len(payload) != h.payload_len:
                    raise ValueError("payload length differs from header")
                decode_into(h.codec, payload, dst, h.itemsize)
                if checksum(dst) != h.checksum:
                    raise ValueError("checksum mismatch")
        except Exception as exc:  # zstd raises its own error type on garbage
            self.close()
            self._tier._corrupt_page(self._key, self._entry, f"range {i}: {exc}")
        self._left.discard(i)
        if not self._left:  # every range decoded: the file is not needed any more
            self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

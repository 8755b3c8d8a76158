"""Page codec for the disk tier: byte-plane split + zstd, and the one page checksum.

Owns turning a page's raw bytes into a stored blob and back, and `checksum` (xxh3_64), the only page
checksum in polarkvd. It must not do I/O, hold state beyond per-thread zstd contexts and read
buffers (`Scratch`), or know about keys or tiers.

Why byte planes: a bf16/fp16/fp32 value's high byte (sign, exponent) is highly repetitive across a
KV page, its low mantissa byte is noise. Interleaved, zstd sees noise everywhere; split into planes
(all high bytes, then all low bytes) the high plane compresses well on its own.

Measured (zstd level 1, one 6 MiB page of bf16 KV-like values: float32 normal truncated to its top
16 bits; best of 9 on the 2-core dev VM; `tests/tiers/test_codec.py` checks the ratios):

| layout                                   | ratio  | encode  | decode |
|------------------------------------------|--------|---------|--------|
| plain zstd                               | 1.277x | 6.3 ms  | 4.7 ms |
| planes, low plane compressed too         | 1.462x | 12.5 ms | 4.5 ms |
| planes, low plane stored raw (chosen)    | 1.462x | 12.4 ms | 4.2 ms |

(encode: split 1.7 ms, high plane 9.2 ms, low plane 0.8 ms.) The low plane compresses to 0.99997x:
zstd adds frame overhead to noise, so storing it raw is as small and decodes as a plain strided
copy. Trying it costs 0.8 ms of the 12.4 ms encode (zstd rejects noise at ~4 GB/s), which is worth
paying: where low planes do compress (bf16 upcast to fp32, quantised values) skipping them would
lose most of the gain. So every plane is compressed, and kept compressed only when that saves at
least 1/64 of it; the blob records per plane which it is. Other dtypes, planes vs plain:
fp16 1.18x vs 1.09x; fp32 normal values 1.19x vs 1.08x; bf16 upcast to fp32 2.92x vs 2.09x.

Whether compressing pays at all (`min_ratio`, `disk.min_compression_ratio`, default 1.25): real KV
of SmolLM2 in fp32 (vLLM CPU) compresses 1.19x with planes (only the sign/exponent plane shrinks),
and decoding costs ~4 ms of CPU per 5.9 MB page (1.5 GB/s: zstd of that plane plus the strided
interleave), on every disk hit, while the device reads at about that speed: 19% fewer bytes read
does not repay it. Stored raw, a hit costs a copy. bf16 KV-like values (1.46x) stay compressed.

Blob layouts, by codec id:
- RAW: the raw bytes.
- ZSTD: one zstd frame (with content size) of the raw bytes.
- PLANES: a byte whose bit i says plane i is compressed, `itemsize` little-endian u32 plane blob
  lengths, then the plane blobs (plane 0 = least significant byte of each little-endian value).
- GROUPS: the page cut into consecutive byte ranges (its layer groups: pages are layer-major), each
  encoded on its own so that a reader can decode and verify range 0 before range 1 (layer-pipelined
  loads from disk): a u16 count, per range (u32 raw length, u32 blob length, u8 codec id, u64 xxh3_64
  of its raw bytes), then the range blobs. A range's own checksum is what lets its layers be used
  before the rest of the page has been read.
"""

from __future__ import annotations

import enum
import struct
import threading
from typing import NamedTuple

import numpy as np
import xxhash
import zstandard

__all__ = [
    "Codec",
    "GroupRange",
    "GroupedBlob",
    "Scratch",
    "checksum",
    "decode_group",
    "decode_into",
    "encode",
    "encode_groups",
    "group_table_size",
    "parse_group_table",
    "stock_decode_buffers",
]

#: Keep a compressed plane only when it saves at least this fraction: a plane that shrinks by
#: less costs a decompression on every read for nothing.
_MIN_SAVING = 1 / 64
_MAX_PLANES = 8  # the plane mask is one byte


class Codec(enum.IntEnum):
    """Codec ids as stored in page headers: never renumber."""

    RAW = 0
    ZSTD = 1
    PLANES = 2
    GROUPS = 3


class _Contexts(threading.local):
    """zstd contexts are not thread-safe; one set per thread, reused across calls."""

    def __init__(self) -> None:
        self.compressors: dict[int, zstandard.ZstdCompressor] = {}
        self.decompressor = zstandard.ZstdDecompressor()

    def compressor(self, level: int) -> zstandard.ZstdCompressor:
        c = self.compressors.get(level)
        if c is None:
            c = self.compressors[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
        return c


_ctx = _Contexts()

#: `Scratch.stock` rounds sizes up to this, so pages a few bytes apart share one stock
_STOCK_ROUND = 64 << 10


class Scratch:
    """Read buffers, one per thread, reused across calls. A buffer's first use faults its pages in
    (a 5.9 MB page: ~1,400 faults, +3-8 ms on a thread's first disk read, inside a load's first batch:
    `polarkvd bench mixed`), so `stock(n, count)`, called off every load's path (the disk tier's
    writes), makes `count` buffers of n bytes ahead, every page touched; a thread whose own buffer is
    too small takes one of those before it allocates."""

    def __init__(self) -> None:
        self._mine = threading.local()
        self._lock = threading.Lock()
        self._spares: list[bytearray] = []
        self._stocked = 0  # the size of the buffers stocked last

    def view(self, n: int) -> memoryview:
        buf: bytearray | None = getattr(self._mine, "buf", None)
        if buf is None or len(buf) < n:
            with self._lock:
                at = next((i for i, spare in enumerate(self._spares) if len(spare) >= n), None)
                buf = self._spares.pop(at) if at is not None else None
            self._mine.buf = buf = buf if buf is not None else bytearray(n)
        return memoryview(buf)[:n]

    def stock(self, n: int, count: int) -> None:
        """Have `count` buffers of at least `n` bytes ready (a no-op once they were made)."""
        n = -(-n // _STOCK_ROUND) * _STOCK_ROUND
        with self._lock:
            if n <= self._stocked:
                return
            self._stocked = n
        spares = [bytearray(n) for _ in range(count)]  # bytearray(n) zero-fills: its pages fault in here
        with self._lock:
            self._spares = spares


_planes = Scratch()  # a compressed plane's decoded bytes, before they are interleaved into the page


def stock_decode_buffers(raw_len: int, count: int) -> None:
    """Make the buffers `count` threads decoding pages of `raw_len` bytes need, ahead (`Scratch`):
    a plane is at most half a page (items of 2 bytes or more)."""
    _planes.stock(raw_len // 2, count)


def checksum(data: bytes | bytearray | memoryview) -> int:
    """xxh3_64 of `data`: the page checksum, stable across processes and hosts."""
    return xxhash.xxh3_64_intdigest(data)


def _as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    mv = memoryview(data)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def encode(
    data: bytes | bytearray | memoryview, itemsize: int, level: int = 1, min_ratio: float = 1.0
) -> tuple[int, bytes]:
    """Compress one page. Returns (codec id, blob); the blob is never larger than `data`.

    `itemsize` is the size of one KV element (2 for bf16/fp16, 4 for fp32); with 2..8 and a length
    that is a multiple of it the bytes are split into planes first, otherwise plain zstd is used.
    `min_ratio`: a blob that does not shrink the page by at least this factor is not worth a
    decompression on every read: the page is stored RAW (the disk tier's `disk.min_compression_ratio`).
    """
    mv = _as_bytes_view(data)
    raw_len = mv.nbytes
    if raw_len == 0:
        return Codec.RAW, b""
    cctx = _ctx.compressor(level)
    if 2 <= itemsize <= _MAX_PLANES and raw_len % itemsize == 0:
        n = raw_len // itemsize
        planes = np.ascontiguousarray(np.frombuffer(mv, dtype=np.uint8).reshape(n, itemsize).T)
        mask = 0
        lengths: list[int] = []
        parts: list[bytes | memoryview] = []
        for i in range(itemsize):
            plane = planes[i].data
            packed = cctx.compress(plane)
            if len(packed) <= n - n * _MIN_SAVING:
                mask |= 1 << i
                parts.append(packed)
                lengths.append(len(packed))
            else:
                parts.append(plane)
                lengths.append(n)
        table = struct.pack(f"<B{itemsize}I", mask, *lengths)
        stored = len(table) + sum(lengths)
        if mask and stored < raw_len and raw_len >= min_ratio * stored:
            return Codec.PLANES, b"".join([table, *parts])
        return Codec.RAW, bytes(mv)
    packed = cctx.compress(mv)
    if len(packed) < raw_len and raw_len >= min_ratio * len(packed):
        return Codec.ZSTD, packed
    return Codec.RAW, bytes(mv)


_GROUP_COUNT = struct.Struct("<H")
_GROUP_ENTRY = struct.Struct("<IIBQ")  # raw length, blob length, codec id, xxh3_64 of the raw bytes


def encode_groups(
    data: bytes | bytearray | memoryview,
    itemsize: int,
    ends: list[int],
    level: int = 1,
    min_ratio: float = 1.0,
) -> tuple[int, bytes]:
    """Compress a page as consecutive ranges ending at byte offsets `ends` (the last = its length),
    each range on its own with its own checksum (codec GROUPS; each range RAW unless it shrinks by
    `min_ratio`). One range: plain `encode`."""
    mv = _as_bytes_view(data)
    if not ends or ends[-1] != mv.nbytes or any(b <= a for a, b in zip([0, *ends], ends)):
        raise ValueError(f"group ends {ends} do not cut a {mv.nbytes}-byte page into ranges")
    if len(ends) == 1 or len(ends) > 0xFFFF:
        return encode(mv, itemsize, level, min_ratio)
    table = [_GROUP_COUNT.pack(len(ends))]
    blobs: list[bytes] = []
    lo = 0
    for hi in ends:
        part = mv[lo:hi]
        codec_id, blob = encode(part, itemsize, level, min_ratio)
        table.append(_GROUP_ENTRY.pack(hi - lo, len(blob), codec_id, checksum(part)))
        blobs.append(blob)
        lo = hi
    return Codec.GROUPS, b"".join(table + blobs)


class GroupRange(NamedTuple):
    """One range of a GROUPS blob: where it goes in the page, where its blob is in the blob."""

    lo: int  # first byte in the page
    hi: int  # end byte in the page
    codec: int
    at: int  # its blob's offset in the GROUPS blob
    length: int  # its blob's length
    digest: int  # xxh3_64 of its raw bytes


def group_table_size(head: bytes | bytearray | memoryview) -> int:
    """Bytes of a GROUPS blob's table, from its first 2 bytes (read those, then the table)."""
    n: int = _GROUP_COUNT.unpack_from(head)[0]
    return _GROUP_COUNT.size + n * _GROUP_ENTRY.size


def parse_group_table(table: bytes | bytearray | memoryview, raw_len: int, blob_len: int) -> list[GroupRange]:
    """The ranges of a GROUPS blob of `blob_len` bytes for a page of `raw_len`, from its table
    (ValueError when the table does not describe exactly that)."""
    src = _as_bytes_view(table)
    if src.nbytes < _GROUP_COUNT.size:
        raise ValueError("groups blob shorter than its count")
    (n,) = _GROUP_COUNT.unpack_from(src)
    at = _GROUP_COUNT.size + n * _GROUP_ENTRY.size
    if n == 0 or src.nbytes < at:
        raise ValueError("groups blob shorter than its table")
    ranges: list[GroupRange] = []
    lo = 0
    for i in range(n):
        length, part_len, codec_id, digest = _GROUP_ENTRY.unpack_from(
            src, _GROUP_COUNT.size + i * _GROUP_ENTRY.size
        )
        if codec_id == Codec.GROUPS:
            raise ValueError("a range cannot itself be grouped")
        ranges.append(GroupRange(lo, lo + length, codec_id, at, part_len, digest))
        lo += length
        at += part_len
    if lo != raw_len or at != blob_len:
        raise ValueError("groups table does not match the page or the blob length")
    return ranges


def decode_group(
    r: GroupRange, part: bytes | bytearray | memoryview, page: memoryview, itemsize: int
) -> None:
    """Decode one range's blob `part` into its place in `page` and verify it (ValueError or
    zstandard.ZstdError when it does not decode or verify; that range of `page` is then garbage)."""
    out = _as_bytes_view(page)[r.lo : r.hi]
    decode_into(r.codec, part, out, itemsize)
    if checksum(out) != r.digest:
        raise ValueError(f"range {r.lo}..{r.hi} fails its checksum")


class GroupedBlob:
    """A GROUPS blob in memory: decode and verify its ranges one at a time, in any order."""

    def __init__(self, blob: bytes | bytearray | memoryview, raw_len: int) -> None:
        self.src = _as_bytes_view(blob)
        self.ranges = parse_group_table(self.src, raw_len, self.src.nbytes)

    def decode(self, i: int, page: memoryview, itemsize: int) -> None:
        r = self.ranges[i]
        decode_group(r, self.src[r.at : r.at + r.length], page, itemsize)


def _zstd_into(blob: memoryview, out: memoryview) -> None:
    """Decompress one zstd frame straight into `out`, which it must fill exactly."""
    size = zstandard.frame_content_size(blob)
    if size != out.nbytes:
        raise ValueError(f"zstd frame holds {size} bytes, expected {out.nbytes}")
    reader = _ctx.decompressor.stream_reader(blob)
    pos = 0
    while pos < out.nbytes:
        got = reader.readinto(out[pos:])
        if not got:
            raise ValueError(f"zstd frame ended after {pos} of {out.nbytes} bytes")
        pos += got


def decode_into(codec_id: int, blob: bytes | bytearray | memoryview, out: memoryview, itemsize: int) -> None:
    """Decode `blob` into `out`, whose length must be the page's raw length.

    Raises ValueError (or zstandard.ZstdError) when the blob does not decode to exactly that many
    bytes; `out` is then partly written. Callers verify `checksum(out)` before trusting it.
    """
    src = _as_bytes_view(blob)
    dst = _as_bytes_view(out)
    if dst.readonly:
        raise ValueError("decode_into needs a writable output buffer")
    raw_len = dst.nbytes
    if codec_id == Codec.RAW:
        if src.nbytes != raw_len:
            raise ValueError(f"raw blob holds {src.nbytes} bytes, expected {raw_len}")
        dst[:] = src
    elif codec_id == Codec.ZSTD:
        _zstd_into(src, dst)
    elif codec_id == Codec.PLANES:
        _planes_into(src, dst, itemsize)
    elif codec_id == Codec.GROUPS:
        grouped = GroupedBlob(src, raw_len)
        for i in range(len(grouped.ranges)):
            grouped.decode(i, dst, itemsize)
    else:
        raise ValueError(f"unknown codec id {codec_id}")


def _planes_into(src: memoryview, dst: memoryview, itemsize: int) -> None:
    raw_len = dst.nbytes
    if not 2 <= itemsize <= _MAX_PLANES or raw_len % itemsize:
        raise ValueError(f"planes blob for {raw_len} bytes with itemsize {itemsize}")
    n = raw_len // itemsize
    table = struct.Struct(f"<B{itemsize}I")
    if src.nbytes < table.size:
        raise ValueError("planes blob shorter than its table")
    mask, *lengths = table.unpack_from(src)
    if table.size + sum(lengths) != src.nbytes:
        raise ValueError("planes table does not match the blob length")
    # Strided writes into the caller's buffer: each plane lands in its byte column of `out`.
    columns = np.frombuffer(dst, dtype=np.uint8).reshape(n, itemsize)
    pos = table.size
    for i, length in enumerate(lengths):
        seg = src[pos : pos + length]
        pos += length
        if mask >> i & 1:
            plane = _planes.view(n)
            _zstd_into(seg, plane)
            columns[:, i] = np.frombuffer(plane, dtype=np.uint8)
        else:
            if length != n:
                raise ValueError(f"raw plane {i} holds {length} bytes, expected {n}")
            columns[:, i] = np.frombuffer(seg, dtype=np.uint8)

"""The disk tier's files: page file header, index snapshot, directory layout, and syncs.

Owns what is on disk and how it is read and written byte by byte; `disk.py` decides when. Nothing
here holds state between calls.

Layout: one file per page, `<root>/<first key byte as 2 hex>/<key as 32 hex>.pkv`, holding a fixed
96-byte header (magic, format version, codec id, itemsize, key, parent, ns, raw and payload lengths,
xxh3_64 of the raw page, xxh3_64 of the header itself) and the codec blob (`codec.py`). Temp files
end in `.tmp` and are deleted at open. `<root>/index.msgpack` is the index snapshot: an 8-byte
magic, the xxh3_64 of the msgpack body, and the body (format, namespaces, and one row per page in
eviction order, coldest first). `<root>/lock` is flocked by the open tier; `<root>/seed-fingerprint`
names the page-key seed the pages were keyed with.

Stored sizes are counted in 512-byte units, rounded up (`stored_size`): pages of about one size
then share one int object in the index, and the count never understates what the files take.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import io
import logging
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path

import msgpack

from polarkvd.tiers.codec import Codec, Scratch, checksum, decode_into, group_table_size, parse_group_table
from polarkvd.types import KEY_BYTES

log = logging.getLogger("polarkvd.tiers.disk")

_MAGIC = b"PKVP"
_FORMAT = 1
_FLAG_PARENT = 1
# magic, format, codec, itemsize, flags, key, parent, ns, raw length, payload length, page xxh3, pad
_HEAD = struct.Struct("<4sHBBI16s16s16sQQQ4x")
_HEAD_SUM = struct.Struct("<Q")
HEADER_SIZE = _HEAD.size + _HEAD_SUM.size  # 96
_NO_PARENT = bytes(KEY_BYTES)

INDEX_NAME = "index.msgpack"
_INDEX_MAGIC = b"PKVIDX01"
_INDEX_HEAD = struct.Struct("<8sQ")  # magic, xxh3_64 of the msgpack body
_INDEX_FORMAT = 2  # 2: rows carry the page's depth; 1 (without) is still read
LOCK_NAME = "lock"
SEED_NAME = "seed-fingerprint"
SEED_RE = re.compile(r"[0-9a-f]{16}")
PAGE_RE = re.compile(r"[0-9a-f]{32}\.pkv")
TMP_SUFFIX = ".tmp"
SUBDIR_RE = re.compile(r"[0-9a-f]{2}")
STORED_UNIT = 512

#: (key, parent, ns, raw_bytes, stored_bytes, depth): one page's metadata as the snapshot and headers
#: give it (headers carry no depth: 0)
Row = tuple[bytes, bytes | None, bytes, int, int, int]


def stored_size(file_bytes: int) -> int:
    """A page file's size as the tier counts it: rounded up to `STORED_UNIT`."""
    return -(-file_bytes // STORED_UNIT) * STORED_UNIT


def check_key(name: str, value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != KEY_BYTES:
        raise ValueError(f"{name} must be {KEY_BYTES} bytes, got {value!r:.60}")
    return value


def page_path(root: str, key: bytes) -> str:
    # plain strings: pathlib would intern every page file name, growing a table that never shrinks
    h = key.hex()
    return f"{root}{os.sep}{h[:2]}{os.sep}{h}.pkv"


# ---------------------------------------------------------------- page header


@dataclasses.dataclass(frozen=True)
class Header:
    codec: int
    itemsize: int
    key: bytes
    parent: bytes | None
    ns: bytes
    raw_len: int
    payload_len: int
    checksum: int

    def mismatch(self, key: bytes, ns: bytes, raw_len: int, size: int) -> bool:
        """Whether this header describes another page than the index entry (key, ns, raw_len, size)."""
        return (
            self.key != key
            or self.ns != ns
            or self.raw_len != raw_len
            or stored_size(HEADER_SIZE + self.payload_len) != size
        )


def pack_header(
    codec: int,
    itemsize: int,
    key: bytes,
    parent: bytes | None,
    ns: bytes,
    raw_len: int,
    payload_len: int,
    csum: int,
) -> bytes:
    flags = _FLAG_PARENT if parent is not None else 0
    head = _HEAD.pack(
        _MAGIC, _FORMAT, codec, itemsize, flags, key, parent or _NO_PARENT, ns, raw_len, payload_len, csum
    )
    return head + _HEAD_SUM.pack(checksum(head))


def parse_header(buf: bytes | bytearray | memoryview) -> Header | None:
    """The header at the start of `buf`, or None if it is not a valid page header of this format."""
    if len(buf) < HEADER_SIZE:
        return None
    head = memoryview(buf)[: _HEAD.size]
    if _HEAD_SUM.unpack_from(buf, _HEAD.size)[0] != checksum(head):
        return None
    magic, fmt, codec, itemsize, flags, key, parent, ns, raw_len, payload_len, csum = _HEAD.unpack(head)
    if magic != _MAGIC or fmt != _FORMAT or codec not in Codec._value2member_map_ or itemsize < 1:
        return None
    return Header(
        codec, itemsize, key, parent if flags & _FLAG_PARENT else None, ns, raw_len, payload_len, csum
    )


def header_row(file: str) -> Row | None:
    """The page file's metadata from its header, or None when the header is bad, names another file,
    or does not match the file's size."""
    try:
        with open(file, "rb") as f:
            buf = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return None
    h = parse_header(buf)
    if h is None or h.key.hex() + ".pkv" != os.path.basename(file) or HEADER_SIZE + h.payload_len != size:
        return None
    return (h.key, h.parent, h.ns, h.raw_len, stored_size(size), 0)


def delete_leftover(path: str | Path) -> int:
    """Delete an invalid or leftover file found at open: 1 if it was there, else 0."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return 0
    log.warning("disk tier: deleted invalid or leftover file %s", path)
    return 1


def readinto_exact(f: io.RawIOBase, view: memoryview) -> int:
    pos = 0
    while pos < len(view):
        got = f.readinto(view[pos:])
        if not got:
            break
        pos += got
    return pos


def read_page(
    path: str, key: bytes, ns: bytes, size: int, raw_len: int, out: memoryview, scratch: Scratch
) -> str | None:
    """Fill `out` (exactly `raw_len` bytes) from the page file at `path` and verify it against its
    header's checksum: the reason it is bad, or None when it verified. FileNotFoundError and other
    OSErrors go to the caller.

    A page whose bytes are stored as they are (codec RAW, or GROUPS whose every range is RAW, as
    fp32 KV mostly is) is read straight into `out` and checked in one pass of the page checksum: no
    read buffer, no copy out of it, no second pass over each range's own checksum (the page's covers
    every byte): on a host, each pass over a page is CPU taken from the model computing beside the
    promotion (`polarkvd bench mixed`: 0.7-0.8 ms of an I/O thread per 5.9 MB page, was 1.0-1.4).
    Other codecs go through `scratch`."""
    with open(path, "rb", buffering=0) as f:
        head_buf = bytearray(HEADER_SIZE)
        if readinto_exact(f, memoryview(head_buf)) != HEADER_SIZE:
            return "truncated header"
        h = parse_header(head_buf)
        if h is None:
            return "bad header"
        if h.mismatch(key, ns, raw_len, size):
            return "header does not match the index"
        codec, got, payload = h.codec, 0, None
        if codec == Codec.GROUPS:
            table = bytearray(f.read(2))
            if len(table) == 2:
                table += f.read(group_table_size(table) - 2)
            try:
                ranges = parse_group_table(table, raw_len, h.payload_len)
            except ValueError as exc:
                return f"undecodable payload: {exc}"
            got = len(table)
            raw = all(r.codec == Codec.RAW and r.length == r.hi - r.lo for r in ranges)
            if raw:  # the ranges' bytes follow the table as they are: one raw payload
                codec = Codec.RAW
            else:
                payload = scratch.view(h.payload_len)
                payload[:got] = table
        if codec == Codec.RAW:
            got += readinto_exact(f, out)
        else:
            if payload is None:
                payload = scratch.view(h.payload_len)
            got += readinto_exact(f, payload[got:])
        if got != h.payload_len or f.read(1):
            return "payload length differs from header"
    if payload is not None:
        try:
            decode_into(h.codec, payload, out, h.itemsize)
        except Exception as exc:  # zstd raises its own error type on garbage
            return f"undecodable payload: {exc}"
    if checksum(out) != h.checksum:
        return "checksum mismatch"
    return None


# ---------------------------------------------------------------- seed record


def recorded_seed(root: Path) -> str | None:
    """The page-key seed fingerprint the pages under `root` were keyed with; None when none is
    recorded, a description when the record cannot be read."""
    try:
        return (root / SEED_NAME).read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        return f"<unreadable: {e}>"


def record_seed(root: Path, fingerprint: str) -> None:
    """Record the fingerprint atomically and durably (before any page is written under it)."""
    if recorded_seed(root) == fingerprint:
        return
    tmp = root / f"{SEED_NAME}{TMP_SUFFIX}"
    with open(tmp, "w") as f:
        f.write(f"{fingerprint}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / SEED_NAME)
    fsync_dir(os.fspath(root))


# ---------------------------------------------------------------- index snapshot


def write_snapshot(
    root: Path, namespaces: list[bytes], pages: list[tuple[bytes, bytes | None, int, int, int, int]]
) -> None:
    """Write the snapshot atomically: `pages` rows are (key, parent, index into `namespaces`,
    raw_bytes, stored_bytes, depth), coldest first. Raises OSError."""
    body = msgpack.packb({"format": _INDEX_FORMAT, "namespaces": namespaces, "pages": pages})
    final = root / INDEX_NAME
    tmp = root / f"{INDEX_NAME}.{os.getpid()}{TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as f:
            f.write(_INDEX_HEAD.pack(_INDEX_MAGIC, checksum(body)))
            f.write(body)
        os.replace(tmp, final)
    except OSError:  # e.g. a full disk: no partial snapshot left taking room
        tmp.unlink(missing_ok=True)
        raise


def load_snapshot(root: Path) -> dict[bytes, Row] | None:
    """key -> row, in snapshot order; None if absent or bad (logged: the tier rebuilds from headers)."""
    try:
        with open(root / INDEX_NAME, "rb") as f:
            buf = f.read()
    except FileNotFoundError:
        return None
    try:
        magic, csum = _INDEX_HEAD.unpack_from(buf)
        body = memoryview(buf)[_INDEX_HEAD.size :]
        if magic != _INDEX_MAGIC or checksum(body) != csum:
            raise ValueError("bad magic or checksum")
        doc = msgpack.unpackb(body)
        if doc["format"] not in (1, _INDEX_FORMAT):
            raise ValueError(f"index format {doc['format']}")
        namespaces = [check_key("ns", ns) for ns in doc["namespaces"]]
        rows: dict[bytes, Row] = {}
        for row in doc["pages"]:
            key, parent, ns_id, raw_bytes, stored_bytes = row[:5]
            depth = row[5] if len(row) > 5 else 0
            check_key("key", key)
            if parent is not None:
                check_key("parent", parent)
            if not (isinstance(raw_bytes, int) and isinstance(stored_bytes, int)):
                raise ValueError("page sizes must be integers")
            if not (isinstance(depth, int) and 0 <= depth <= 255):
                raise ValueError("depths must be integers 0..255")
            rows[key] = (key, parent, namespaces[ns_id], raw_bytes, stored_size(stored_bytes), depth)
        return rows
    except Exception as exc:  # any malformed snapshot means: rebuild from the page headers
        log.warning("disk tier: ignoring index snapshot %s: %s", root / INDEX_NAME, exc)
        return None


# ---------------------------------------------------------------- syncs


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()


def syncfs(path: str) -> None:
    """Flush everything dirty on the file system holding `path`. Raises OSError, also where the
    platform has no syncfs."""
    if _syncfs is None:
        raise OSError(errno.ENOSYS, "syncfs is not available on this platform")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)

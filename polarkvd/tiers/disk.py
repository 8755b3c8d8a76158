"""L4: the disk tier. Compressed pages in a directory that survives restarts and never serves bad bytes.

Owns the bytes of pages on disk, their index and their eviction order within `capacity_bytes`. It
does not decide which pages come here (the manager demotes into it) and does not check namespaces
against callers (it stores each page's `ns` so the daemon can).

Layout: one file per page, `<path>/<first key byte as 2 hex>/<key as 32 hex>.pkv`, holding a fixed
96-byte header (magic, format version, codec id, itemsize, key, parent, ns, raw and payload lengths,
xxh3_64 of the raw page, xxh3_64 of the header itself) and the codec blob (`codec.py`). A page is
written to a temp name in its final directory and `os.replace`d, so a killed daemon never leaves a
half-visible page, only temp files, which `open()` deletes. A page evicted from DRAM is not fsynced:
this is a cache, and after a power loss a torn or zero-filled page fails its checksum on read and is
dropped. Write-through makes pages durable after their puts: `sync_files` fdatasyncs the page files
and `sync_dirs` fsyncs the directories holding their names, or `sync_filesystem` does both for every
page at once (syncfs). `open()` finds pages by scanning the files, so data, name and directory are
all a page needs to survive a crash or a power loss; a page whose sync did not finish was never
acknowledged, and if the power loss tore it, it fails its checksum like any other.
Pages the manager demotes are stored in their layer groups (codec GROUPS: each group compressed on
its own, with its own checksum), so `open_grouped` can read, decode and verify group 0 of a whole
prefix before group 1 (layer-pipelined loads); `get_into` reads any page whole. A daemon from before
GROUPS drops such files as having a bad header (a cache: they are recomputed).

Index: `<path>/index.msgpack`, a checksummed snapshot of every page's metadata in eviction order,
written atomically by `flush_index()` (from `close()`, and from the daemon's timer). `open()` takes
the snapshot as a hint and reconciles it with the files: entries whose file is missing or has
another size (counted in 512-byte units, `_stored_size`: a file cut by a few bytes is caught by its
first read instead) are dropped, files it does not list are adopted after their header verifies (file
mtime orders them), files with a bad header and temp files are deleted. Only headers are read at
open, and only for files the snapshot does not vouch for, so a TB-scale tier opens in a directory
scan; payload checksums are verified on every `get_into` instead. A page that fails is removed
(file and index) and reported as `PageCorrupt`, so the caller recomputes.

Concurrency: one lock guards the index, policy and byte counts; compression, checksums and file I/O
run outside it, so pool threads overlap and the event loop's `entry()`/`stats()` never wait on disk.
Keys with a file being written or deleted are tracked so that an eviction's unlink can never remove
a re-put page's new file. `stored_bytes` plus space reserved by puts in flight never exceeds
`capacity_bytes`. An exclusive `flock` on `<path>/lock` keeps a second process (or a second
`DiskTier` in this one) out of the directory; the kernel drops it when its holder dies.

Seed: `<path>/seed-fingerprint` names the page-key seed (`keys.seed_fingerprint`) the pages were
keyed with, written before the first page. A tier opened with another seed, or over pages with no
record, deletes those pages at open (counted in `refused`, one log line): keys of another seed are
never computed again, and an old page must never be served under a new seed.

Eviction is leaf-first: a page with cached children on disk is never a victim (`children` counts
them, including children that arrived before their parent, the usual order when DRAM demotes
leaves first), and among leaves the policy (`lru` or `s3fifo`, switchable live) decides.

Memory: ~227 bytes of Python heap per page in the index (tracemalloc, pages in chains of 10, one
namespace; `tests/tiers/test_disk.py::index_bytes_per_page`): the slotted `DiskEntry` 104, its key
49, the dict slot the rest; namespaces, page sizes, stored sizes (512-byte units) and parent keys of
pages on disk are shared objects (an exact stored size was an int of its own: 260-285 B before). A
page whose parent is not on disk costs ~150 more (its own parent key and a pending-children count).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import functools
import io
import logging
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Container
from pathlib import Path
from typing import Any, NoReturn

import msgpack

from polarkvd.errors import PageCorrupt, PageNotFound, ResourceError
from polarkvd.policy import EvictionPolicy, PolicyNode, make_policy, switch_policy
from polarkvd.tiers.codec import (
    Codec,
    GroupRange,
    checksum,
    decode_group,
    decode_into,
    encode,
    encode_groups,
    group_table_size,
    parse_group_table,
)
from polarkvd.types import KEY_BYTES

__all__ = ["DiskEntry", "DiskOpenReport", "DiskStats", "DiskTier", "GroupedPage", "HEADER_SIZE"]

log = logging.getLogger(__name__)

_MAGIC = b"PKVP"
_FORMAT = 1
_FLAG_PARENT = 1
# magic, format, codec, itemsize, flags, key, parent, ns, raw length, payload length, page xxh3, pad
_HEAD = struct.Struct("<4sHBBI16s16s16sQQQ4x")
_HEAD_SUM = struct.Struct("<Q")
HEADER_SIZE = _HEAD.size + _HEAD_SUM.size  # 96
_NO_PARENT = bytes(KEY_BYTES)

_INDEX_NAME = "index.msgpack"
_INDEX_MAGIC = b"PKVIDX01"
_INDEX_HEAD = struct.Struct("<8sQ")  # magic, xxh3_64 of the msgpack body
_INDEX_FORMAT = 1
_LOCK_NAME = "lock"
_SEED_NAME = "seed-fingerprint"
_SEED_RE = re.compile(r"[0-9a-f]{16}")
_PAGE_RE = re.compile(r"[0-9a-f]{32}\.pkv")
_TMP_SUFFIX = ".tmp"
_SUBDIR_RE = re.compile(r"[0-9a-f]{2}")
_MAX_INTERNED = 4096  # distinct namespaces and page sizes shared between entries
#: Stored sizes are counted in units of this many bytes (rounded up): a page then shares its size
#: object with every page of about its size instead of holding an int of its own (32 B of the ~260
#: an index entry cost), and the count never understates what the files take.
_STORED_UNIT = 512
_MAX_STORED_SIZES = 1 << 16


def _stored_size(file_bytes: int) -> int:
    """A page file's size as the tier counts it: rounded up to `_STORED_UNIT`."""
    return -(-file_bytes // _STORED_UNIT) * _STORED_UNIT


#: (key, parent, ns, raw_bytes, stored_bytes): one page's metadata as the snapshot and headers give it
_Row = tuple[bytes, bytes | None, bytes, int, int]


class DiskEntry(PolicyNode):
    """One page on disk. Owned and mutated by the tier under its lock: callers read, never write."""

    __slots__ = ("parent", "ns", "raw_bytes", "stored_bytes", "children")

    def __init__(
        self, key: bytes, parent: bytes | None, ns: bytes, raw_bytes: int, stored_bytes: int
    ) -> None:
        super().__init__(key)
        self.parent = parent
        self.ns = ns
        self.raw_bytes = raw_bytes
        self.stored_bytes = stored_bytes  # file size, header included, rounded up to _STORED_UNIT
        self.children = 0  # pages on disk whose parent is this page


@dataclasses.dataclass(frozen=True)
class DiskOpenReport:
    pages: int
    stored_bytes: int
    recovered: int  # valid page files the index snapshot did not list
    dropped: int  # index entries and files that failed reconciliation, temp files included
    seconds: float
    index_loaded: bool = False  # a valid snapshot was found
    evicted: int = 0  # pages evicted because the tier was over capacity at open
    refused: int = 0  # pages deleted because they were keyed with another page-key seed


@dataclasses.dataclass(frozen=True)
class DiskStats:
    pages: int
    stored_bytes: int
    raw_bytes: int
    capacity_bytes: int
    evictions: int
    corrupt_dropped: int
    puts: int  # pages written (existing keys and failed puts not counted)
    gets: int  # pages delivered by get_into
    policy: str = "lru"
    seed_refused: int = 0  # pages deleted at open: keyed with another page-key seed


@dataclasses.dataclass(frozen=True)
class _Header:
    codec: int
    itemsize: int
    key: bytes
    parent: bytes | None
    ns: bytes
    raw_len: int
    payload_len: int
    checksum: int


def _pack_header(
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


def _parse_header(buf: bytes | bytearray | memoryview) -> _Header | None:
    """The header at the start of `buf`, or None if it is not a valid page header of this format."""
    if len(buf) < HEADER_SIZE:
        return None
    head = memoryview(buf)[: _HEAD.size]
    if _HEAD_SUM.unpack_from(buf, _HEAD.size)[0] != checksum(head):
        return None
    magic, fmt, codec, itemsize, flags, key, parent, ns, raw_len, payload_len, csum = _HEAD.unpack(head)
    if magic != _MAGIC or fmt != _FORMAT or codec not in Codec._value2member_map_ or itemsize < 1:
        return None
    return _Header(
        codec, itemsize, key, parent if flags & _FLAG_PARENT else None, ns, raw_len, payload_len, csum
    )


class _Scratch(threading.local):
    """Per-thread read buffer for compressed payloads, reused so reads do not fault in fresh pages."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def view(self, n: int) -> memoryview:
        if len(self.buf) < n:
            self.buf = bytearray(n)
        return memoryview(self.buf)[:n]


def _readinto_exact(f: io.RawIOBase, view: memoryview) -> int:
    pos = 0
    while pos < len(view):
        got = f.readinto(view[pos:])
        if not got:
            break
        pos += got
    return pos


def _check_key(name: str, value: object) -> bytes:
    if not isinstance(value, bytes) or len(value) != KEY_BYTES:
        raise ValueError(f"{name} must be {KEY_BYTES} bytes, got {value!r:.60}")
    return value


class GroupedPage:
    """A page on disk, to be read and decoded one range (layer group) at a time: see `open_grouped`.
    Holds the file open, so a range can still be read after the page was evicted meanwhile; `close`
    when done (decoding every range, and any failure, close it too)."""

    def __init__(
        self,
        tier: DiskTier,
        key: bytes,
        entry: DiskEntry,
        header: Any,
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


class DiskTier:
    """Compressed pages on local disk. Thread-safe; see the module docstring for the contract."""

    def __init__(
        self,
        path: Path,
        capacity_bytes: int,
        policy: str = "lru",
        level: int = 1,
        min_ratio: float = 1.0,
        seed_fingerprint: str | None = None,
    ) -> None:
        """`seed_fingerprint`: the page-key seed's (keys.seed_fingerprint); pages recorded under
        another are refused at open. None: no record, no check (tools and tests of bytes only)."""
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.path = Path(path)
        self._root = os.fspath(self.path)
        self.capacity_bytes = capacity_bytes
        self.level = level
        self.min_ratio = min_ratio  # pages that compress less are stored raw (disk.min_compression_ratio)
        if seed_fingerprint is not None and not _SEED_RE.fullmatch(seed_fingerprint):
            raise ValueError(f"seed_fingerprint must be 16 hex characters, got {seed_fingerprint!r}")
        self.seed_fingerprint = seed_fingerprint
        self._seed_refused = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._policy: EvictionPolicy = make_policy(policy)
        self._entries: dict[bytes, DiskEntry] = {}
        # children that reached disk before their parent: parent key -> count
        self._waiting: dict[bytes, int] = {}
        self._interned: dict[object, object] = {}  # namespaces and page sizes, shared by entries
        self._sizes: dict[int, int] = {}  # stored sizes (multiples of _STORED_UNIT), shared by entries
        self._writing: set[bytes] = set()
        self._deleting: set[bytes] = set()
        self._stored = 0
        self._raw = 0
        self._reserved = 0
        self._evictions = 0
        #: called with the keys of pages that left the tier (evicted, removed, dropped as corrupt), on
        #: whatever thread removed them (set by the manager: their lookup-table entries go, and the
        #: cluster withdraws their announcements)
        self.on_removed: Callable[[list[bytes]], None] | None = None
        #: set by the manager (manager/quotas.py): for a page's namespace, (limit, the namespaces sharing
        #: it: its tenant's) or None; a put over the limit evicts pages of those namespaces only
        self.quota_of: Callable[[bytes], tuple[int, frozenset[bytes]] | None] | None = None
        self._ns_stored: dict[bytes, int] = {}  # namespace -> stored bytes
        self._ns_reserved: dict[bytes, int] = {}  # namespace -> bytes of its puts in flight
        self._quota_evicted: dict[bytes, int] = {}  # namespace -> pages evicted by its quota
        self._corrupt = 0
        self._puts = 0
        self._gets = 0
        self._changes = 0  # index changes since the last snapshot
        self._flush_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._made_dirs: set[str] = set()
        self._unsynced_dirs: set[str] = set()  # subdirectories created since the root was last fsynced
        self._scratch = _Scratch()

    # ---------------------------------------------------------------- lifecycle

    def open(self) -> DiskOpenReport:
        """Create or reopen the directory, reconcile snapshot and files, evict down to capacity."""
        if self._lock_fd is not None:
            raise RuntimeError(f"disk tier {self.path} is already open")
        started = time.perf_counter()
        self.path.mkdir(parents=True, exist_ok=True)
        try:  # the root's own name, for durable puts (sync_dirs covers what is below it)
            _fsync_dir(os.fspath(self.path.parent))
        except OSError as exc:
            log.warning("disk tier: cannot fsync %s: %s", self.path.parent, exc)
        fd = os.open(self.path / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ResourceError(f"disk tier directory {self.path} is in use by another DiskTier") from None
        self._lock_fd = fd
        with self._lock:  # reopening after close(): start from the files, not stale state
            self._entries.clear()
            self._waiting.clear()
            self._policy = make_policy(self._policy.name)
            self._stored = self._raw = 0
            self._ns_stored.clear()
        try:
            refuse = self._seed_mismatch()
            snapshot, dropped, trusted, recovered = self._reconcile(refuse is not None)
            refused = 0
            if refuse is not None:
                refused, dropped = dropped, 0
                self._seed_refused += refused
                if refused:
                    log.error(
                        "disk tier %s: %d pages were keyed with %s; deleted, never served (every "
                        "cached page is unreachable under a new seed, see docs/OPERATIONS.md)",
                        self.path, refused, refuse,
                    )  # fmt: skip
            if self.seed_fingerprint is not None:
                self._record_seed()  # after the refusal: a crash midway refuses the rest next time
        except BaseException:
            self._lock_fd = None
            os.close(fd)
            raise
        with self._lock:
            for row in trusted + recovered:
                self._admit_locked(*row)
            self._changes = 1 if (recovered or dropped or snapshot is None) else 0
            over = self._stored - self.capacity_bytes
        evicted = 0
        if over > 0:
            before = self._evictions
            self.evict_bytes(over)
            evicted = self._evictions - before
        if self._changes:
            self.flush_index()
        stats = self.stats()
        report = DiskOpenReport(
            pages=stats.pages,
            stored_bytes=stats.stored_bytes,
            recovered=len(recovered),
            dropped=dropped,
            seconds=time.perf_counter() - started,
            index_loaded=snapshot is not None,
            evicted=evicted,
            refused=refused,
        )
        log.info("disk tier %s opened: %s", self.path, report)
        return report

    def _seed_mismatch(self) -> str | None:
        """Why the pages here (if any) must be refused: keyed with another seed, or with an unknown
        one; None when the recorded seed is ours or the tier has no seed to check."""
        if self.seed_fingerprint is None:
            return None
        try:
            recorded: str | None = (self.path / _SEED_NAME).read_text().strip()
        except FileNotFoundError:
            recorded = None
        except (OSError, UnicodeDecodeError) as e:
            recorded = f"<unreadable: {e}>"
        if recorded == self.seed_fingerprint:
            return None
        if recorded is None:
            return "no recorded seed (an older polarkvd, or a lost seed-fingerprint file)"
        return f"seed {recorded!r}, not this daemon's {self.seed_fingerprint!r}"

    def _record_seed(self) -> None:
        """Write the fingerprint atomically and durably (before any page is written under it)."""
        final = self.path / _SEED_NAME
        try:
            if final.read_text().strip() == self.seed_fingerprint:
                return
        except (OSError, UnicodeDecodeError):
            pass
        tmp = self.path / f"{_SEED_NAME}{_TMP_SUFFIX}"
        with open(tmp, "w") as f:
            f.write(f"{self.seed_fingerprint}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dfd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _reconcile(
        self, refuse: bool = False
    ) -> tuple[dict[bytes, _Row] | None, int, list[_Row], list[_Row]]:
        """Match the snapshot against the files: (snapshot, dropped, trusted rows, recovered rows).
        `refuse`: delete every page file instead (counted in `dropped`) and ignore the snapshot."""
        if refuse:
            return None, self._delete_pages(), [], []
        snapshot = self._load_index()
        rows = snapshot or {}
        dropped = 0
        trusted_keys: set[bytes] = set()
        unlisted: list[tuple[float, str]] = []  # files the snapshot does not vouch for
        for sub in os.scandir(self.path):
            if sub.name.startswith(_INDEX_NAME) and sub.name.endswith(_TMP_SUFFIX):
                dropped += self._delete_file(sub.path)  # a snapshot write cut short
            if not (sub.is_dir(follow_symlinks=False) and _SUBDIR_RE.fullmatch(sub.name)):
                continue
            self._made_dirs.add(sub.name)
            for f in os.scandir(sub.path):
                if f.name.endswith(_TMP_SUFFIX):
                    dropped += self._delete_file(f.path)  # a write cut short by a crash
                elif _PAGE_RE.fullmatch(f.name) and f.name.startswith(sub.name):
                    key = bytes.fromhex(f.name[:32])
                    st = f.stat(follow_symlinks=False)
                    row = rows.get(key)
                    if row is not None and row[4] == _stored_size(st.st_size):
                        trusted_keys.add(key)
                    else:
                        unlisted.append((st.st_mtime, f.path))
                else:
                    log.warning("disk tier: ignoring unknown file %s", f.path)
        unlisted_keys = {bytes.fromhex(os.path.basename(p)[:32]) for _, p in unlisted}
        dropped += sum(1 for key in rows if key not in trusted_keys and key not in unlisted_keys)
        recovered: list[_Row] = []
        for _, file in sorted(unlisted):  # oldest first: recency order for the policy
            row = self._verify_header_file(file)
            if row is None:
                dropped += self._delete_file(file)
            else:
                recovered.append(row)
        trusted = [row for key, row in rows.items() if key in trusted_keys]  # snapshot = eviction order
        return snapshot, dropped, trusted, recovered

    def _delete_pages(self) -> int:
        """Delete every page file, temp file and the snapshot, quietly (the caller logs once);
        returns how many pages went."""

        def unlink(path: str | Path) -> int:
            try:
                os.unlink(path)
            except FileNotFoundError:
                return 0
            return 1

        deleted = 0
        unlink(self.path / _INDEX_NAME)
        for sub in os.scandir(self.path):
            if sub.name.startswith(_INDEX_NAME) and sub.name.endswith(_TMP_SUFFIX):
                unlink(sub.path)
            if not (sub.is_dir(follow_symlinks=False) and _SUBDIR_RE.fullmatch(sub.name)):
                continue
            self._made_dirs.add(sub.name)
            for f in os.scandir(sub.path):
                if f.name.endswith(_TMP_SUFFIX):
                    unlink(f.path)
                elif _PAGE_RE.fullmatch(f.name):
                    deleted += unlink(f.path)
        return deleted

    def close(self) -> None:
        """Write the index snapshot and release the directory. Idempotent."""
        if self._lock_fd is None:
            return
        try:
            self.flush_index()
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---------------------------------------------------------------- pages

    def put(
        self,
        key: bytes,
        parent: bytes | None,
        ns: bytes,
        data: bytes | memoryview,
        itemsize: int,
        groups: list[int] | None = None,
        durable: bool = False,
    ) -> bool:
        """Store a page. True if it is on disk when this returns (written now or already there);
        False if it cannot fit (larger than the tier, or space held by puts in flight) or the write
        failed. Evicts other pages, leaf-first in policy order, to stay within capacity (they stay
        evicted if the write then fails: this is a cache). `groups`: byte offsets where the page's
        layer groups end, to store them as separately readable ranges (`open_grouped`, for
        layer-pipelined promotion); None: one blob. `durable`: the caller syncs the page next
        (`sync_files` or `sync_filesystem`), so this waits for a write of the same key in flight
        instead of answering True while its file is still incomplete."""
        self._require_open()
        _check_key("key", key)
        _check_key("ns", ns)
        if parent is not None:
            _check_key("parent", parent)
        if itemsize < 1 or itemsize > 255:
            raise ValueError(f"itemsize must be 1..255, got {itemsize}")
        with self._cond:
            while key in self._deleting or (durable and key in self._writing):
                self._cond.wait()
            e = self._entries.get(key)
            if e is not None:
                self._policy.touch(e)
                return True
            if key in self._writing:
                return True  # the same bytes are being written by another thread
            self._writing.add(key)
        try:
            return self._write(key, parent, ns, data, itemsize, groups)
        finally:
            with self._cond:
                self._writing.discard(key)
                self._cond.notify_all()

    def _write(
        self,
        key: bytes,
        parent: bytes | None,
        ns: bytes,
        data: bytes | memoryview,
        itemsize: int,
        groups: list[int] | None = None,
    ) -> bool:
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        raw_len = view.nbytes
        if groups and len(groups) > 1 and groups[-1] == raw_len:
            codec, blob = encode_groups(view, itemsize, groups, self.level, self.min_ratio)
        else:
            codec, blob = encode(view, itemsize, self.level, self.min_ratio)
        header = _pack_header(codec, itemsize, key, parent, ns, raw_len, len(blob), checksum(view))
        size = _stored_size(HEADER_SIZE + len(blob))
        if size > self.capacity_bytes:
            return False
        quota = self.quota_of(ns) if self.quota_of is not None else None
        with self._lock:
            doomed: list[bytes] = []
            fits = True
            if quota is not None:  # a tenant over its quota makes room among its own pages
                limit, group = quota
                held = sum(self._ns_stored.get(d, 0) + self._ns_reserved.get(d, 0) for d in group)
                over = held + size - limit
                if over > 0:
                    freed, doomed = self._evict_locked(over, group)
                    fits = freed >= over
            need = self._stored + self._reserved + size - self.capacity_bytes
            if fits and need > 0:
                doomed += self._evict_locked(need)[1]
            fits = fits and self._stored + self._reserved + size <= self.capacity_bytes
            if fits:
                self._reserve_locked(ns, size)
        self._unlink(doomed)
        if not fits:
            return False
        final = self._page_path(key)
        tmp = f"{final}.{os.getpid()}.{threading.get_ident()}{_TMP_SUFFIX}"
        try:
            self._ensure_dir(key)
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(blob)
            os.replace(tmp, final)
        except OSError as exc:
            log.warning("disk tier: writing %s failed: %s", final, exc)
            with self._lock:
                self._reserve_locked(ns, -size)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False
        with self._lock:
            self._reserve_locked(ns, -size)
            self._admit_locked(key, parent, ns, raw_len, size)
            self._puts += 1
            self._changes += 1
        return True

    def sync_files(self, keys: list[bytes]) -> list[bool]:
        """fdatasync the files of these pages; per key whether its data is now on the device (False:
        the page is gone, or the sync failed). Their names need `sync_dirs` too."""
        out = []
        for key in keys:
            try:
                fd = os.open(self._page_path(key), os.O_RDONLY)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
                out.append(True)
            except FileNotFoundError:
                out.append(False)  # evicted meanwhile
            except OSError as exc:
                log.warning("disk tier: syncing page %s failed: %s", key.hex(), exc)
                out.append(False)
        return out

    def sync_dirs(self, keys: list[bytes]) -> None:
        """fsync the directories that hold the names of these pages' files (once each), and the tier's
        root when one of them was created since the last call. Raises OSError."""
        subs = {key[:1].hex() for key in keys}
        with self._lock:
            new, self._unsynced_dirs = self._unsynced_dirs, set()
        try:
            if new:
                _fsync_dir(self._root)
            for sub in sorted(subs):
                _fsync_dir(f"{self._root}{os.sep}{sub}")
        except OSError:
            with self._lock:
                self._unsynced_dirs |= new
            raise

    def sync_filesystem(self) -> None:
        """syncfs: every page file and name written so far on the tier's file system is on the
        device when this returns (and whatever else is dirty there: other writers pay into it).
        Raises OSError, also where the platform has no syncfs."""
        if _syncfs is None:
            raise OSError(errno.ENOSYS, "syncfs is not available on this platform")
        fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)
        with self._lock:
            self._unsynced_dirs.clear()

    def get_into(self, key: bytes, out: memoryview) -> None:
        """Read, verify and decompress the page into `out` (exactly `raw_bytes` long).

        Raises PageNotFound, or PageCorrupt after removing the page (file and index). On either
        error `out` may hold partial data and must not be published.
        """
        e = self._entry_to_read(key)
        raw_len, size, ns = e.raw_bytes, e.stored_bytes, e.ns
        dst = memoryview(out)
        if dst.ndim != 1 or dst.format != "B":
            dst = dst.cast("B")
        if dst.nbytes != raw_len:
            raise ValueError(f"output buffer holds {dst.nbytes} bytes, page {key.hex()} has {raw_len}")
        try:
            why = self._read_verified(key, ns, size, raw_len, dst)
        except FileNotFoundError:
            # evicted or removed since we looked it up; an entry that is still listed lost its file
            self._drop(key, e, corrupt=False)
            raise PageNotFound(f"page {key.hex()} is not on disk") from None
        except OSError as exc:
            why = f"read failed: {exc}"
        if why is not None:
            self._corrupt_page(key, e, why)
        with self._lock:
            self._gets += 1

    def open_grouped(self, key: bytes) -> GroupedPage:
        """Open the page for a read range by range (layer-pipelined promotion): only its header and
        groups table are read here; `GroupedPage.decode(i, slot)` reads, decodes and verifies range
        i, on any thread, so layer group 0 of a whole prefix is in DRAM after reading 1/8 of it. A
        page stored whole is one range. Raises PageNotFound, or PageCorrupt after removing the page."""
        e = self._entry_to_read(key)
        raw_len, size, ns = e.raw_bytes, e.stored_bytes, e.ns
        try:
            fd = os.open(self._page_path(key), os.O_RDONLY)
        except FileNotFoundError:
            self._drop(key, e, corrupt=False)
            raise PageNotFound(f"page {key.hex()} is not on disk") from None
        except OSError as exc:
            self._corrupt_page(key, e, f"open failed: {exc}")
        why: str | None = None
        ranges: list[GroupRange] | None = None
        try:
            h = _parse_header(os.pread(fd, HEADER_SIZE, 0))
            if h is None:
                why = "bad header"
            elif (
                h.key != key
                or h.ns != ns
                or h.raw_len != raw_len
                or _stored_size(HEADER_SIZE + h.payload_len) != size
            ):
                why = "header does not match the index"
            elif h.codec == Codec.GROUPS:
                head = os.pread(fd, 2, HEADER_SIZE)
                table = os.pread(fd, group_table_size(head), HEADER_SIZE) if len(head) == 2 else b""
                ranges = parse_group_table(table, raw_len, h.payload_len)
        except (OSError, ValueError, struct.error) as exc:
            why = f"unreadable groups table: {exc}"
        if why is not None:
            os.close(fd)
            self._corrupt_page(key, e, why)
        with self._lock:
            self._gets += 1
        return GroupedPage(self, key, e, h, fd, ranges)

    def _entry_to_read(self, key: bytes) -> DiskEntry:
        """The entry of a page about to be read, touched in the policy (PageNotFound if absent)."""
        self._require_open()
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                raise PageNotFound(f"page {key.hex()} is not on disk")
            self._policy.touch(e)
            return e

    def _corrupt_page(self, key: bytes, e: DiskEntry, why: str) -> NoReturn:
        self._drop(key, e, corrupt=True)
        log.warning("disk tier: dropped corrupt page %s: %s", key.hex(), why)
        raise PageCorrupt(f"page {key.hex()} on disk is corrupt ({why}); it was dropped")

    def _read_verified(self, key: bytes, ns: bytes, size: int, raw_len: int, out: memoryview) -> str | None:
        """Fill `out` from the page file; the reason it is bad, or None when it verified."""
        with open(self._page_path(key), "rb", buffering=0) as f:
            head_buf = bytearray(HEADER_SIZE)
            if _readinto_exact(f, memoryview(head_buf)) != HEADER_SIZE:
                return "truncated header"
            h = _parse_header(head_buf)
            if h is None:
                return "bad header"
            if (
                h.key != key
                or h.ns != ns
                or h.raw_len != raw_len
                or _stored_size(HEADER_SIZE + h.payload_len) != size
            ):
                return "header does not match the index"
            if h.codec == Codec.RAW:
                got = _readinto_exact(f, out)  # straight into the caller's slot
            else:
                payload = self._scratch.view(h.payload_len)
                got = _readinto_exact(f, payload)
            if got != h.payload_len or f.read(1):
                return "payload length differs from header"
        if h.codec != Codec.RAW:
            try:
                decode_into(h.codec, payload, out, h.itemsize)
            except Exception as exc:  # zstd raises its own error type on garbage
                return f"undecodable payload: {exc}"
        if checksum(out) != h.checksum:
            return "checksum mismatch"
        return None

    def entry(self, key: bytes) -> DiskEntry | None:
        """The page's metadata, without I/O. Read-only for callers."""
        with self._lock:
            return self._entries.get(key)

    def touch(self, key: bytes) -> None:
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                self._policy.touch(e)

    def remove(self, key: bytes) -> bool:
        """Delete the page. False if it was not on disk."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return False
            self._detach_locked(e)
        self._unlink([key])
        return True

    def evict_bytes(self, nbytes: int) -> int:
        """Evict leaf-first in policy order until at least `nbytes` of stored bytes are freed, or
        nothing evictable is left (then everything evictable is gone). Returns the bytes freed."""
        if nbytes <= 0:
            return 0
        with self._lock:
            freed, doomed = self._evict_locked(nbytes)
        self._unlink(doomed)
        return freed

    def set_policy(self, name: str) -> None:
        """Switch eviction policy live, carrying pages over coldest first."""
        with self._lock:
            self._policy = switch_policy(self._policy, name)

    def stats(self) -> DiskStats:
        with self._lock:
            return DiskStats(
                pages=len(self._entries),
                stored_bytes=self._stored,
                raw_bytes=self._raw,
                capacity_bytes=self.capacity_bytes,
                evictions=self._evictions,
                corrupt_dropped=self._corrupt,
                puts=self._puts,
                gets=self._gets,
                policy=self._policy.name,
                seed_refused=self._seed_refused,
            )

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._entries)

    def stored_by_ns(self) -> dict[bytes, int]:
        """Stored bytes per namespace digest (a copy; no I/O)."""
        with self._lock:
            return dict(self._ns_stored)

    def quota_evicted_by_ns(self) -> dict[bytes, int]:
        """Pages evicted to keep each namespace's tenant within its disk quota (a copy)."""
        with self._lock:
            return dict(self._quota_evicted)

    def keys_of(self, ns: bytes) -> list[bytes]:
        """Keys of the pages of namespace `ns` (its digest). The index is copied under the lock (a
        C-speed copy, ~10 ms per million pages) and filtered outside it, so puts and reads wait for
        the copy only. Call it off the event loop."""
        with self._lock:
            items = list(self._entries.items())
        return [k for k, e in items if e.ns == ns]

    def __len__(self) -> int:
        return len(self._entries)

    # ---------------------------------------------------------------- index snapshot

    def flush_index(self, force: bool = False) -> bool:
        """Write the index snapshot atomically if anything changed since the last one (or `force`).
        Returns whether it wrote. Cheap when clean, so a timer may call it often."""
        with self._flush_lock:
            with self._lock:
                if not (self._changes or force):
                    return False
                namespaces: dict[bytes, int] = {}
                pages = []
                for e in self._policy.coldest_first():
                    assert isinstance(e, DiskEntry)
                    ns_id = namespaces.setdefault(e.ns, len(namespaces))
                    pages.append((e.key, e.parent, ns_id, e.raw_bytes, e.stored_bytes))
                changes = self._changes
                self._changes = 0
            body = msgpack.packb({"format": _INDEX_FORMAT, "namespaces": list(namespaces), "pages": pages})
            final = self.path / _INDEX_NAME
            tmp = self.path / f"{_INDEX_NAME}.{os.getpid()}{_TMP_SUFFIX}"
            try:
                with open(tmp, "wb") as f:
                    f.write(_INDEX_HEAD.pack(_INDEX_MAGIC, checksum(body)))
                    f.write(body)
                os.replace(tmp, final)
            except OSError:
                with self._lock:
                    self._changes += changes
                raise
            return True

    def _load_index(self) -> dict[bytes, _Row] | None:
        """key -> (key, parent, ns, raw_bytes, stored_bytes), in snapshot order; None if absent or bad."""
        try:
            with open(self.path / _INDEX_NAME, "rb") as f:
                buf = f.read()
        except FileNotFoundError:
            return None
        try:
            magic, csum = _INDEX_HEAD.unpack_from(buf)
            body = memoryview(buf)[_INDEX_HEAD.size :]
            if magic != _INDEX_MAGIC or checksum(body) != csum:
                raise ValueError("bad magic or checksum")
            doc = msgpack.unpackb(body)
            if doc["format"] != _INDEX_FORMAT:
                raise ValueError(f"index format {doc['format']}")
            namespaces = [_check_key("ns", ns) for ns in doc["namespaces"]]
            rows: dict[bytes, _Row] = {}
            for key, parent, ns_id, raw_bytes, stored_bytes in doc["pages"]:
                _check_key("key", key)
                if parent is not None:
                    _check_key("parent", parent)
                if not (isinstance(raw_bytes, int) and isinstance(stored_bytes, int)):
                    raise ValueError("page sizes must be integers")
                rows[key] = (key, parent, namespaces[ns_id], raw_bytes, _stored_size(stored_bytes))
            return rows
        except Exception as exc:  # any malformed snapshot means: rebuild from the page headers
            log.warning("disk tier: ignoring index snapshot %s: %s", self.path / _INDEX_NAME, exc)
            return None

    def _verify_header_file(self, file: str) -> _Row | None:
        try:
            with open(file, "rb") as f:
                buf = f.read(HEADER_SIZE)
                size = os.fstat(f.fileno()).st_size
        except OSError:
            return None
        h = _parse_header(buf)
        if h is None or h.key.hex() + ".pkv" != os.path.basename(file) or HEADER_SIZE + h.payload_len != size:
            return None
        return (h.key, h.parent, h.ns, h.raw_len, _stored_size(size))

    # ---------------------------------------------------------------- internals (lock held: *_locked)

    def _admit_locked(
        self, key: bytes, parent: bytes | None, ns: bytes, raw_bytes: int, stored_bytes: int
    ) -> None:
        if key in self._entries:
            return
        if parent is not None:
            p = self._entries.get(parent)
            if p is not None:
                parent = p.key  # share the parent's bytes object
                p.children += 1
            else:
                self._waiting[parent] = self._waiting.get(parent, 0) + 1
        if len(self._interned) < _MAX_INTERNED:
            ns = self._interned.setdefault(ns, ns)  # type: ignore[assignment]
            raw_bytes = self._interned.setdefault(raw_bytes, raw_bytes)  # type: ignore[assignment]
        if len(self._sizes) < _MAX_STORED_SIZES:
            stored_bytes = self._sizes.setdefault(stored_bytes, stored_bytes)
        e = DiskEntry(key, parent, ns, raw_bytes, stored_bytes)
        e.children = self._waiting.pop(key, 0)
        self._entries[key] = e
        self._policy.insert(e)
        self._stored += stored_bytes
        self._raw += raw_bytes
        self._ns_stored[ns] = self._ns_stored.get(ns, 0) + stored_bytes

    def _reserve_locked(self, ns: bytes, size: int) -> None:
        """Space held (size > 0) or let go (< 0) by a put in flight."""
        self._reserved += size
        left = self._ns_reserved.get(ns, 0) + size
        if left > 0:
            self._ns_reserved[ns] = left
        else:
            self._ns_reserved.pop(ns, None)

    def _detach_locked(self, e: DiskEntry) -> None:
        """Take `e` out of index, policy and counts; its key stays in `_deleting` until unlinked."""
        del self._entries[e.key]
        self._policy.remove(e)
        self._stored -= e.stored_bytes
        self._raw -= e.raw_bytes
        left = self._ns_stored.get(e.ns, 0) - e.stored_bytes
        if left > 0:
            self._ns_stored[e.ns] = left
        else:
            self._ns_stored.pop(e.ns, None)
        if e.parent is not None:
            p = self._entries.get(e.parent)
            if p is not None:
                p.children -= 1
            else:
                left = self._waiting.get(e.parent, 0) - 1
                if left > 0:
                    self._waiting[e.parent] = left
                else:
                    self._waiting.pop(e.parent, None)
        if e.children:
            self._waiting[e.key] = e.children
        self._deleting.add(e.key)
        self._changes += 1

    def _evict_locked(self, need: int, group: frozenset[bytes] | None = None) -> tuple[int, list[bytes]]:
        """Evict leaf-first in policy order until `need` bytes are freed; with `group`, only pages
        of those namespaces (a tenant over its quota)."""
        freed = 0
        doomed: list[bytes] = []
        if group is None:
            evictable, pool = _is_leaf, len(self._entries)
        else:
            evictable = functools.partial(_is_leaf_in, group)
            pool = sum(1 for d in group if self._ns_stored.get(d))
        while freed < need and pool:
            avg = max(1, self._stored // len(self._entries))
            k = max(1, min(len(self._entries), -(-(need - freed) // avg)))
            got = self._policy.victims(k, evictable)
            if not got and k > 1:  # fewer leaves than the estimate: one at a time frees parents
                got = self._policy.victims(1, evictable)
            if not got:
                break
            for node in got:
                assert isinstance(node, DiskEntry)
                self._detach_locked(node)
                freed += node.stored_bytes
                doomed.append(node.key)
                if group is not None:
                    self._quota_evicted[node.ns] = self._quota_evicted.get(node.ns, 0) + 1
            self._evictions += len(got)
            pool = len(self._entries)
        return freed, doomed

    def _drop(self, key: bytes, e: DiskEntry, *, corrupt: bool) -> None:
        with self._lock:
            if self._entries.get(key) is not e:
                return  # already gone, or replaced by a newer put: not ours to delete
            self._detach_locked(e)
            if corrupt:
                self._corrupt += 1
        self._unlink([key])

    def _unlink(self, keys: list[bytes]) -> None:
        if not keys:
            return
        for key in keys:
            try:
                os.unlink(self._page_path(key))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("disk tier: cannot delete page %s: %s", key.hex(), exc)
        with self._cond:
            self._deleting.difference_update(keys)
            self._cond.notify_all()
        on_removed = self.on_removed
        if on_removed is not None:
            on_removed(keys)

    def _page_path(self, key: bytes) -> str:
        # plain strings: pathlib would intern every page file name, growing a table that never shrinks
        h = key.hex()
        return f"{self._root}{os.sep}{h[:2]}{os.sep}{h}.pkv"

    def _ensure_dir(self, key: bytes) -> None:
        sub = key[:1].hex()
        if sub not in self._made_dirs:
            os.makedirs(f"{self._root}{os.sep}{sub}", exist_ok=True)
            with self._lock:
                self._made_dirs.add(sub)
                self._unsynced_dirs.add(sub)  # its name in the root is not durable yet

    @staticmethod
    def _delete_file(path: str | Path) -> int:
        try:
            os.unlink(path)
        except FileNotFoundError:
            return 0
        log.warning("disk tier: deleted invalid or leftover file %s", path)
        return 1

    def _require_open(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError(f"disk tier {self.path} is not open")


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_leaf(node: PolicyNode) -> bool:
    assert isinstance(node, DiskEntry)  # the disk policy holds only entries
    return node.children == 0


def _is_leaf_in(group: Container[bytes], node: PolicyNode) -> bool:
    """A leaf of one of the namespaces in `group`."""
    assert isinstance(node, DiskEntry)
    return node.children == 0 and node.ns in group

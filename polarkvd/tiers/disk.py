"""L4: the disk tier. Compressed pages in a directory that survives restarts and never serves bad bytes.

Owns the pages on disk: writing, reading and deleting their files, opening the directory, and keeping
within `capacity_bytes`. It does not decide which pages come here (the manager demotes into it) and
does not check namespaces against callers (it stores each page's `ns` so the daemon can). What the
files hold is `disk_format.py`'s; which pages are listed, their eviction order and byte counts are
`disk_index.py`'s; the scan at open is `disk_scan.py`'s.

Writes: a page is written to a temp name in its final directory and `os.replace`d, so a killed
daemon never leaves a half-visible page, only temp files, which `open()` deletes. A page evicted
from DRAM is not fsynced: this is a cache, and after a power loss a torn or zero-filled page fails
its checksum on read and is dropped. Write-through makes pages durable after their puts:
`sync_files` fdatasyncs the page files and `sync_dirs` fsyncs the directories holding their names,
or `sync_filesystem` does both for every page at once (syncfs). `open()` finds pages by scanning the
files, so data, name and directory are all a page needs to survive a crash or a power loss; a page
whose sync did not finish was never acknowledged, and if the power loss tore it, it fails its
checksum like any other. Pages the manager demotes are stored in their layer groups (codec GROUPS:
each group compressed on its own, with its own checksum), so `open_grouped` can read, decode and
verify group 0 of a whole prefix before group 1 (layer-pipelined loads); `get_into` reads any page
whole.

Open: the index snapshot (written atomically by `flush_index()`, from `close()` and from the
daemon's timer) is a hint reconciled with the files: entries whose file is missing or has another
size (in 512-byte units: a file cut by a few bytes is caught by its first read instead) are
dropped, files it does not list are adopted after their header verifies (file mtime orders them),
files with a bad header and temp files are deleted. Only headers are read at open, and only for
files the snapshot does not vouch for, so a TB-scale tier opens in a directory scan; payload
checksums are verified on every read instead. A page that fails is removed (file and index) and
reported as `PageCorrupt`, so the caller recomputes.

Concurrency: one lock guards the index; compression, checksums and file I/O run outside it, so pool
threads overlap and the event loop's `entry()`/`stats()` never wait on disk. Keys with a file being
written or deleted are tracked so that an eviction's unlink can never remove a re-put page's new
file. Stored bytes plus space reserved by puts in flight never exceed `capacity_bytes`. An exclusive
`flock` on `<path>/lock` keeps a second process (or a second `DiskTier` in this one) out of the
directory; the kernel drops it when its holder dies. A root removed under the tier (`rm -rf`) is made
again and locked again at the next write or index flush, or left alone when another process locked
it first (`_reclaim_root`).

Seed: `<path>/seed-fingerprint` names the page-key seed (`keys.seed_fingerprint`) the pages were
keyed with, written before the first page. A tier opened with another seed, or over pages with no
record, deletes those pages at open (counted in `refused`, one log line): keys of another seed are
never computed again, and an old page must never be served under a new seed.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from polarkvd.errors import PageCorrupt, PageNotFound, ResourceError
from polarkvd.policy import PolicyNode
from polarkvd.tiers.codec import (
    Codec,
    GroupRange,
    Scratch,
    checksum,
    encode,
    encode_groups,
    group_table_size,
    parse_group_table,
    stock_decode_buffers,
)
from polarkvd.tiers.disk_failures import WriteFailures
from polarkvd.tiers.disk_format import (
    HEADER_SIZE,
    LOCK_NAME,
    SEED_RE,
    TMP_SUFFIX,
    check_key,
    fsync_dir,
    pack_header,
    page_path,
    parse_header,
    read_page,
    record_seed,
    recorded_seed,
    stored_size,
    syncfs,
    write_snapshot,
)
from polarkvd.tiers.disk_grouped import GroupedPage
from polarkvd.tiers.disk_index import DiskEntry, DiskIndex, Quota
from polarkvd.tiers.disk_scan import reconcile

__all__ = ["DiskEntry", "DiskOpenReport", "DiskStats", "DiskTier", "GroupedPage", "HEADER_SIZE"]

log = logging.getLogger(__name__)


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
    write_errors: int = 0  # page writes that failed (ENOSPC, EIO, ...): disk_failures.py


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
        readers: int = 2,
    ) -> None:
        """`seed_fingerprint`: the page-key seed's (keys.seed_fingerprint); pages recorded under
        another are refused at open. None: no record, no check (tools and tests of bytes only).
        `readers`: threads reading pages (the daemon's I/O threads), read buffers made ahead for."""
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.path = Path(path)
        self._root = os.fspath(self.path)
        self.capacity_bytes = capacity_bytes
        self.level = level
        self.min_ratio = min_ratio  # pages that compress less are stored raw (disk.min_compression_ratio)
        if seed_fingerprint is not None and not SEED_RE.fullmatch(seed_fingerprint):
            raise ValueError(f"seed_fingerprint must be 16 hex characters, got {seed_fingerprint!r}")
        self.seed_fingerprint = seed_fingerprint
        self._seed_refused = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._index = DiskIndex(policy)  # under _lock
        self._writing: set[bytes] = set()  # keys whose file a put is writing
        #: called with the keys of pages that left the tier (evicted, removed, dropped as corrupt), on
        #: whatever thread removed them (set by the manager: their lookup-table entries go, and the
        #: cluster withdraws their announcements)
        self.on_removed: Callable[[list[bytes]], None] | None = None
        #: set by the manager (manager/quotas.py): for a page's namespace, (limit, the namespaces sharing
        #: it: its tenant's) or None; a put over the limit evicts pages of those namespaces only
        self.quota_of: Callable[[bytes], Quota | None] | None = None
        self._puts = 0
        self._gets = 0
        self._flush_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._made_dirs: set[str] = set()
        self._root_lock = threading.Lock()  # one thread at a time recreates a removed root
        self._lost = False  # the root was removed and another process holds it now: hands off
        self.write_failures = WriteFailures()
        self._unsynced_dirs: set[str] = set()  # subdirectories created since the root was last fsynced
        self._scratch = Scratch()
        self.readers = readers

    # ---------------------------------------------------------------- lifecycle

    def open(self) -> DiskOpenReport:
        """Create or reopen the directory, reconcile snapshot and files, evict down to capacity."""
        if self._lock_fd is not None:
            raise RuntimeError(f"disk tier {self.path} is already open")
        started = time.perf_counter()
        self.path.mkdir(parents=True, exist_ok=True)
        try:  # the root's own name, for durable puts (sync_dirs covers what is below it)
            fsync_dir(os.fspath(self.path.parent))
        except OSError as exc:
            log.warning("disk tier: cannot fsync %s: %s", self.path.parent, exc)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ResourceError(f"disk tier directory {self.path} is in use by another DiskTier") from None
        self._lock_fd = fd
        with self._lock:  # reopening after close(): start from the files, not stale state
            self._index.clear()
        try:
            refuse = self._seed_mismatch()
            snapshot, dropped, trusted, recovered = reconcile(self.path, self._made_dirs, refuse is not None)
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
                record_seed(
                    self.path, self.seed_fingerprint
                )  # after the refusal: a crash midway refuses the rest next time
        except BaseException:
            self._lock_fd = None
            os.close(fd)
            raise
        with self._lock:
            self._index.admit_rows(trusted + recovered)
            self._index.changes = 1 if (recovered or dropped or snapshot is None) else 0
            over = self._index.stored - self.capacity_bytes
        evicted = 0
        if over > 0:
            before = self._index.evictions
            self.evict_bytes(over)
            evicted = self._index.evictions - before
        if self._index.changes:
            self.flush_index()
        with self._lock:  # read buffers for the largest page here, not in its first promotion
            largest = max((e.stored_bytes for e in self._index.entries.values()), default=0)
        self._scratch.stock(largest, self.readers)
        stock_decode_buffers(largest, self.readers)
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
        recorded = recorded_seed(self.path)
        if recorded == self.seed_fingerprint:
            return None
        if recorded is None:
            return "no recorded seed (an older polarkvd, or a lost seed-fingerprint file)"
        return f"seed {recorded!r}, not this daemon's {self.seed_fingerprint!r}"

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
        depth: int = 0,
    ) -> bool:
        """Store a page. True if it is on disk when this returns (written now or already there);
        False if it cannot fit (larger than the tier, or space held by puts in flight) or the write
        failed. Evicts other pages, leaf-first in policy order, to stay within capacity (they stay
        evicted if the write then fails: this is a cache). `groups`: byte offsets where the page's
        layer groups end, to store them as separately readable ranges (`open_grouped`, for
        layer-pipelined promotion); None: one blob. `durable`: the caller syncs the page next
        (`sync_files` or `sync_filesystem`), so this waits for a write of the same key in flight
        instead of answering True while its file is still incomplete. `depth`: the page's position
        in its chain as a depth code (index.depth_of), for the `cost` policy."""
        self._require_open()
        check_key("key", key)
        if not 0 <= depth <= 255:
            raise ValueError(f"depth must be a depth code 0..255, got {depth}")
        check_key("ns", ns)
        if parent is not None:
            check_key("parent", parent)
        if itemsize < 1 or itemsize > 255:
            raise ValueError(f"itemsize must be 1..255, got {itemsize}")
        with self._cond:
            while key in self._index.deleting or (durable and key in self._writing):
                self._cond.wait()
            e = self._index.entries.get(key)
            if e is not None:
                self._index.policy.touch(e)
                return True
            if key in self._writing:
                return True  # the same bytes are being written by another thread
            self._writing.add(key)
        try:
            return self._write(key, parent, ns, data, itemsize, groups, depth)
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
        depth: int = 0,
    ) -> bool:
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        raw_len = view.nbytes
        if groups and len(groups) > 1 and groups[-1] == raw_len:
            codec, blob = encode_groups(view, itemsize, groups, self.level, self.min_ratio)
        else:
            codec, blob = encode(view, itemsize, self.level, self.min_ratio)
        header = pack_header(codec, itemsize, key, parent, ns, raw_len, len(blob), checksum(view))
        if codec != Codec.RAW:  # a read decodes it through buffers: made now, not in a promotion
            self._scratch.stock(len(blob), self.readers)
            stock_decode_buffers(raw_len, self.readers)
        size = stored_size(HEADER_SIZE + len(blob))
        if size > self.capacity_bytes:
            return False
        quota = self.quota_of(ns) if self.quota_of is not None else None
        with self._lock:
            fits, doomed = self._index.make_room(ns, size, self.capacity_bytes, quota)
        self._unlink(doomed)
        if not fits:
            return False
        final = self._page_path(key)
        error = self._write_file(key, final, header, blob)
        if isinstance(error, FileNotFoundError) and self._reclaim_root():
            error = self._write_file(key, final, header, blob)  # its directory was removed: once more
        if error is not None:
            self.write_failures.failed(final, error)
            with self._lock:
                self._index.reserve(ns, -size)
            return False
        self.write_failures.succeeded()
        with self._lock:
            self._index.reserve(ns, -size)
            self._index.admit(key, parent, ns, raw_len, size, depth)
            self._puts += 1
            self._index.changes += 1
        return True

    def _write_file(self, key: bytes, final: str, header: bytes, blob: bytes) -> OSError | None:
        """Write the page's file under a temp name and rename it into place; the error, if any."""
        if self._lost:
            return OSError(errno.EACCES, "the directory was removed and another process holds it now")
        tmp = f"{final}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
        try:
            self._ensure_dir(key)
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(blob)
            os.replace(tmp, final)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return exc
        return None

    def _reclaim_root(self) -> bool:
        """A write found its directory gone (`rm -rf` under the daemon). Forget the directories
        made; if the root went too (its lock file with it), recreate it and lock it again, or, when
        another process got its lock first, write nothing more there (`_lost`): two daemons in one
        directory would delete each other's pages. The pages listed are gone either way and are
        forgotten. True when a write may be tried again."""
        with self._root_lock:
            with self._lock:
                self._made_dirs.clear()
            if self._lost or self._lock_fd is None:
                return False
            if self._holds_root():
                return True  # only a subdirectory went, or another thread took the root back
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                log.error(
                    "disk tier %s: the directory was removed and cannot be made again: %s", self.path, exc
                )
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                self._lost = True
            else:
                os.close(self._lock_fd)
                self._lock_fd = fd
            with self._lock:
                gone = list(self._index.entries)
                self._index.clear()
                self._index.changes += 1
                self._unsynced_dirs.clear()
        if self._lost:
            log.error(
                "disk tier %s: the directory was removed under the daemon and another process holds "
                "it now; no page is written or deleted there until this daemon restarts", self.path,
            )  # fmt: skip
        else:
            if self.seed_fingerprint is not None:
                record_seed(self.path, self.seed_fingerprint)  # before the first page, as at open
            log.error(
                "disk tier %s: the directory was removed under the daemon: made again and locked "
                "again; its %d pages are gone", self.path, len(gone),
            )  # fmt: skip
        on_removed = self.on_removed
        if gone and on_removed is not None:
            on_removed(gone)
        return not self._lost

    def _holds_root(self) -> bool:
        """Whether the lock file in the root is the one this tier holds."""
        assert self._lock_fd is not None
        try:
            st = os.stat(self.path / LOCK_NAME)
        except OSError:
            return False
        held = os.fstat(self._lock_fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)

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
                fsync_dir(self._root)
            for sub in sorted(subs):
                fsync_dir(f"{self._root}{os.sep}{sub}")
        except OSError:
            with self._lock:
                self._unsynced_dirs |= new
            raise

    def sync_filesystem(self) -> None:
        """syncfs: every page file and name written so far on the tier's file system is on the
        device when this returns (and whatever else is dirty there: other writers pay into it).
        Raises OSError, also where the platform has no syncfs."""
        syncfs(self._root)
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
            why = read_page(self._page_path(key), key, ns, size, raw_len, dst, self._scratch)
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
            h = parse_header(os.pread(fd, HEADER_SIZE, 0))
            if h is None:
                why = "bad header"
            elif h.mismatch(key, ns, raw_len, size):
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
        assert h is not None  # a bad header set `why`
        with self._lock:
            self._gets += 1
        return GroupedPage(self, key, e, h, fd, ranges)

    def _entry_to_read(self, key: bytes) -> DiskEntry:
        """The entry of a page about to be read, touched in the policy (PageNotFound if absent)."""
        self._require_open()
        with self._lock:
            e = self._index.entries.get(key)
            if e is None:
                raise PageNotFound(f"page {key.hex()} is not on disk")
            self._index.policy.touch(e)
            return e

    def _corrupt_page(self, key: bytes, e: DiskEntry, why: str) -> NoReturn:
        self._drop(key, e, corrupt=True)
        log.warning("disk tier: dropped corrupt page %s: %s", key.hex(), why)
        raise PageCorrupt(f"page {key.hex()} on disk is corrupt ({why}); it was dropped")

    def entry(self, key: bytes) -> DiskEntry | None:
        """The page's metadata, without I/O. Read-only for callers."""
        with self._lock:
            return self._index.entries.get(key)

    def children_of(self, key: bytes) -> int:
        """Pages on disk whose parent is `key` (whether or not it is on disk itself)."""
        with self._lock:
            e = self._index.entries.get(key)
            return e.children if e is not None else self._index.waiting.get(key, 0)

    def touch(self, key: bytes) -> None:
        with self._lock:
            e = self._index.entries.get(key)
            if e is not None:
                self._index.policy.touch(e)

    def remove(self, key: bytes) -> bool:
        """Delete the page. False if it was not on disk."""
        with self._lock:
            e = self._index.entries.get(key)
            if e is None:
                return False
            self._index.detach(e)
        self._unlink([key])
        return True

    def evict_bytes(self, nbytes: int) -> int:
        """Evict leaf-first in policy order until at least `nbytes` of stored bytes are freed, or
        nothing evictable is left (then everything evictable is gone). Returns the bytes freed."""
        if nbytes <= 0:
            return 0
        with self._lock:
            freed, doomed = self._index.evict(nbytes)
        self._unlink(doomed)
        return freed

    def has_room(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit beside what is stored and being written, evicting nothing."""
        with self._lock:
            index = self._index
            return index.stored + index.reserved + nbytes <= self.capacity_bytes

    @property
    def evictions(self) -> int:
        """Pages evicted so far: the next victim can only have changed when this has."""
        return self._index.evictions

    def next_victim(self, evictable: Callable[[PolicyNode], bool]) -> PolicyNode | None:
        """The page the policy would evict next among those `evictable` allows, evicting nothing."""
        with self._lock:
            return self._index.policy.next_victim(evictable)

    def set_valuer(self, valuer: Callable[[PolicyNode], float] | None) -> None:
        """What a page is worth keeping, per byte, for the `cost` policy (the manager's)."""
        with self._lock:
            self._index.set_valuer(valuer)

    def set_policy(self, name: str) -> None:
        """Switch eviction policy live, carrying pages over coldest first."""
        with self._lock:
            self._index.set_policy(name)

    def stats(self) -> DiskStats:
        with self._lock:
            return DiskStats(
                pages=len(self._index.entries),
                stored_bytes=self._index.stored,
                raw_bytes=self._index.raw,
                capacity_bytes=self.capacity_bytes,
                evictions=self._index.evictions,
                corrupt_dropped=self._index.corrupt,
                puts=self._puts,
                gets=self._gets,
                policy=self._index.policy.name,
                seed_refused=self._seed_refused,
                write_errors=self.write_failures.total,
            )

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._index.entries)

    def stored_by_ns(self) -> dict[bytes, int]:
        """Stored bytes per namespace digest (a copy; no I/O)."""
        with self._lock:
            return dict(self._index.ns_stored)

    def quota_evicted_by_ns(self) -> dict[bytes, int]:
        """Pages evicted to keep each namespace's tenant within its disk quota (a copy)."""
        with self._lock:
            return dict(self._index.quota_evicted)

    def keys_of(self, ns: bytes) -> list[bytes]:
        """Keys of the pages of namespace `ns` (its digest). The index is copied under the lock (a
        C-speed copy, ~10 ms per million pages) and filtered outside it, so puts and reads wait for
        the copy only. Call it off the event loop."""
        with self._lock:
            items = list(self._index.entries.items())
        return [k for k, e in items if e.ns == ns]

    def __len__(self) -> int:
        return len(self._index.entries)

    # ---------------------------------------------------------------- index snapshot

    def flush_index(self, force: bool = False) -> bool:
        """Write the index snapshot atomically if anything changed since the last one (or `force`).
        Returns whether it wrote. Cheap when clean, so a timer may call it often."""
        with self._flush_lock:
            if not self._lost and self._lock_fd is not None and not self._holds_root():
                self._reclaim_root()  # removed under us: on the timer, not only at the next write
            with self._lock:
                if self._lost or not (self._index.changes or force):
                    return False
                namespaces, pages = self._index.snapshot_rows()
                changes = self._index.changes
                self._index.changes = 0
            try:
                try:
                    write_snapshot(self.path, namespaces, pages)
                except FileNotFoundError:
                    if not self._reclaim_root():
                        raise
                    with self._lock:  # the pages that were listed went with the directory
                        namespaces, pages = self._index.snapshot_rows()
                    write_snapshot(self.path, namespaces, pages)
            except OSError:
                with self._lock:
                    self._index.changes += changes
                raise
            return True

    # ---------------------------------------------------------------- internals

    def _drop(self, key: bytes, e: DiskEntry, *, corrupt: bool) -> None:
        with self._lock:
            if self._index.entries.get(key) is not e:
                return  # already gone, or replaced by a newer put: not ours to delete
            self._index.detach(e)
            if corrupt:
                self._index.corrupt += 1
        self._unlink([key])

    def _unlink(self, keys: list[bytes]) -> None:
        if not keys:
            return
        for key in keys:
            if self._lost:
                break  # those files went with the directory; the names there now are another's
            try:
                os.unlink(self._page_path(key))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("disk tier: cannot delete page %s: %s", key.hex(), exc)
        with self._cond:
            self._index.deleting.difference_update(keys)
            self._cond.notify_all()
        on_removed = self.on_removed
        if on_removed is not None:
            on_removed(keys)

    def _page_path(self, key: bytes) -> str:
        return page_path(self._root, key)

    def _ensure_dir(self, key: bytes) -> None:
        sub = key[:1].hex()
        if sub not in self._made_dirs:
            try:  # not makedirs: a root removed under us must fail (ENOENT), not come back unlocked
                os.mkdir(f"{self._root}{os.sep}{sub}")
            except FileExistsError:
                pass
            with self._lock:
                self._made_dirs.add(sub)
                self._unsynced_dirs.add(sub)  # its name in the root is not durable yet

    def _require_open(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError(f"disk tier {self.path} is not open")

"""The shared-memory arena file: created and owned by the daemon, mapped by every attached engine.

This module owns the file and its mapping, nothing about what lives in it (see tiers/dram.py). The
arena is a plain file in a tmpfs (`dram.shm_dir`, /dev/shm by default), so engines map it by path
with `mmap` and copy pages in and out without a system call per page.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
from pathlib import Path

log = logging.getLogger(__name__)


class Arena:
    """The daemon's side: creates, maps and finally unlinks the arena file."""

    def __init__(self, path: Path, size: int, *, mode: int = 0o660, lock: bool = False) -> None:
        self.path = path
        self.size = size
        if path.exists():
            # A previous daemon died without cleaning up; the caller has checked it is not running.
            log.info("removing stale arena %s", path)
            path.unlink()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            os.ftruncate(fd, size)
            try:
                # Reserve the tmpfs space now: a full /dev/shm then fails here, with a message, instead
                # of killing an engine with SIGBUS on its first write into a hole later.
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                os.close(fd)
                fd = -1
                path.unlink()
                raise OSError(
                    e.errno, f"cannot reserve {size} bytes for the arena in {path.parent}: {e.strerror}"
                ) from None
            self.mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:  # e.g. ftruncate past RLIMIT_FSIZE: no empty arena left in the tmpfs
            path.unlink(missing_ok=True)
            raise
        finally:
            if fd >= 0:
                os.close(fd)
        self.view = memoryview(self.mmap)
        if lock:
            _mlock(self.mmap, size)

    def close(self) -> None:
        self.view.release()
        try:
            self.mmap.close()
        except BufferError:  # a view is still exported somewhere; the unlink below still frees it at exit
            pass
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def map_arena(path: str | Path, size: int, *, populate: bool = True) -> mmap.mmap:
    """An engine's side: map the daemon's arena read-write.

    `populate` pre-faults the page tables (MAP_POPULATE), so the first copy into each page does not
    pay a fault per 4 KiB: copies run at memcpy speed from the first page on.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size < size:
            raise OSError(f"arena {path} is smaller than the {size} bytes the daemon announced")
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        return mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def _mlock(buf: mmap.mmap, size: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(size)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mlock of the {size}-byte arena failed: {os.strerror(err)} (raise LimitMEMLOCK)")

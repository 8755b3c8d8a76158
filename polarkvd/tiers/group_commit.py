"""Group commit: durable disk writes for write-through, batched so that concurrent commits share syncs.

Owns batching and the order of a durable write, nothing else. Pages submitted within `window` seconds
of a batch's first page (and while the batch before is still being synced) are written in parallel,
then synced together; only then do their futures resolve: True when the page is durable, False when
it could not be (no room, a write or sync error, evicted before its sync). `disk.write_through_sync`
picks the sync: "files" fdatasyncs each page file (in parallel) and fsyncs each directory the batch
touched once; "filesystem" is one syncfs per batch, which also flushes whatever else is dirty on
that file system. Which pages are written is the manager's business. Runs on the event loop; the
disk work runs in a thread pool of its own, started at the first write, so threads waiting for
syncs never hold up the I/O pool's reads and demotions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

from polarkvd.tiers.disk import DiskTier

__all__ = ["GroupCommit", "GroupCommitStats"]

log = logging.getLogger(__name__)

#: A batch this large is written at once instead of waiting for the end of its window.
MAX_BATCH_BYTES = 64 << 20
#: Batches written and synced at a time. Commits that arrive meanwhile form the next batch, so a
#: slow device gets larger batches (fewer syncs per page) and an idle one no wait at all.
MAX_IN_FLIGHT = 1


@dataclasses.dataclass
class GroupCommitStats:
    batches: int = 0  # batches written and synced
    pages: int = 0  # pages submitted
    failed_pages: int = 0  # pages not made durable: no room, a write or sync error, evicted at once
    syncs: int = 0  # sync calls made: fdatasync and directory fsync, or syncfs


@dataclasses.dataclass
class _Write:
    key: bytes
    parent: bytes | None
    ns: bytes
    data: bytes
    itemsize: int
    groups: list[int] | None
    future: asyncio.Future[bool]
    depth: int = 0


class GroupCommit:
    """Durable page writes, batched per window. Event loop only (see the module docstring).

    `window`: seconds a batch stays open after its first page (read at each batch: it may change
    while the daemon runs); 0 still batches the pages submitted in the same loop iteration."""

    def __init__(
        self,
        disk: DiskTier,
        threads: int,
        window: Callable[[], float],
        sync: Callable[[], str] = lambda: "files",
        max_batch_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        self.disk = disk
        self.threads = threads
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.window = window
        self.sync = sync  # "files" or "filesystem", read at each batch
        self.max_batch_bytes = max_batch_bytes
        self.stats = GroupCommitStats()
        self._batch: list[_Write] = []
        self._batch_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Future[None]] = set()

    def submit(
        self,
        key: bytes,
        parent: bytes | None,
        ns: bytes,
        data: bytes,
        itemsize: int,
        groups: list[int] | None = None,
        depth: int = 0,
    ) -> asyncio.Future[bool]:
        """A future that is True once the page is on disk and synced, False if it cannot be. It is
        cancelled when the I/O pool shuts down under the write (the daemon is stopping)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._batch.append(_Write(key, parent, ns, data, itemsize, groups, fut, depth))
        self._batch_bytes += len(data)
        self.stats.pages += 1
        if self._batch_bytes >= self.max_batch_bytes:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(max(0.0, self.window()), self.flush)
        return fut

    def flush(self, force: bool = False) -> None:
        """Start writing the open batch now; while MAX_IN_FLIGHT batches are being written (unless
        `force`), when one of them is done, with whatever joined it meanwhile."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._batch:
            return
        if not force and len(self._tasks) >= MAX_IN_FLIGHT:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        task = asyncio.ensure_future(self._commit(batch))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[None]) -> None:
        self._tasks.discard(task)
        if self._batch and self._timer is None:
            self.flush()

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self.threads, thread_name_prefix="polarkv-sync"
            )
        return self._executor

    async def _commit(self, batch: list[_Write]) -> None:
        loop = asyncio.get_running_loop()
        pool = self._pool()
        try:
            puts = [
                loop.run_in_executor(
                    pool,
                    functools.partial(
                        self.disk.put,
                        w.key,
                        w.parent,
                        w.ns,
                        w.data,
                        w.itemsize,
                        w.groups,
                        durable=True,
                        depth=w.depth,
                    ),
                )
                for w in batch
            ]
            results: list[Any] = await asyncio.gather(*puts, return_exceptions=True)
            written = [w.key for w, r in zip(batch, results) if r is True]
            synced = await self._sync(written) if written else set()
            self.stats.batches += 1
            for w, r in zip(batch, results):
                if w.future.done():
                    continue
                if isinstance(r, asyncio.CancelledError):
                    w.future.cancel()
                elif isinstance(r, BaseException):
                    self.stats.failed_pages += 1
                    w.future.set_exception(r)
                else:
                    durable = w.key in synced
                    self.stats.failed_pages += not durable
                    w.future.set_result(durable)
        finally:  # cancelled (the I/O pool or the loop is going away): nobody waits forever
            for w in batch:
                if not w.future.done():
                    w.future.cancel()

    async def _sync(self, keys: list[bytes]) -> set[bytes]:
        """Sync the pages just written; the keys that are durable (and still on disk)."""
        loop = asyncio.get_running_loop()
        pool = self._pool()
        try:
            if self.sync() == "filesystem":
                await loop.run_in_executor(pool, self.disk.sync_filesystem)
                self.stats.syncs += 1
                done = keys
            else:
                n = -(-len(keys) // self.threads)  # one share per thread: the fdatasyncs overlap
                shares = [keys[i : i + n] for i in range(0, len(keys), n)]
                parts = await asyncio.gather(
                    *(loop.run_in_executor(pool, self.disk.sync_files, share) for share in shares)
                )
                done = [k for share, ok in zip(shares, parts) for k, good in zip(share, ok) if good]
                await loop.run_in_executor(pool, self.disk.sync_dirs, done)
                self.stats.syncs += len(keys) + len({k[:1] for k in done})
        except OSError as e:
            log.error("write-through: syncing %d pages failed: %s; they are not durable", len(keys), e)
            return set()
        # a page evicted between its write and the sync (a full tier) is not on disk after all
        return {k for k in done if self.disk.entry(k) is not None}

    async def close(self) -> None:
        """Write the open batch and wait for every batch in flight."""
        self.flush()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def shutdown(self) -> None:
        """Stop the thread pool: writes not started are cancelled (their futures too), running ones
        finish first. Any thread, after the loop stopped submitting."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

"""Group commit: durable disk writes for write-through, batched so that concurrent commits share syncs.

Owns batching and the order of a durable write, nothing else: pages submitted within `window`
seconds of the first page of a batch are written (`DiskTier.put(durable=True)`: data fdatasynced
before the file gets its name; the writes of a batch in parallel, so their syncs overlap in the file
system's journal), then the directories holding the batch's new names are fsynced, once each, and
only then do the pages' futures resolve: True when the page is durable, False when it could not be
written (no room, a write or sync error). It decides nothing about which pages are written (the
manager does) and runs on the event loop. Its disk work runs in a thread pool of its own, started at
the first write: threads waiting for syncs never hold up the I/O pool's reads and demotions.
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


@dataclasses.dataclass
class GroupCommitStats:
    batches: int = 0  # batches written (each ends with one fsync per directory it touched)
    pages: int = 0  # pages submitted
    failed_pages: int = 0  # pages not made durable: no room, or a write or sync error
    dir_syncs: int = 0  # directory fsyncs


@dataclasses.dataclass
class _Write:
    key: bytes
    parent: bytes | None
    ns: bytes
    data: bytes
    itemsize: int
    groups: list[int] | None
    future: asyncio.Future[bool]


class GroupCommit:
    """Durable page writes, batched per window. Event loop only (see the module docstring).

    `window`: seconds a batch stays open after its first page (read at each batch: it may change
    while the daemon runs); 0 still batches the pages submitted in the same loop iteration."""

    def __init__(
        self,
        disk: DiskTier,
        threads: int,
        window: Callable[[], float],
        max_batch_bytes: int = MAX_BATCH_BYTES,
    ) -> None:
        self.disk = disk
        self.threads = threads
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.window = window
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
    ) -> asyncio.Future[bool]:
        """A future that is True once the page is on disk and synced, False if it cannot be. It is
        cancelled when the I/O pool shuts down under the write (the daemon is stopping)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._batch.append(_Write(key, parent, ns, data, itemsize, groups, fut))
        self._batch_bytes += len(data)
        self.stats.pages += 1
        if self._batch_bytes >= self.max_batch_bytes:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(max(0.0, self.window()), self.flush)
        return fut

    def flush(self) -> None:
        """Start writing the open batch now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._batch:
            return
        batch, self._batch, self._batch_bytes = self._batch, [], 0
        task = asyncio.ensure_future(self._commit(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
                        self.disk.put, w.key, w.parent, w.ns, w.data, w.itemsize, w.groups, durable=True
                    ),
                )
                for w in batch
            ]
            results: list[Any] = await asyncio.gather(*puts, return_exceptions=True)
            written = [w.key for w, r in zip(batch, results) if r is True]
            synced = True
            if written:
                try:
                    await loop.run_in_executor(pool, self.disk.sync_dirs, written)
                    self.stats.dir_syncs += len({k[:1] for k in written})
                except OSError as e:
                    log.error("write-through: syncing the page directories failed: %s", e)
                    synced = False
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
                    durable = r is True and synced
                    self.stats.failed_pages += not durable
                    w.future.set_result(durable)
        finally:  # cancelled (the I/O pool or the loop is going away): nobody waits forever
            for w in batch:
                if not w.future.done():
                    w.future.cancel()

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

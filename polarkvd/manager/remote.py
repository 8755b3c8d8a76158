"""Pages from peers: DRAM (or L1) slots for the longest prefix the cluster holds, fetched in
batches per holder, whole or layer group by layer group.

A part of the manager (polarkvd/manager/__init__.py): it holds no state of its own beyond what
is named here; the shared state is the manager's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from polarkvd.errors import (
    PageNotFound,
)
from polarkvd.index import (
    PROMOTING,
    PROMOTING_VRAM,
    Page,
)
from polarkvd.manager.records import NamespaceInfo
from polarkvd.transport.pipeline import (
    LoadProgress,
    layer_groups,
)
from polarkvd.types import Tier

if TYPE_CHECKING:
    from polarkvd.cluster.pool import ClusterPool
    from polarkvd.manager import Manager

log = logging.getLogger(__name__)


class RemoteFetches:
    """Remote fetches."""

    def __init__(self, m: Manager) -> None:
        self.m = m

    @property
    def cluster(self) -> ClusterPool:
        """The cluster pool: a fetch from peers happens only in a cluster."""
        pool = self.m.cluster
        assert pool is not None
        return pool

    async def start_fetches(
        self, ns: NamespaceInfo, keys: list[bytes], layered: bool = False, vram: bool = False
    ) -> list[Any]:
        """Start pulling the longest prefix of `keys` that peers hold into new DRAM slots.

        Holders come from the lookup that preceded this load, or from a fresh meta map query.
        Pages arrive in batches per holder, several batches in flight; each page's future says
        whether its bytes arrived verified. With `layered`, nothing is sent yet: the caller gets
        (page, future, holder) and runs `fetch_layered`.

        With `vram` (the loading session attached with L1) and RDMA able to write into our pool
        (`cluster.vram_landing()`: the pool registered as a dma-buf), pages get L1 slots while the
        pool has room (PROMOTING_VRAM) and are READ straight into them (GPUDirect); `_fetch` moves
        them to DRAM slots when that cannot be done. Never for `layered` loads: their offsets go to
        the engine before the bytes arrive, so they cannot change tier on the way.
        """
        hints = self.cluster.hints
        holders = []
        for key in keys:
            h = hints.get(key)
            if not h:
                break
            holders.append(h)
        if not holders:
            holders = await self.cluster.locate(keys)
        loop = asyncio.get_running_loop()
        started: list[tuple[Page, asyncio.Future[bool]]] = []
        pool = self.m.vram if vram and not layered and self.cluster.vram_landing() else None
        for key in keys[: len(holders)]:
            if key in self.m.index:  # appeared meanwhile (another load of the same prefix)
                break
            offset = pool.alloc(ns.ns.page_bytes) if pool is not None else None
            if offset is not None:
                page = Page(key, ns.id, offset, ns.ns.page_bytes, None, PROMOTING_VRAM)
            else:
                pool = None  # full: DRAM for the rest (a fetch never waits for a demotion)
                offset = self.m.space.alloc(ns.slot_bytes)
                if offset is None:
                    break
                page = Page(key, ns.id, offset, ns.ns.page_bytes, None, PROMOTING)
            self.m.index.add(page)
            fut: asyncio.Future[bool] = loop.create_future()
            self.m._promotions[key] = fut
            started.append((page, fut))
        if pool is not None or (vram and self.m.vram is not None):
            self.m.l1.schedule_vram_demotion()  # above vram.high_watermark now? (a no-op below it)
        if layered:
            return [(page, fut, holders[i][0]) for i, (page, fut) in enumerate(started)]
        batch: list[tuple[Page, asyncio.Future[bool]]] = []
        for i, item in enumerate(started):
            batch.append(item)
            last = i + 1 == len(started)
            if (
                last
                or len(batch) == self.cluster.fetch_batch
                or holders[i + 1][0] != holders[i][0]
                or started[i + 1][0].state != item[0].state  # a batch lands in one tier
            ):
                task = asyncio.ensure_future(self._fetch(ns, holders[i][0], batch))
                self.m._cluster_tasks.add(task)
                task.add_done_callback(self.m._cluster_tasks.discard)
                batch = []
        return started

    async def _fetch(
        self, ns: NamespaceInfo, holder: str, batch: list[tuple[Page, asyncio.Future[bool]]]
    ) -> None:
        sums: list[int | None] = []
        results: list[Any] | None = None
        if batch and batch[0][0].state == PROMOTING_VRAM:
            try:
                results = await self.cluster.fetch_into_vram(
                    holder, ns.digest, [p.key for p, _ in batch], [p.offset for p, _ in batch], ns.ns.page_bytes, sums
                )  # fmt: skip
            except Exception as e:  # the DRAM path below still delivers
                log.error("cluster: fetch from %s into L1 failed: %r", holder, e)
                results = None
            if results is None:  # not over RDMA into L1: the same pages into DRAM, in this call
                batch = self._land_in_dram_instead(ns, batch)
                sums = []
            else:
                n = sum(r is not False for r in results)
                self.m.counters["fetched_pages_vram"] += n
        if results is None:
            views = [self.m.arena[p.offset : p.offset + p.size] for p, _ in batch]
            started = time.perf_counter()
            try:
                results = await self.cluster.fetch(
                    holder, ns.digest, [p.key for p, _ in batch], views, sums=sums
                )
            except Exception as e:  # never leave a loader waiting
                log.error("cluster: fetch from %s failed: %r", holder, e)
                results = [False] * len(batch)
            if False not in results:  # the pool's rate from this peer, as loads see it
                nbytes = sum(p.size for p, _ in batch)
                self.m.worth.fetch.observe(Tier.DMP, nbytes, time.perf_counter() - started, peer=holder)
        for i, ((page, fut), parent) in enumerate(zip(batch, results)):
            if parent is False:
                self.m.loads.finish_promotion(page, fut, PageNotFound("remote fetch failed"), on_disk=False)
            else:
                page.parent = parent
                page.checksum = sums[i] if i < len(sums) else None  # verified on arrival: kept for peers
                self.m.counters["fetched_pages_remote"] += 1
                self.m.counters["fetched_bytes_remote"] += page.size
                self.m.loads.finish_promotion(page, fut, None, on_disk=False)

    def _land_in_dram_instead(
        self, ns: NamespaceInfo, batch: list[tuple[Page, asyncio.Future[bool]]]
    ) -> list[tuple[Page, asyncio.Future[bool]]]:
        """Pages meant to arrive in L1 get DRAM slots instead (their L1 slots are freed: nothing
        writes there any more, the RDMA attempt is over). Pages no DRAM slot is found for end the
        prefix: they and those after them fail. Returns the pages that go on, in order."""
        out: list[tuple[Page, asyncio.Future[bool]]] = []
        for i, (page, fut) in enumerate(batch):
            offset = self.m.space.alloc(ns.slot_bytes)
            if offset is None:
                for p, f in batch[i:]:
                    self.m.loads.finish_promotion(
                        p, f, PageNotFound("no DRAM slot for a remote page"), on_disk=False
                    )
                break
            self.m.vram.free(page.offset)  # type: ignore[union-attr]
            self.m.index.land_in_dram(page, offset)
            out.append((page, fut))
        self.m.counters["fetch_vram_to_dram_pages"] += len(batch)
        return out

    def fetch_layered(
        self,
        ns: NamespaceInfo,
        items: list[tuple[int, Page, asyncio.Future[bool], str]],
        progress: LoadProgress | None,
    ) -> None:
        task = asyncio.ensure_future(self._fetch_layer_groups(ns, items, progress))
        self.m._cluster_tasks.add(task)
        task.add_done_callback(self.m._cluster_tasks.discard)

    async def _fetch_layer_groups(
        self,
        ns: NamespaceInfo,
        items: list[tuple[int, Page, asyncio.Future[bool], str]],
        progress: LoadProgress | None,
    ) -> None:
        """Remote pages, layer group after layer group (each group: every page, in batches per holder,
        in parallel), publishing progress after each group; a page that fails ends the load there."""
        num_layers, layer_bytes = ns.ns.num_layers, ns.ns.layer_bytes
        batches: list[list[tuple[int, Page, asyncio.Future[bool], str]]] = []
        for item in items:
            if batches and item[3] == batches[-1][0][3] and len(batches[-1]) < self.cluster.fetch_batch:
                batches[-1].append(item)
            else:
                batches.append([item])
        done_layers = dict.fromkeys((pos for pos, _, _, _ in items), 0)
        failed_at: int | None = None
        started = time.perf_counter()
        try:
            for lo, hi in layer_groups(num_layers, self.cluster.layer_groups):
                # nothing after a failed page is asked for again
                live = [[it for it in b if failed_at is None or it[0] < failed_at] for b in batches]
                live = [b for b in live if b]
                if not live:
                    break
                results = await asyncio.gather(
                    *(
                        self.cluster.fetch(
                            b[0][3],
                            ns.digest,
                            [p.key for _, p, _, _ in b],
                            [
                                self.m.arena[p.offset + lo * layer_bytes : p.offset + hi * layer_bytes]
                                for _, p, _, _ in b
                            ],
                            layers=(lo, hi, layer_bytes),
                        )
                        for b in live
                    ),
                    return_exceptions=True,
                )
                good: list[int] = []
                for b, res in zip(live, results):
                    if isinstance(res, BaseException):
                        log.warning(
                            "cluster: layers %d-%d of %d pages from %s failed: %r", lo, hi, len(b), b[0][3], res,
                        )  # fmt: skip
                        res = [False] * len(b)
                    elif False in res:
                        log.warning(
                            "cluster: layers %d-%d from %s: %d of %d pages arrived (the load ends at the first missing)",
                            lo, hi, b[0][3], res.index(False), len(b),
                        )  # fmt: skip
                    for (pos, page, _, _), parent in zip(b, res):
                        if failed_at is not None and pos >= failed_at:
                            break
                        if parent is False:
                            failed_at = pos if failed_at is None else min(failed_at, pos)
                            if progress is not None:
                                progress.fail(pos)
                            break
                        if lo == 0:
                            page.parent = parent
                        done_layers[pos] = hi
                        good.append(pos)
                if progress is not None:
                    progress.layers_done([p for p in good if failed_at is None or p < failed_at], hi)
        finally:
            if failed_at is None and all(n == num_layers for n in done_layers.values()):
                elapsed = time.perf_counter() - started  # batches of all holders ran side by side
                by_holder: dict[str, int] = {}
                for _, page, _, holder in items:
                    by_holder[holder] = by_holder.get(holder, 0) + page.size
                for holder, nbytes in by_holder.items():
                    self.m.worth.fetch.observe(Tier.DMP, nbytes, elapsed, peer=holder)
            for pos, page, fut, _ in items:
                if done_layers[pos] == num_layers and (failed_at is None or pos < failed_at):
                    self.m.counters["fetched_pages_remote"] += 1
                    self.m.counters["fetched_bytes_remote"] += page.size
                    self.m.loads.finish_promotion(page, fut, None, on_disk=False)
                else:
                    self.m.loads.finish_promotion(
                        page, fut, PageNotFound("remote fetch failed"), on_disk=False
                    )

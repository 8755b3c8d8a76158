"""One-sided RDMA READs of peers' pages: queue pairs per holder, pins on the holder's side, read
plans, and what a failure costs (back-off, then TCP).

A part of the cluster pool (polarkvd/cluster/pool/__init__.py): the shared state is the pool's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from polarkvd.cluster.pool.common import (
    Dest,
    Fallback,
)
from polarkvd.errors import PolarKVError, ProtocolError
from polarkvd.transport.rdma import RdmaEndpoint
from polarkvd.transport.rdma_params import PageRef, RdmaError, RdmaTimeout, TransportKind, plan_reads
from polarkvd.types import KEY_BYTES

if TYPE_CHECKING:
    from polarkvd.cluster.pool import ClusterPool

log = logging.getLogger(__name__)


class RdmaReads:
    """One-sided RDMA READs of peers' pages: queue pairs per holder, pins on the holder's side, read"""

    def __init__(self, pool: ClusterPool) -> None:
        self.pool = pool

    def rdma_failed(self, holder: str, why: str) -> None:
        """Drop the queue pair (a new one after the back-off), count, remember why."""
        why = why.removeprefix("rdma: ")
        self._drop_endpoint(holder)
        # parallel fetches that failed together are one failure, not several (no extra doubling)
        if self.pool.transports.choose(holder, True) is TransportKind.RDMA:
            self.pool.transports.failed(holder, why)
        self.pool.counters["cluster_rdma_fallbacks"] += 1
        self.pool.last_fallback = f"{holder}: {why}"

    def _drop_endpoint(self, holder: str) -> None:
        with self.pool._rdma_lock:
            entry = self.pool._endpoints.pop(holder, None)
        if entry is not None:
            self._submit_quietly(entry[0].close)

    def forget_rdma(self, node: str) -> None:
        """A member died or left: its queue pairs (both directions) go, and its back-off record."""
        self._drop_endpoint(node)
        with self.pool._rdma_lock:
            ep = self.pool._accepted.pop(node, None)
        if ep is not None:
            self._submit_quietly(ep.close)
        self.pool.transports.forget(node)

    def _submit_quietly(self, fn: Callable[[], Any]) -> None:
        try:
            self.pool.net.submit(fn)
        except RuntimeError:  # shutting down: close here
            fn()

    def _endpoint(self, holder: str, addr: str, deadline: float, stale: RdmaEndpoint | None = None) -> tuple[RdmaEndpoint, str]:  # fmt: skip
        """Our connected QP to `holder` (network thread): the one we have, or a new one through
        `rdma_connect` (also when `stale` is the one we have: the holder's device restarted)."""
        assert self.pool.rdma is not None
        with self.pool._rdma_lock:
            lock = self.pool._ep_locks.setdefault(holder, threading.Lock())
        with lock:
            with self.pool._rdma_lock:
                have = self.pool._endpoints.get(holder)
            if have is not None and have[0].broken is None and have[0] is not stale:
                return have
            if have is not None:
                self._drop_endpoint(holder)
            left = deadline - time.monotonic()
            if left <= 0:
                raise RdmaTimeout("rdma: no time left to connect")
            ep = self.pool.rdma.endpoint(timeout=self.pool.c.fetch_timeout)
            try:
                header, _ = self.pool.client.call(
                    addr,
                    "rdma_connect",
                    {"from": self.pool.node_id, "params": ep.local_params()},
                    timeout=left,
                )
                epoch = header.get("epoch")
                if not isinstance(epoch, str):
                    raise ProtocolError("rdma_connect reply without an epoch")
                ep.connect(header.get("params"))
            except PolarKVError as e:
                ep.close()
                if isinstance(e, RdmaError):
                    raise
                raise RdmaError(f"rdma_connect to {holder} failed: {e}") from e
            except BaseException:
                ep.close()
                raise
            with self.pool._rdma_lock:
                self.pool._endpoints[holder] = (ep, epoch)
            return ep, epoch

    async def fetch_rdma(
        self,
        holder: str,
        addr: str,
        ns: bytes,
        keys: list[bytes],
        dest: Dest,
        layers: tuple[int, int, int] | None,
        sums: list[int | None] | None,
    ) -> list[bytes | None | Literal[False]]:
        """pin -> READ the slices into `dest` -> verify each page's xxh3_64 -> unpin. Raises Fallback."""
        assert self.pool.rdma is not None
        deadline = time.monotonic() + self.pool.c.fetch_timeout
        lo, hi, lb = layers if layers is not None else (0, 1, 0)
        slots = dest.slots
        lease: int | None = None
        try:
            ep, epoch = await self.pool.loop.run_in_executor(
                self.pool.net, lambda: self._endpoint(holder, addr, deadline)
            )
            args: dict[str, Any] = {"ns": ns, "keys": keys, "seconds": self.pool.lease_seconds}
            if layers is not None:
                args["layers"] = list(layers)
            left = deadline - time.monotonic()
            if left <= 0:
                raise RdmaTimeout("rdma: no time left to pin")
            header, _ = await self.pool.metamap_client.call(addr, "pin", args, left)
            lease = header.get("lease")
            pages = header.get("pages")
            if not isinstance(pages, list) or len(pages) > len(keys):
                raise ProtocolError("bad pin reply: pages")
            if not pages:
                return [False] * len(keys)
            if not isinstance(lease, int) or isinstance(lease, bool):
                raise ProtocolError("bad pin reply: lease")
            if header.get("epoch") != epoch:  # the holder's device was reopened: a new QP, once
                ep, epoch = await self.pool.loop.run_in_executor(
                    self.pool.net, lambda: self._endpoint(holder, addr, deadline, stale=ep)
                )
            refs, expect, parents = self._plan_pages(ep, pages, dest.lengths, layers)
            if not refs:
                return [False] * len(keys)
            size = (hi - lo) * lb if layers is not None else dest.lengths[0]
            ops = plan_reads(
                [PageRef(r, slots[i], k) for i, (r, k) in enumerate(refs)],
                (lo, hi) if layers is not None else (0, 1),
                lb if layers is not None else size,
                ep.max_sge,
                ep.max_bytes,
            )
            left = deadline - time.monotonic()
            if left <= 0:
                raise RdmaTimeout("rdma: no time left to READ")
            await self.pool.loop.run_in_executor(
                self.pool.net, lambda: ep.read_ops(ops, region=dest.region, timeout=left)
            )
            n = len(refs)
            got = await self.pool.loop.run_in_executor(self.pool.net, lambda: dest.digest(n))
        except Fallback:
            raise
        except (PolarKVError, OSError, ValueError, asyncio.TimeoutError) as e:
            raise Fallback(str(e) or type(e).__name__) from e
        finally:
            if isinstance(lease, int) and not isinstance(lease, bool):
                held = lease
                try:
                    self.pool.net.submit(self._unpin, addr, held)
                except RuntimeError:
                    pass  # shutting down: the lease expires at the holder
        bad = next((i for i, (a, b) in enumerate(zip(got, expect)) if a != b), None)
        if bad is not None:
            self.pool.counters["cluster_corrupt_pages"] += 1
            raise Fallback(f"page {bad} read over RDMA failed its checksum")
        self.pool.transports.succeeded(holder)
        if sums is not None:
            sums.extend(got)
        self.pool.fetcher.count_fetched("rdma", dest.lengths, n, layers)
        if dest.region == "vram":
            self.pool.fetcher.count_fetched("vram_rdma", dest.lengths, n, layers)
        missing: list[bytes | None | Literal[False]] = [False] * (len(keys) - n)
        return [*parents, *missing]

    @staticmethod
    def _plan_pages(
        ep: RdmaEndpoint, pages: list[Any], lengths: list[int], layers: tuple[int, int, int] | None
    ) -> tuple[list[tuple[int, int]], list[int], list[bytes | None]]:
        """Validate the holder's pin reply: per usable page (remote address, rkey), the expected
        checksum and the parent. A page whose size does not fit our slot ends the prefix there."""
        assert ep.peer is not None
        refs: list[tuple[int, int]] = []
        expect: list[int] = []
        parents: list[bytes | None] = []
        for page, length in zip(pages, lengths):
            if not (isinstance(page, list) and len(page) == 5):
                raise ProtocolError("bad pin reply: a page is [region, offset, size, checksum, parent]")
            name, offset, size, checksum, parent = page
            if not isinstance(name, str) or not all(
                type(x) is int and x >= 0 for x in (offset, size, checksum)
            ):
                raise ProtocolError("bad pin reply: region, offset, size or checksum")
            if parent is not None and not (isinstance(parent, bytes) and len(parent) == KEY_BYTES):
                raise ProtocolError("bad pin reply: parent")
            if layers is not None:
                lo, hi, lb = layers
                fits = size % lb == 0 and hi * lb <= size and length == (hi - lo) * lb
            else:
                fits = size == length == lengths[0]
            if not fits:
                break
            region = ep.peer.region(name)
            refs.append((region.address_of(offset, size), region.rkey))
            expect.append(checksum)
            parents.append(parent)
        return refs, expect, parents

    def _unpin(self, addr: str, lease: int) -> None:
        """Fire and forget: the lease also expires on its own at the holder."""
        try:
            self.pool.client.call(addr, "unpin", {"lease": lease}, timeout=self.pool.c.fetch_timeout)
        except (PolarKVError, OSError) as e:
            log.debug("cluster: unpin of lease %d at %s failed (it expires): %r", lease, addr, e)

"""Fetching pages from peers into our DRAM or L1: per holder, over TCP or RDMA (rdma_reads.py),
verified by checksum, with a fallback to TCP when RDMA fails.

A part of the cluster pool (polarkvd/cluster/pool/__init__.py): the shared state is the pool's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import xxhash

from polarkvd.cluster.pool.common import (
    Dest,
    Fallback,
    data_addr,
)
from polarkvd.errors import PolarKVError, ProtocolError
from polarkvd.transport.rdma_params import TransportKind, buffer_address
from polarkvd.types import KEY_BYTES

if TYPE_CHECKING:
    from polarkvd.cluster.pool import ClusterPool

log = logging.getLogger(__name__)


class Fetcher:
    """Fetching pages from peers into our DRAM or L1: per holder, over TCP or RDMA (rdma_reads.py),"""

    def __init__(self, pool: ClusterPool) -> None:
        self.pool = pool

    async def fetch(
        self,
        holder: str,
        ns: bytes,
        keys: list[bytes],
        views: list[memoryview],
        layers: tuple[int, int, int] | None = None,
        sums: list[int | None] | None = None,
    ) -> list[bytes | None | Literal[False]]:
        """Pull pages from `holder` straight into `views`. Per key: its parent key (or None at a
        chain root) when the bytes arrived verified, False when they did not. With `layers` =
        (lo, hi, layer_bytes), only that slice of each page (layer-major pages: contiguous). `sums`
        receives the verified xxh3_64 of each payload (None where it failed).

        Over RDMA when we and the holder offer it and `transports` allows (then the same pages over
        TCP at once if anything goes wrong), else over TCP; the caller cannot tell but by counters."""
        member = self.pool.members.get(holder)
        addr = data_addr(member) if member else None
        if addr is None:
            log.debug("cluster: fetch from %s: not a member now", holder)
            return [False] * len(keys)
        if self.pool.rdma is not None and keys and len(views) >= len(keys):
            offers = member is not None and isinstance(member.meta, dict) and member.meta.get("rdma") == 1
            if self.pool.transports.choose(holder, offers) is TransportKind.RDMA:
                try:
                    dest = self._dram_dest(views[: len(keys)], layers)
                    return await self.pool.rdma_reads.fetch_rdma(holder, addr, ns, keys, dest, layers, sums)
                except Fallback as e:
                    if sums is not None:
                        del sums[:]
                    if e.failure:
                        self.pool.rdma_reads.rdma_failed(holder, str(e))
        return await self._fetch_tcp(holder, addr, ns, keys, views, layers, sums)

    async def fetch_into_vram(
        self,
        holder: str,
        ns: bytes,
        keys: list[bytes],
        offsets: list[int],
        page_bytes: int,
        sums: list[int | None] | None = None,
    ) -> list[bytes | None | Literal[False]] | None:
        """GPUDirect: READ whole pages from `holder` straight into our L1 pool at `offsets`, verified
        through the staging buffer. Per key its parent (verified) or False, as `fetch`; None when
        it could not be done this way (no registered L1 region, the holder offers no RDMA or is in
        back-off, or the attempt failed: counted and backed off like any RDMA failure), and the
        caller then fetches the same pages into DRAM (over TCP after a failure)."""
        member = self.pool.members.get(holder)
        addr = data_addr(member) if member else None
        if addr is None or not keys or not self.pool.vram_landing():
            return None
        offers = member is not None and isinstance(member.meta, dict) and member.meta.get("rdma") == 1
        if self.pool.transports.choose(holder, offers) is not TransportKind.RDMA:
            return None
        lengths = [page_bytes] * len(keys)
        staging = self.pool.staging
        hashed = [0]  # bytes copied to the host to verify (network thread; counted on the loop)

        def digest(n: int) -> list[int]:
            hashed[0] += sum(lengths[:n])
            return staging.checksums([(offsets[i], lengths[i]) for i in range(n)])

        try:
            return await self.pool.rdma_reads.fetch_rdma(
                holder, addr, ns, keys, Dest("vram", list(offsets), lengths, digest), None, sums
            )
        except Fallback as e:
            if sums is not None:
                del sums[:]
            if e.failure:
                self.pool.rdma_reads.rdma_failed(holder, str(e))
            self.pool.counters["cluster_vram_landing_fallbacks"] += 1
            return None
        finally:
            self.pool.counters["cluster_vram_verify_bytes"] += hashed[0]

    def _dram_dest(self, views: list[memoryview], layers: tuple[int, int, int] | None) -> Dest:
        """Arena slices as an RDMA destination (a view outside the registered arena: not applicable)."""
        assert self.pool.rdma is not None
        local = self.pool.rdma.regions["dram"]
        lo, lb = (layers[0], layers[2]) if layers is not None else (0, 0)
        slots: list[int] = []  # where each page's slot starts in our arena
        for v in views:
            try:
                at = buffer_address(v) - local.base - lo * lb
            except (ValueError, TypeError):
                at = -1
            if at < 0 or at + lo * lb + len(v) > local.length:
                raise Fallback("destination outside the registered arena", failure=False)
            slots.append(at)
        return Dest(
            "dram", slots, [len(v) for v in views], lambda n: [xxhash.xxh3_64_intdigest(v) for v in views[:n]]
        )

    def count_fetched(self, kind: str, lengths: Sequence[int], n: int, layers: Any) -> None:
        if layers is None or layers[0] == 0:
            self.pool.counters[f"cluster_fetched_pages_{kind}"] += n
        self.pool.counters[f"cluster_fetched_bytes_{kind}"] += sum(lengths[:n])

    async def _fetch_tcp(
        self,
        holder: str,
        addr: str,
        ns: bytes,
        keys: list[bytes],
        views: list[memoryview],
        layers: tuple[int, int, int] | None,
        sums: list[int | None] | None,
    ) -> list[bytes | None | Literal[False]]:
        out: list[bytes | None | Literal[False]] = [False] * len(keys)

        def into(header: dict[str, Any]) -> list[memoryview | None]:
            sizes = header.get("sizes")
            if not isinstance(sizes, list) or len(sizes) > len(views):
                raise ProtocolError("bad get reply")
            return [v if s == len(v) else None for v, s in zip(views, sizes)]

        try:
            args: dict[str, Any] = {"ns": ns, "keys": keys}
            if layers is not None:
                args["layers"] = list(layers)
            header, ok = await self.pool.metamap_client.call(
                addr, "get", args, self.pool.c.fetch_timeout, into=into, sums_out=sums
            )
        except (PolarKVError, OSError, asyncio.TimeoutError) as e:
            self.pool.counters["cluster_fetch_failures"] += 1
            log.debug("cluster: fetch of %d pages from %s failed: %r", len(keys), holder, e)
            return out
        parents = header.get("parents") or []
        if len(parents) < len(keys):
            log.debug("cluster: %s holds %d of the %d pages asked for now", holder, len(parents), len(keys))
        n = 0
        for i, verified in enumerate(ok):
            if i >= len(parents):
                break
            if not verified:
                self.pool.counters["cluster_corrupt_pages"] += 1
                break  # a prefix: nothing after a bad page is used
            p = parents[i]
            out[i] = p if isinstance(p, bytes) and len(p) == KEY_BYTES else None
            n += 1
        self.count_fetched("tcp", [len(v) for v in views], n, layers)
        return out

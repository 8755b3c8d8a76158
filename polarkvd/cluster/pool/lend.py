"""Lending DRAM to the pool: evicted pages demoted to peers chosen by weighted hashing, and the
`put` handler that keeps other members' pages in our lent region (tiers/dmp.py).

A part of the cluster pool (polarkvd/cluster/pool/__init__.py): the shared state is the pool's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from polarkvd.cluster import ring
from polarkvd.cluster.pool.common import (
    data_addr,
    keys_arg,
)
from polarkvd.errors import ErrorCode, PolarKVError, ProtocolError
from polarkvd.transport.peer_server import PayloadReader, Reply
from polarkvd.types import KEY_BYTES, Tier

if TYPE_CHECKING:
    from polarkvd.cluster.pool import ClusterPool

log = logging.getLogger(__name__)


class Lending:
    """Lending DRAM to the pool: evicted pages demoted to peers chosen by weighted hashing, and the"""

    def __init__(self, pool: ClusterPool) -> None:
        self.pool = pool

    def demote_targets(self, key: bytes, size: int) -> list[str]:
        weights = {}
        for node, m in self.pool.members.items():
            dmp = m.meta.get("dmp") if isinstance(m.meta, dict) else None
            if isinstance(dmp, list) and len(dmp) == 2 and all(isinstance(x, int) for x in dmp):
                free = dmp[1] - dmp[0]
                if free >= size or dmp[1] >= 4 * size:  # full pools evict their own LRU pages
                    weights[node] = float(max(free, size))
        return ring.place(key, weights, self.pool.c.replicas) if weights else []

    async def demote(
        self, ns: bytes, key: bytes, parent: bytes | None, data: bytes, targets: list[str]
    ) -> int:
        """Send one evicted page to the peers chosen; returns how many took it."""
        stored = 0
        for node in targets:
            member = self.pool.members.get(node)
            addr = data_addr(member) if member else None
            if addr is None:
                continue
            try:
                header, _ = await self.pool.metamap_client.call(
                    addr,
                    "put",
                    {"ns": ns, "keys": [key], "parents": [parent]},
                    self.pool.c.fetch_timeout,
                    payloads=[data],
                )
            except (PolarKVError, OSError, asyncio.TimeoutError) as e:
                self.pool.counters["cluster_demote_failures"] += 1
                log.debug("cluster: demotion of %s to %s failed: %r", key.hex(), node, e)
                continue
            if header.get("stored") == 1:
                stored += 1
        return stored

    def h_put(self, args: dict[str, Any], payload: PayloadReader) -> Reply:
        if self.pool.dmp is None:
            raise PolarKVError("this member lends no DRAM (cluster.dmp_bytes = 0)", code=ErrorCode.NO_SPACE)
        keys = keys_arg(args.get("keys"))
        ns, parents = args.get("ns"), args.get("parents")
        if not isinstance(ns, bytes) or not isinstance(parents, list) or len(parents) != len(keys):
            raise ProtocolError("put needs ns and one parent (16-byte key or nil) per key")
        if len(payload.sizes) != len(keys):
            raise ProtocolError("put needs one payload per key")
        for p in parents:
            if p is not None and (not isinstance(p, bytes) or len(p) != KEY_BYTES):
                raise ProtocolError("every parent must be a 16-byte key or nil")
        dmp = self.pool.dmp

        def reserve() -> list[Any]:
            out: list[Any] = []
            for key, parent, size in zip(keys, parents, payload.sizes):
                held = dmp.get(key)
                if held is not None and held.ns == ns and held.size == size:
                    dmp.stats["duplicate_pages"] += 1
                    out.append(True)  # already lent here: nothing to send, counts as stored
                    continue
                entry, evicted = dmp.reserve(key, ns, parent, size)
                for k in evicted:
                    self.pool.metamap_client.page_removed(k, Tier.DMP)
                out.append(entry)
            return out

        entries = self.pool.service.on_loop(reserve)
        ok = []
        for entry in entries:
            if entry is None or entry is True:
                payload.skip()
                ok.append(entry is True)
            else:
                good = payload.recv_into(dmp.slot_view(entry))
                entry.checksum = payload.last_sum if good else None
                ok.append(good)

        def finish() -> int:
            n = 0
            for entry, good in zip(entries, ok):
                if entry is True:
                    n += 1
                    continue
                if entry is None:
                    continue
                if good:
                    dmp.commit(entry)
                    self.pool.metamap_client.page_added(entry.key, Tier.DMP)
                    n += 1
                else:
                    dmp.abort(entry)
            return n

        stored = self.pool.service.on_loop(finish)
        self.pool.counters["cluster_lent_pages"] += stored
        return Reply({"stored": stored})

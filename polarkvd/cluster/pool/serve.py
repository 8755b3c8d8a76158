"""The peer service: what other members may ask of us (where, announce, get, RDMA connect, pin,
unpin), on the transport threads, with the loop doing what touches shared state; a `get` of pages
READY in DRAM holds their slots on the transport thread itself (`PeerPages.hold`) and does not wait
for the loop before sending.

A part of the cluster pool (polarkvd/cluster/pool/__init__.py): the shared state is the pool's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import xxhash

from polarkvd.cluster.metamap_wire import decode_batch
from polarkvd.cluster.pool.common import (
    MAX_ACCEPTED_QPS,
    MAX_NODE_ID,
    MAX_RDMA_LEASES,
    SLICE_SUM_LIMIT,
    Lease,
    Pinned,
    T,
    keys_arg,
    layers_arg,
    release_all,
)
from polarkvd.errors import ErrorCode, PageNotFound, PolarKVError, ProtocolError
from polarkvd.transport.peer_server import PayloadReader, Reply
from polarkvd.transport.rdma import RdmaDevice

if TYPE_CHECKING:
    from polarkvd.cluster.pool import ClusterPool

log = logging.getLogger(__name__)


class PeerService:
    """The peer service: what other members may ask of us (where, announce, get, RDMA connect, pin,"""

    def __init__(self, pool: ClusterPool) -> None:
        self.pool = pool

    def on_loop(self, fn: Callable[[], T]) -> T:
        if self.pool._closing:
            raise PolarKVError("daemon stopping", code=ErrorCode.UNAVAILABLE)
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                self.pool.metamap_client.drain_events()  # a peer's request sees every page this host has so far
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                fut.set_exception(e)

        self.pool.loop.call_soon_threadsafe(run)
        return fut.result(timeout=30)

    def h_where(self, args: dict[str, Any], payload: PayloadReader) -> Reply:
        keys = keys_arg(args.get("keys"))
        if args.get("leading") is True:  # only the run length per holder (MetaMap.leading)
            if not self.pool._events.pending:  # nothing to drain: read here, off the loop (safe)
                return Reply({"leading": self.pool.metamap.leading(keys)})
            return Reply({"leading": self.on_loop(lambda: self.pool.metamap.leading(keys))})
        holders = self.on_loop(lambda: self.pool.metamap.locate(keys))
        return Reply({"holders": [list(h) for h in holders]})

    def h_announce(self, args: dict[str, Any], payload: PayloadReader) -> Reply:
        src, batch = args.get("from"), args.get("batch")
        if not isinstance(src, str) or not isinstance(batch, bytes):
            raise ProtocolError("announce needs from (node id) and batch (bytes)")
        try:
            msgs = decode_batch(batch)
        except ValueError as e:
            raise ProtocolError(f"bad announcement: {e}") from None

        def apply() -> None:
            now = time.monotonic()
            for msg in msgs:
                self.pool.metamap.on_message(src, msg, now)

        self.on_loop(apply)
        return Reply({})

    def h_get(self, args: dict[str, Any], payload: PayloadReader) -> Reply:
        keys = keys_arg(args.get("keys"))
        ns = args.get("ns")
        if not isinstance(ns, bytes):
            raise ProtocolError("get needs ns (namespace digest)")
        layers = layers_arg(args.get("layers"))
        from_vram: list[bytes] = []
        self._to_dram_first(ns, keys, vram_ok=False, from_vram=from_vram)
        held = self._hold_pages(ns, keys, layers)
        if held is not None:
            return self._send_reply(held, layers, frozenset(from_vram), on_loop=False)
        return self.on_loop(lambda: self._pin_for_send(ns, keys, layers, set(from_vram)))

    def _hold_pages(self, ns: bytes, keys: list[bytes], layers: list[int] | None) -> list[Pinned] | None:
        """Transport thread: every page of `keys` held for the send here, without waiting for the
        loop (`PeerPages.hold`: the slots stay unreused until released, on the loop); None when
        one is not READY in DRAM (then the loop pins the prefix: the lent region, a page whose
        layers do not fit). The loop keeps the pins for what it owns alone."""
        if self.pool._closing:
            raise PolarKVError("daemon stopping", code=ErrorCode.UNAVAILABLE)
        pinned: list[Pinned] = []
        for key in keys:
            got = self.pool.pages.hold(ns, key)
            if got is None:
                break
            assert got.view is not None
            pinned.append(
                Pinned(key, got.region, got.offset, got.size, got.parent, got.holder, got.release, got.view)
            )
        if len(pinned) < len(keys) or (
            layers is not None and any(p.size % layers[2] or layers[1] * layers[2] > p.size for p in pinned)
        ):
            self.pool.loop.call_soon_threadsafe(release_all, pinned)
            return None
        if layers is not None:
            lo, hi, lb = layers
            for p in pinned:
                p.view = p.view[lo * lb : hi * lb]  # type: ignore[index]
        return pinned

    def _to_dram_first(
        self, ns: bytes, keys: list[bytes], *, vram_ok: bool, from_vram: list[bytes] | None = None
    ) -> None:
        """Transport thread, before pinning for a peer: when the prefix asked for goes on in our disk
        tier or in L1 (unless `vram_ok`: the peer READs L1 itself), bring those pages into DRAM
        first (waiting at most `fetch_timeout`), so they serve a peer as well as DRAM pages. L1
        pages move through the manager's demotion path (`PeerPages.promote`); their keys go to
        `from_vram`. A quick look first: pages all in DRAM (or the lent region, or L1 when
        `vram_ok`) cost no trip to the loop."""
        pages, dmp = self.pool.pages, self.pool.dmp
        if not pages.may_promote:
            return
        for key in keys:
            if not pages.readable(key, vram_ok) and (dmp is None or dmp.get(key) is None):
                break
        else:
            return
        in_dmp = (lambda k: dmp.get(k) is not None) if dmp is not None else (lambda k: False)
        futs = self.on_loop(lambda: pages.promote(ns, keys, in_dmp, vram_ok=vram_ok, from_vram=from_vram))
        if futs:

            async def arrive() -> None:
                await asyncio.wait(futs, timeout=self.pool.c.fetch_timeout)

            asyncio.run_coroutine_threadsafe(arrive(), self.pool.loop).result(self.pool.c.fetch_timeout + 1)

    def _pin_pages(
        self, ns: bytes, keys: list[bytes], layers: list[int] | None, vram: bool = False
    ) -> list[Pinned]:
        """Pin the longest prefix of `keys` we hold (DRAM first, then the lent DMP region, and with
        `vram` L1 pages, answered as region "vram"); with `layers`, each view is that layer slice
        (a page whose size does not fit stops the prefix). On the loop. A pinned page is neither
        evicted, demoted nor its slot reused until released."""
        out: list[Pinned] = []
        for key in keys:
            got = self.pool.pages.pin(ns, key, vram)
            if got is not None:
                span = (got.offset, got.size) if got.view is None else (0, 0)
                out.append(
                    Pinned(
                        key,
                        got.region,
                        got.offset,
                        got.size,
                        got.parent,
                        got.holder,
                        got.release,
                        got.view,
                        span,
                    )
                )
                continue
            dmp = self.pool.dmp
            entry = dmp.get(key) if dmp is not None else None
            if dmp is not None and entry is not None and entry.ns == ns:
                view = dmp.pin(entry)
                out.append(
                    Pinned(key, "dmp", entry.offset, entry.size, entry.parent, entry,
                            functools.partial(dmp.unpin, entry), view)
                )  # fmt: skip
                continue
            break
        if layers is not None:
            lo, hi, lb = layers
            n = next((i for i, p in enumerate(out) if p.size % lb or hi * lb > p.size), len(out))
            for p in out[n:]:
                p.release()
            out = out[:n]
            for p in out:
                if p.view is not None:
                    p.view = p.view[lo * lb : hi * lb]
                else:
                    p.span = (p.offset + lo * lb, (hi - lo) * lb)
        return out

    def _known_sums(self, pinned: list[Pinned], layers: list[int] | None) -> list[int | None]:
        """The xxh3_64 of what is sent of each pinned page, where known from an earlier send or
        arrival: the page's own (whole pages), or one kept for that layer slice of that very page
        object (a page stored again is a new object: its bytes may differ, its sums start over)."""
        if layers is None:
            return [p.holder.checksum for p in pinned]
        lo, hi = layers[0], layers[1]
        get = self.pool._slice_sums.get
        out: list[int | None] = []
        for p in pinned:
            kept = get((p.key, lo, hi))
            out.append(kept[1] if kept is not None and kept[0] is p.holder else None)
        return out

    def _keep_sums(self, pinned: list[Pinned], layers: list[int] | None, sums: Sequence[int | None]) -> None:
        """Remember checksums computed while sending, for the next send of the same bytes. Loop only."""
        if layers is None:
            for p, c in zip(pinned, sums):
                if p.holder.checksum is None and c is not None:
                    p.holder.checksum = c
            return
        kept = self.pool._slice_sums
        if len(kept) + len(pinned) > SLICE_SUM_LIMIT:
            kept.clear()  # bounded; a miss only costs hashing the slice again
        lo, hi = layers[0], layers[1]
        for p, c in zip(pinned, sums):
            if c is not None:
                kept[(p.key, lo, hi)] = (p.holder, c)

    def _pin_for_send(
        self,
        ns: bytes,
        keys: list[bytes],
        layers: list[int] | None = None,
        from_vram: set[bytes] = frozenset(),  # type: ignore[assignment]
    ) -> Reply:
        """`get` on the loop: pin what we hold of `keys`, send it, unpin once sent. `from_vram`: keys
        that were in L1 when asked for (moved to DRAM for this), counted as served from L1 over TCP."""
        return self._send_reply(self._pin_pages(ns, keys, layers), layers, from_vram, on_loop=True)

    def _send_reply(
        self,
        pinned: list[Pinned],
        layers: list[int] | None,
        from_vram: frozenset[bytes] | set[bytes],
        on_loop: bool,
    ) -> Reply:
        """The reply to `get` that sends the pinned pages (any thread; the loop counts them and lets
        them go once sent)."""
        views = [p.view for p in pinned if p.view is not None]  # no vram here: every page has a view
        parents = [p.parent for p in pinned]
        # checksums known from earlier sends or arrivals; the transport hashes the rest into this
        # list as it sends, and they are kept for the next time
        sums: list[int | None] = self._known_sums(pinned, layers)

        def count() -> None:
            counters = self.pool.counters
            if layers is None or layers[0] == 0:
                counters["cluster_served_pages"] += len(views)
            counters["cluster_served_bytes"] += sum(p.nbytes for p in pinned)
            if from_vram:
                was = [p for p in pinned if p.key in from_vram]
                if layers is None or layers[0] == 0:
                    counters["cluster_served_pages_vram_tcp"] += len(was)
                counters["cluster_served_bytes_vram_tcp"] += sum(p.nbytes for p in was)

        if on_loop:
            count()
        else:  # before the first byte goes: the loop has counted by the time the peer has the pages
            self.pool.loop.call_soon_threadsafe(count)

        def sent() -> None:
            self._keep_sums(pinned, layers, sums)
            for p in pinned:
                p.release()

        def on_sent() -> None:
            self.pool.loop.call_soon_threadsafe(sent)

        return Reply({"sizes": [len(v) for v in views], "parents": parents}, views, on_sent, sums)

    def _need_rdma(self) -> RdmaDevice:
        if self.pool.rdma is None:
            why = self.pool.choice.reason if self.pool.choice is not None else "not started"
            raise PolarKVError(f"this member does not offer RDMA ({why})", code=ErrorCode.UNAVAILABLE)
        return self.pool.rdma

    def h_rdma_connect(self, args: dict[str, Any], payload: PayloadReader) -> Reply:
        """A requester's QP parameters in, ours out (one QP per requesting member: a new connect from
        the same member replaces its old QP)."""
        dev = self._need_rdma()
        src = args.get("from")
        if not isinstance(src, str) or not 1 <= len(src) <= MAX_NODE_ID:
            raise ProtocolError("rdma_connect needs from (the requester's node id)")
        ep, params = dev.accept(
            args.get("params"), timeout=self.pool.c.fetch_timeout
        )  # bad params: bad_request
        with self.pool._rdma_lock:
            old = [self.pool._accepted.pop(src, None)]
            self.pool._accepted[src] = ep
            while len(self.pool._accepted) > MAX_ACCEPTED_QPS:
                old.append(self.pool._accepted.popitem(last=False)[1])
        for o in old:
            if o is not None:
                o.close()
        self.pool.counters["cluster_rdma_accepted"] += 1
        return Reply({"params": params, "epoch": self.pool.rdma_epoch})

    def h_pin(self, args: dict[str, Any], payload: PayloadReader) -> Reply:
        """Pin the longest held prefix of `keys` under a lease; per page where it is (region, offset,
        size), its checksum (of the layer slice with `layers`) and parent."""
        self._need_rdma()
        keys = keys_arg(args.get("keys"))
        ns = args.get("ns")
        if not isinstance(ns, bytes):
            raise ProtocolError("pin needs ns (namespace digest)")
        layers = layers_arg(args.get("layers"))
        seconds = args.get("seconds", self.pool.lease_seconds)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ProtocolError("seconds must be a positive number")
        seconds = min(float(seconds), self.pool.lease_seconds)
        if len(self.pool._leases) >= MAX_RDMA_LEASES:
            raise PolarKVError(f"over {MAX_RDMA_LEASES} open leases", code=ErrorCode.TOO_LARGE)
        vram = self.pool.staging is not None  # L1 is READ in place: region "vram"
        self._to_dram_first(ns, keys, vram_ok=vram)
        pinned = self.on_loop(lambda: self._pin_pages(ns, keys, layers, vram))
        try:
            # hashed here, not on the loop: the pages are pinned, so their bytes cannot change;
            # L1 pages through the staging buffer (a D2H copy), only those whose sum is not known
            known = self._known_sums(pinned, layers)
            sums = [
                c if c is not None or p.view is None else xxhash.xxh3_64_intdigest(p.view)
                for p, c in zip(pinned, known)
            ]
            todo = [i for i, (p, c) in enumerate(zip(pinned, sums)) if c is None]
            if todo:
                got = self.pool.staging.checksums([pinned[i].span for i in todo])
                for i, c in zip(todo, got):
                    sums[i] = c
            hashed = sum(pinned[i].span[1] for i in todo)
        except BaseException:
            self.pool.loop.call_soon_threadsafe(release_all, pinned)
            raise

        def lease() -> int | None:
            self._keep_sums(pinned, layers, sums)  # for the next time
            self.pool.counters["cluster_vram_verify_bytes"] += hashed
            in_vram = [p for p in pinned if p.region == "vram"]
            if layers is None or layers[0] == 0:
                self.pool.counters["cluster_served_pages"] += len(pinned)
                self.pool.counters["cluster_rdma_served_pages"] += len(pinned)
                self.pool.counters["cluster_served_pages_vram_rdma"] += len(in_vram)
            served = sum(p.nbytes for p in pinned)
            self.pool.counters["cluster_served_bytes"] += served
            self.pool.counters["cluster_rdma_served_bytes"] += served
            self.pool.counters["cluster_served_bytes_vram_rdma"] += sum(p.nbytes for p in in_vram)
            if not pinned:
                return None
            lease_id = next(self.pool._lease_ids)
            timer = self.pool.loop.call_later(seconds, self._expire_lease, lease_id)
            self.pool._leases[lease_id] = Lease(pinned, timer)
            return lease_id

        lease_id = self.on_loop(lease)
        return Reply(
            {
                "lease": lease_id,
                "epoch": self.pool.rdma_epoch,
                "pages": [[p.region, p.offset, p.size, c, p.parent] for p, c in zip(pinned, sums)],
            }
        )

    def h_unpin(self, args: dict[str, Any], payload: PayloadReader) -> Reply:
        self._need_rdma()
        lease_id = args.get("lease")
        if isinstance(lease_id, bool) or not isinstance(lease_id, int):
            raise ProtocolError("unpin needs lease (an integer)")
        n = self.on_loop(lambda: self.drop_lease(lease_id))
        if n is None:
            raise PageNotFound(f"no lease {lease_id} (expired or released)")
        return Reply({"released": n})

    def drop_lease(self, lease_id: int) -> int | None:
        lease = self.pool._leases.pop(lease_id, None)
        if lease is None:
            return None
        lease.timer.cancel()
        for p in lease.pages:
            p.release()
        return len(lease.pages)

    def _expire_lease(self, lease_id: int) -> None:
        if self.drop_lease(lease_id) is not None:
            self.pool.counters["cluster_rdma_leases_expired"] += 1
            log.debug("cluster: RDMA lease %d expired (the fetcher never released it)", lease_id)

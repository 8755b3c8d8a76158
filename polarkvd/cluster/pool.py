"""The cluster's pages as this daemon sees them: find them, fetch them, lend and borrow DRAM.

Owns the data side of cluster membership:
- the meta map traffic (`metamap.MetaMap`): our own pages announced to their owners, owners'
  answers to "where are these keys" queries;
- the peer service on `cluster.data_address` (`transport.tcp.PeerServer`): ops `where`,
  `announce`, `get` (pages out of our DRAM or the DMP region we lend) and `put` (a peer demotes a
  page into our DMP region);
- the client side (`transport.tcp.PeerClient`): locate a prefix in the cluster, fetch pages
  straight into DRAM slots the manager allocated, demote evicted pages to peers chosen by weighted
  rendezvous hashing over their free pool space.

Threads: the manager, the meta map, the DMP store and membership live on the event loop. Peer
requests arrive on transport threads and hop to the loop for every state change (`_on_loop`);
blocking client calls run in a small thread pool so the loop never waits on the network.
Records are hints: a page that moved or vanished is a miss (the engine recomputes), never wrong
bytes — every page is checked against its checksum, key, namespace and size on arrival.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from polarkvd.cluster import ring
from polarkvd.cluster.membership import Event, EventKind, Member, State
from polarkvd.cluster.metamap import MetaMap, decode_batch, encode_batches
from polarkvd.config import Config, split_address
from polarkvd.errors import ErrorCode, PolarKVError, ProtocolError
from polarkvd.index import READY
from polarkvd.tiers.dmp import DmpStore
from polarkvd.transport.tcp import PayloadReader, PeerClient, PeerServer, Reply, data_key
from polarkvd.types import KEY_BYTES, Tier

if TYPE_CHECKING:
    from polarkvd.cluster.auth import CurveKeys
    from polarkvd.manager import Manager

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_KEYS_PER_CALL = 4096
FETCH_BATCH_PAGES = 8  # pages per `get` call; several calls run in parallel
NET_THREADS = 8
HINT_LIMIT = 65536
ANNOUNCE_BATCH = 64  # meta map messages per `announce` request
LAYER_GROUPS = 8  # a pipelined load fetches remote pages in this many layer groups, first group 1 layer  # remote locations remembered between a lookup and its load


def _keys_arg(value: Any) -> list[bytes]:
    if not isinstance(value, list) or len(value) > MAX_KEYS_PER_CALL:
        raise ProtocolError(f"keys must be a list of at most {MAX_KEYS_PER_CALL} 16-byte keys")
    for k in value:
        if not isinstance(k, bytes) or len(k) != KEY_BYTES:
            raise ProtocolError("every key must be 16 bytes")
    return value


class ClusterPool:
    def __init__(self, cfg: Config, manager: Manager, keys: CurveKeys | None, node_id: str) -> None:
        self.cfg = cfg
        self.c = cfg.cluster
        self.manager = manager
        self.node_id = node_id
        self.loop = asyncio.get_running_loop()
        secret = data_key(keys.secret) if keys is not None else None
        self.metamap = MetaMap(node_id)
        self.dmp = DmpStore(self.c.dmp_bytes, cfg.dram.slab_bytes) if self.c.dmp_bytes > 0 else None
        host, port = split_address(self.c.data_address)
        self.server = PeerServer(
            host,
            port,
            key=secret,
            handlers={
                "where": self._h_where,
                "announce": self._h_announce,
                "get": self._h_get,
                "put": self._h_put,
            },
        )
        self.client = PeerClient(key=secret, timeout=self.c.fetch_timeout)
        self.net = concurrent.futures.ThreadPoolExecutor(NET_THREADS, thread_name_prefix="polarkv-net")
        self.members: dict[str, Member] = {}  # alive members other than us, by node id
        self.suspects: set[str] = set()
        self.hints: dict[bytes, tuple[str, ...]] = {}  # key -> holders, from recent lookups
        self.counters = manager.counters
        self.fetch_batch = FETCH_BATCH_PAGES
        self.layer_groups = LAYER_GROUPS
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Bind the peer service; returns the data address to advertise (host from gossip's)."""
        self.server.start()
        self._flusher = asyncio.create_task(self._flush_loop(), name="metamap-flush")
        self.metamap.set_members([self.node_id], time.monotonic())
        return self.server.address

    async def stop(self) -> None:
        self._closing = True
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.loop.run_in_executor(None, self.server.close)
        self.client.close()
        self.net.shutdown(wait=False, cancel_futures=True)
        if self.dmp is not None:
            self.dmp.close()

    def space(self) -> dict[str, tuple[int, int]]:
        return {"dmp": (self.dmp.used_bytes, self.dmp.capacity) if self.dmp is not None else (0, 0)}

    # ------------------------------------------------------------------ membership

    def on_members(self, alive: list[Member], events: list[Event]) -> None:
        self.members = {m.node: m for m in alive if m.node != self.node_id and self._data_addr(m)}
        # a suspect may be gone: lookups do not wait for it (its keys are misses until it is
        # alive again or dead and its keys re-owned); it stays an owner, so nothing moves meanwhile
        self.suspects = {m.node for m in alive if m.state == State.SUSPECT}
        self.metamap.set_members([self.node_id, *self.members], time.monotonic())
        for ev in events:
            if ev.kind in (EventKind.DEAD, EventKind.LEFT):
                addr = ev.meta.get("data") if isinstance(ev.meta, dict) else None
                if isinstance(addr, str) and addr:
                    self.net.submit(self.client.forget, addr)
                gone = ev.node
                for k in [k for k, h in self.hints.items() if gone in h]:
                    del self.hints[k]

    @staticmethod
    def _data_addr(m: Member) -> str | None:
        addr = m.meta.get("data") if isinstance(m.meta, dict) else None
        return addr if isinstance(addr, str) and addr.startswith("tcp://") else None

    # ------------------------------------------------------------------ our pages -> the meta map

    def page_added(self, key: bytes, tier: Tier) -> None:
        self.metamap.local_stored(key, int(tier), time.monotonic())

    def page_removed(self, key: bytes, tier: Tier) -> None:
        """A copy left `tier`; the meta map keeps us as a holder while another tier here has it."""
        self.metamap.local_removed(key, time.monotonic(), tier=int(tier))

    async def _flush_loop(self) -> None:
        """Send due announcements; one round at a time, so each owner gets them in order."""
        while True:
            try:
                sends = []
                for dest, msgs in self.metamap.take_outgoing(time.monotonic()).items():
                    member = self.members.get(dest)
                    addr = self._data_addr(member) if member else None
                    if addr is not None:
                        sends.append(self._announce(dest, addr, msgs))
                if sends:
                    await asyncio.gather(*sends)
            except Exception:
                log.exception("cluster: meta map flush failed (continuing)")
            delay = min(max(self.metamap.next_deadline() - time.monotonic(), 0.001), 0.05)
            await asyncio.sleep(delay)

    async def _announce(self, dest: str, addr: str, msgs: list[Any]) -> None:
        """Send one owner its batches in order; what a failed send carried is queued again (as it
        stands then), so a lost announcement costs a delay, not a permanently unknown page."""
        sent = 0
        for batch in encode_batches(msgs, ANNOUNCE_BATCH):
            try:
                await self._call(
                    addr, "announce", {"from": self.node_id, "batch": batch}, self.c.fetch_timeout
                )
            except (PolarKVError, OSError, asyncio.TimeoutError) as e:
                self.counters["cluster_announce_failures"] += 1
                log.debug("cluster: announcement to %s failed (queued again): %r", dest, e)
                self.metamap.requeue(dest, msgs[sent:], time.monotonic())
                return
            sent += ANNOUNCE_BATCH

    # ------------------------------------------------------------------ engine lookups

    async def locate(self, keys: Sequence[bytes]) -> list[tuple[str, ...]]:
        """Holders (other members) of the longest prefix of `keys` the cluster has; [] when none."""
        if not keys or not self.members:
            return []
        keys = list(keys)
        plan = self.metamap.plan(keys)
        answers: dict[int, tuple[str, ...]] = {}
        calls = []
        for owner, idx in plan.items():
            if owner == self.node_id:
                for i, holders in zip(idx, self.metamap.locate([keys[i] for i in idx])):
                    answers[i] = holders
                continue
            member = self.members.get(owner)
            addr = self._data_addr(member) if member else None
            if addr is None or owner in self.suspects:
                continue
            calls.append(
                (idx, self._call(addr, "where", {"keys": [keys[i] for i in idx]}, self.c.lookup_timeout))
            )
        if calls:
            results = await asyncio.gather(*(c for _, c in calls), return_exceptions=True)
            for (idx, _), res in zip(calls, results):
                if isinstance(res, BaseException):
                    self.counters["cluster_where_failures"] += 1
                    continue
                holders = res[0].get("holders")
                if isinstance(holders, list) and len(holders) == len(idx):
                    for i, h in zip(idx, holders):
                        if isinstance(h, list):
                            answers[i] = tuple(x for x in h if isinstance(x, str))
        found = MetaMap.longest_prefix(len(keys), answers, exclude=self.node_id)
        found = [tuple(h for h in hs if h in self.members and h not in self.suspects) for hs in found]
        n = 0
        while n < len(found) and found[n]:
            n += 1
        found = found[:n]
        if len(self.hints) + n > HINT_LIMIT:
            self.hints.clear()
        for k, hs in zip(keys, found):
            self.hints[k] = hs
        return found

    async def _call(
        self, addr: str, op: str, args: dict[str, Any], timeout: float, **kw: Any
    ) -> tuple[dict[str, Any], list[bool]]:
        fut = self.loop.run_in_executor(
            self.net, lambda: self.client.call(addr, op, args, timeout=timeout, **kw)
        )
        return await asyncio.wait_for(fut, timeout + 0.5)

    # ------------------------------------------------------------------ fetch into our DRAM

    async def fetch(
        self,
        holder: str,
        ns: bytes,
        keys: list[bytes],
        views: list[memoryview],
        layers: tuple[int, int, int] | None = None,
        sums: list[int | None] | None = None,
    ) -> list[bytes | None | bool]:
        """Pull pages from `holder` straight into `views`. Per key: its parent key (or None at a
        chain root) when the bytes arrived verified, False when they did not. With `layers` =
        (lo, hi, layer_bytes), only that slice of each page (layer-major pages: contiguous). `sums`
        receives the verified xxh3_64 of each payload (None where it failed)."""
        member = self.members.get(holder)
        addr = self._data_addr(member) if member else None
        if addr is None:
            return [False] * len(keys)
        out: list[bytes | None | bool] = [False] * len(keys)
        got: dict[str, Any] = {}

        def into(header: dict[str, Any]) -> list[memoryview | None]:
            sizes = header.get("sizes")
            if not isinstance(sizes, list) or len(sizes) > len(views):
                raise ProtocolError("bad get reply")
            got["n"] = len(sizes)
            return [v if s == len(v) else None for v, s in zip(views, sizes)]

        try:
            args: dict[str, Any] = {"ns": ns, "keys": keys}
            if layers is not None:
                args["layers"] = list(layers)
            header, ok = await self._call(addr, "get", args, self.c.fetch_timeout, into=into, sums_out=sums)
        except (PolarKVError, OSError, asyncio.TimeoutError) as e:
            self.counters["cluster_fetch_failures"] += 1
            log.debug("cluster: fetch of %d pages from %s failed: %r", len(keys), holder, e)
            return out
        parents = header.get("parents") or []
        for i, verified in enumerate(ok):
            if i >= len(parents):
                break
            if not verified:
                self.counters["cluster_corrupt_pages"] += 1
                break  # a prefix: nothing after a bad page is used
            p = parents[i]
            out[i] = p if isinstance(p, bytes) and len(p) == KEY_BYTES else None
        return out

    # ------------------------------------------------------------------ demote to peers' DMP

    def demote_targets(self, key: bytes, size: int) -> list[str]:
        weights = {}
        for node, m in self.members.items():
            dmp = m.meta.get("dmp") if isinstance(m.meta, dict) else None
            if isinstance(dmp, list) and len(dmp) == 2 and all(isinstance(x, int) for x in dmp):
                free = dmp[1] - dmp[0]
                if free >= size or dmp[1] >= 4 * size:  # full pools evict their own LRU pages
                    weights[node] = float(max(free, size))
        return ring.place(key, weights, self.c.replicas) if weights else []

    async def demote(
        self, ns: bytes, key: bytes, parent: bytes | None, data: bytes, targets: list[str]
    ) -> int:
        """Send one evicted page to the peers chosen; returns how many took it."""
        stored = 0
        for node in targets:
            member = self.members.get(node)
            addr = self._data_addr(member) if member else None
            if addr is None:
                continue
            try:
                header, _ = await self._call(
                    addr,
                    "put",
                    {"ns": ns, "keys": [key], "parents": [parent]},
                    self.c.fetch_timeout,
                    payloads=[data],
                )
            except (PolarKVError, OSError, asyncio.TimeoutError) as e:
                self.counters["cluster_demote_failures"] += 1
                log.debug("cluster: demotion of %s to %s failed: %r", key.hex(), node, e)
                continue
            if header.get("stored") == 1:
                stored += 1
        return stored

    # ------------------------------------------------------------------ the peer service (transport threads)

    def _on_loop(self, fn: Callable[[], T]) -> T:
        if self._closing:
            raise PolarKVError("daemon stopping", code=ErrorCode.UNAVAILABLE)
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                fut.set_exception(e)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout=30)

    def _h_where(self, args: dict[str, Any], payload: PayloadReader) -> Reply:
        keys = _keys_arg(args.get("keys"))
        holders = self._on_loop(lambda: self.metamap.locate(keys))
        return Reply({"holders": [list(h) for h in holders]})

    def _h_announce(self, args: dict[str, Any], payload: PayloadReader) -> Reply:
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
                self.metamap.on_message(src, msg, now)

        self._on_loop(apply)
        return Reply({})

    def _h_get(self, args: dict[str, Any], payload: PayloadReader) -> Reply:
        keys = _keys_arg(args.get("keys"))
        ns = args.get("ns")
        if not isinstance(ns, bytes):
            raise ProtocolError("get needs ns (namespace digest)")
        layers = args.get("layers")
        if layers is not None:
            if (
                not isinstance(layers, list)
                or len(layers) != 3
                or not all(type(x) is int for x in layers)
                or not 0 <= layers[0] < layers[1]
                or layers[2] <= 0
            ):
                raise ProtocolError("layers must be [first, end, layer_bytes] with 0 <= first < end")
        return self._on_loop(lambda: self._pin_for_send(ns, keys, layers))

    def _pin_for_send(self, ns: bytes, keys: list[bytes], layers: list[int] | None = None) -> Reply:
        """Pin the longest prefix of `keys` we hold (DRAM first, then the lent DMP region); with
        `layers`, send only that layer slice of each page (pages whose size does not fit stop it)."""
        m = self.manager
        views: list[memoryview] = []
        parents: list[bytes | None] = []
        release: list[Callable[[], None]] = []
        holders: list[Any] = []  # the Page or DmpEntry of each view: keeps its checksum
        for key in keys:
            page = m.index.get(key)
            if page is not None and page.state == READY and m.namespace_digest(page.ns) == ns:
                page.pins += 1
                views.append(m.arena[page.offset : page.offset + page.size])
                parents.append(page.parent)
                release.append(lambda p=page: m.unpin_page(p))
                holders.append(page)
                continue
            entry = self.dmp.get(key) if self.dmp is not None else None
            if entry is not None and entry.ns == ns:
                views.append(self.dmp.pin(entry))
                parents.append(entry.parent)
                release.append(lambda e=entry: self.dmp.unpin(e))  # type: ignore[union-attr]
                holders.append(entry)
                continue
            break
        if layers is not None:
            lo, hi, lb = layers
            n = next((i for i, v in enumerate(views) if len(v) % lb or hi * lb > len(v)), len(views))
            for r in release[n:]:
                r()
            views, parents, release = [v[lo * lb : hi * lb] for v in views[:n]], parents[:n], release[:n]
            holders = []  # slices: checksums of whole pages do not apply
        if layers is None or layers[0] == 0:
            self.counters["cluster_served_pages"] += len(views)
        self.counters["cluster_served_bytes"] += sum(len(v) for v in views)

        # checksums known from earlier sends or arrivals; the transport hashes the rest into this
        # list as it sends, and they are kept for the next time
        sums: list[int | None] | None = [h.checksum for h in holders] if holders else None

        def on_sent() -> None:
            def unpin() -> None:
                for h, c in zip(holders, sums or ()):
                    if h.checksum is None and c is not None:
                        h.checksum = c
                for r in release:
                    r()

            self.loop.call_soon_threadsafe(unpin)

        return Reply({"sizes": [len(v) for v in views], "parents": parents}, views, on_sent, sums)

    def _h_put(self, args: dict[str, Any], payload: PayloadReader) -> Reply:
        if self.dmp is None:
            raise PolarKVError("this member lends no DRAM (cluster.dmp_bytes = 0)", code=ErrorCode.NO_SPACE)
        keys = _keys_arg(args.get("keys"))
        ns, parents = args.get("ns"), args.get("parents")
        if not isinstance(ns, bytes) or not isinstance(parents, list) or len(parents) != len(keys):
            raise ProtocolError("put needs ns and one parent (16-byte key or nil) per key")
        if len(payload.sizes) != len(keys):
            raise ProtocolError("put needs one payload per key")
        for p in parents:
            if p is not None and (not isinstance(p, bytes) or len(p) != KEY_BYTES):
                raise ProtocolError("every parent must be a 16-byte key or nil")
        dmp = self.dmp

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
                    self.page_removed(k, Tier.DMP)
                out.append(entry)
            return out

        entries = self._on_loop(reserve)
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
                    self.page_added(entry.key, Tier.DMP)
                    n += 1
                else:
                    dmp.abort(entry)
            return n

        stored = self._on_loop(finish)
        self.counters["cluster_lent_pages"] += stored
        return Reply({"stored": stored})

    # ------------------------------------------------------------------ report

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metamap": self.metamap.stats(), "transport": dict(self.server.stats)}
        if self.dmp is not None:
            out["dmp"] = {
                "pages": len(self.dmp),
                "bytes": self.dmp.ready_bytes,
                "used_bytes": self.dmp.used_bytes,
                "capacity_bytes": self.dmp.capacity,
                **self.dmp.stats,
            }
        return out

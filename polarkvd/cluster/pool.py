"""The cluster's pages as this daemon sees them: find them, fetch them, lend and borrow DRAM.

Owns the data side of cluster membership:
- the meta map traffic (`metamap.MetaMap`): our own pages announced to their owners, owners'
  answers to "where are these keys" queries;
- the peer service on `cluster.data_address` (`transport.tcp.PeerServer`): ops `where`,
  `announce`, `get` (pages out of our DRAM or the DMP region we lend) and `put` (a peer demotes a
  page into our DMP region), and for RDMA `rdma_connect` (a queue pair for a peer), `pin` (pin pages
  under a lease that expires on its own, and say where they are) and `unpin`;
- the client side (`transport.tcp.PeerClient`): locate a prefix in the cluster, fetch pages
  straight into DRAM slots the manager allocated, demote evicted pages to peers chosen by weighted
  rendezvous hashing over their free pool space;
- the RDMA page path (docs/RDMA.md): the device opened at start with the DRAM arena and the DMP
  region registered (or TCP, with the reason, when that fails), one queue pair per peer, fetches
  as pin + one-sided READs + checksum check + unpin, and any RDMA failure answered by the same
  fetch over TCP at once (`transport.rdma.PeerTransports` decides when RDMA is tried again);
- GPUDirect (docs/RDMA.md "GPUDirect"): with an L1 pool, the pool exported as a dma-buf and
  registered as region `vram`, so peers READ our L1 pages straight from GPU memory and our L1
  sessions' remote pages are READ straight into L1 slots (`fetch_into_vram`), their checksums
  computed through a bounded host staging buffer (`tiers.vram.Staging`). Without that region, L1
  pages are moved to DRAM (the manager's demotion path) before they are sent.

Threads: the manager, the meta map, the DMP store and membership live on the event loop. Peer
requests arrive on transport threads and hop to the loop for every state change (`_on_loop`);
blocking client calls run in a small thread pool so the loop never waits on the network.
Records are hints: a page that moved or vanished is a miss (the engine recomputes), never wrong
bytes — every page is checked against its checksum, key, namespace and size on arrival.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import xxhash

from polarkvd.cluster import ring
from polarkvd.cluster.membership import Event, EventKind, Member, State
from polarkvd.cluster.metamap import MetaMap, decode_batch, encode_batches
from polarkvd.config import Config, split_address
from polarkvd.errors import ConfigError, ErrorCode, PageNotFound, PolarKVError, ProtocolError
from polarkvd.index import READY, READY_VRAM
from polarkvd.tiers.dmp import DmpStore
from polarkvd.transport.pipeline import LAYER_GROUPS
from polarkvd.transport.rdma import (
    PageRef,
    PeerTransports,
    RdmaDevice,
    RdmaEndpoint,
    RdmaError,
    RdmaTimeout,
    TransportChoice,
    TransportKind,
    buffer_address,
    plan_reads,
    probe_cluster,
)
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
#: layer-slice checksums kept (per page object and slice): a pipelined fetch asks for the same slices
#: of the same pages every time, and hashing them is most of what sending them costs the holder
SLICE_SUM_LIMIT = 65536
ANNOUNCE_BATCH = 64  # meta map messages per `announce` request
MAX_ACCEPTED_QPS = 64  # queue pairs this holder keeps for requesters (one per requesting member)
MAX_RDMA_LEASES = 4096  # open pin leases; a pin beyond this is refused (`too_large`)
MAX_NODE_ID = 255


def rdma_lease_seconds(fetch_timeout: float) -> float:
    """How long a `pin` lease lives at most: a fetcher gives up on its READs within fetch_timeout
    (and destroys its queue pair, so nothing is read later), so twice that plus a margin is safe."""
    return 2 * fetch_timeout + 1.0


@dataclasses.dataclass
class _Pinned:
    """One page pinned for a peer: where it is here, and how to let it go."""

    key: bytes
    region: str  # "dram" (the arena), "dmp" (the region we lend) or "vram" (the L1 pool, GPUDirect)
    offset: int  # of the whole page in that region
    size: int  # of the whole page
    parent: bytes | None
    holder: Any  # the Page or DmpEntry (keeps the page's checksum)
    release: Callable[[], None]
    view: memoryview | None  # the whole page, or the layer slice asked for (None in L1: no host view)
    span: tuple[int, int] = (0, 0)  # in L1: (pool offset, length) of what is sent

    @property
    def nbytes(self) -> int:
        return len(self.view) if self.view is not None else self.span[1]


def _release_all(pinned: Sequence[_Pinned]) -> None:
    for p in pinned:
        p.release()


@dataclasses.dataclass
class _Dest:
    """Where a fetch over RDMA lands: a local registered region, each page's slot start in it,
    the bytes each page receives, and how to hash what landed (first n pages)."""

    region: str
    slots: list[int]
    lengths: list[int]
    digest: Callable[[int], list[int]]


@dataclasses.dataclass
class _Lease:
    pages: list[_Pinned]
    timer: asyncio.TimerHandle


class _Fallback(Exception):
    """The RDMA attempt did not deliver; fetch the same pages over TCP. `failure` says whether it
    counts against the peer's RDMA (back-off) or was only not applicable (our views not in the arena)."""

    def __init__(self, why: str, failure: bool = True) -> None:
        super().__init__(why)
        self.failure = failure


def _layers_arg(layers: Any) -> list[int] | None:
    if layers is None:
        return None
    if (
        not isinstance(layers, list)
        or len(layers) != 3
        or not all(type(x) is int for x in layers)
        or not 0 <= layers[0] < layers[1]
        or layers[2] <= 0
    ):
        raise ProtocolError("layers must be [first, end, layer_bytes] with 0 <= first < end")
    return layers


def _keys_arg(value: Any) -> list[bytes]:
    if not isinstance(value, list) or len(value) > MAX_KEYS_PER_CALL:
        raise ProtocolError(f"keys must be a list of at most {MAX_KEYS_PER_CALL} 16-byte keys")
    for k in value:
        if not isinstance(k, bytes) or len(k) != KEY_BYTES:
            raise ProtocolError("every key must be 16 bytes")
    return value


class ClusterPool:
    def __init__(
        self,
        cfg: Config,
        manager: Manager,
        keys: CurveKeys | None,
        node_id: str,
        transport: TransportChoice | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`transport`: the daemon's probe result (`transport.rdma.probe_cluster`); None probes again
        at `start`. `clock` times the per-peer RDMA back-off."""
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
                "rdma_connect": self._h_rdma_connect,
                "pin": self._h_pin,
                "unpin": self._h_unpin,
            },
        )
        self.client = PeerClient(key=secret, timeout=self.c.fetch_timeout)
        self.net = concurrent.futures.ThreadPoolExecutor(NET_THREADS, thread_name_prefix="polarkv-net")
        self.members: dict[str, Member] = {}  # alive members other than us, by node id
        self.suspects: set[str] = set()
        self.hints: dict[bytes, tuple[str, ...]] = {}  # key -> holders, from recent lookups
        self._slice_sums: dict[tuple[bytes, int, int], tuple[Any, int]] = {}  # see _known_sums
        self.counters = manager.counters
        self.fetch_batch = FETCH_BATCH_PAGES
        self.layer_groups = LAYER_GROUPS
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        # RDMA (docs/RDMA.md): None/TCP until `start` opened the device
        self.choice = transport
        self.clock = clock
        self.rdma: RdmaDevice | None = None
        self.rdma_epoch = secrets.token_hex(8)  # a restarted device is a new epoch: peers reconnect
        self.transports = PeerTransports(TransportChoice(TransportKind.TCP, "not started"), clock=clock)
        self._endpoints: dict[str, tuple[RdmaEndpoint, str]] = {}  # holder -> (QP, its epoch)
        self._ep_locks: dict[str, threading.Lock] = {}  # one connect at a time per holder
        self._accepted: collections.OrderedDict[str, RdmaEndpoint] = collections.OrderedDict()
        self._rdma_lock = threading.Lock()  # guards _endpoints and _accepted
        self._leases: dict[int, _Lease] = {}
        self._lease_ids = itertools.count(1)
        self.lease_seconds = rdma_lease_seconds(self.c.fetch_timeout)
        self.last_fallback = ""
        # GPUDirect: the L1 pool registered as region "vram", or why not (said once at start)
        self.staging: Any = None  # tiers.vram.Staging while the region is registered
        self.vram_reason = "no L1 pool" if manager.vram is None else "RDMA is off"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Open the RDMA device when RDMA was chosen, bind the peer service; returns the data address
        to advertise (host from gossip's)."""
        self._open_rdma()
        self.server.start()
        self._flusher = asyncio.create_task(self._flush_loop(), name="metamap-flush")
        self.metamap.set_members([self.node_id], time.monotonic())
        if self.manager.disk is not None:  # peers can have our disk pages too (promoted here, then sent)
            for digest in list(self.manager.namespaces):
                self.announce_disk_pages(digest)
        # pages leaving our disk: the manager owns DiskTier.on_removed and calls `disk_removed`
        return self.server.address

    def announce_disk_pages(self, ns_digest: bytes) -> None:
        """Announce the pages of one namespace on our disk tier (held on disk). Called when the
        namespace becomes known here (an engine attached): before that, a peer's `get` could not be
        served from disk (the page geometry comes with the namespace), so they are not announced.
        Pages written to disk later are announced as they are written. The disk index is scanned on
        a worker thread (it can hold millions of pages); the meta map is updated on the loop."""
        disk = self.manager.disk
        if disk is None:
            return

        def scan() -> list[bytes]:
            return disk.keys_of(ns_digest)

        def announce(f: asyncio.Future[list[bytes]]) -> None:
            if f.cancelled() or f.exception() is not None or self._closing:
                return
            now = time.monotonic()
            for key in f.result():
                if disk.entry(key) is not None:  # still there
                    self.metamap.local_stored(key, int(Tier.DISK), now)

        self.loop.run_in_executor(None, scan).add_done_callback(announce)

    def disk_removed(self, keys: list[bytes]) -> None:
        """The disk tier dropped pages (any thread; forwarded by the manager, which owns
        `DiskTier.on_removed`): withdraw their disk copies from the meta map."""
        if self._closing:
            return

        def withdraw() -> None:
            now = time.monotonic()
            for key in keys:
                self.metamap.local_removed(key, now, tier=int(Tier.DISK))

        try:
            self.loop.call_soon_threadsafe(withdraw)
        except RuntimeError:  # the loop is closed: the daemon is gone, and so is our membership
            pass

    def _open_rdma(self) -> None:
        """RDMA needs the device open and the arena and the DMP region registered for remote READ.
        When that fails: `auto` logs why and stays on TCP; `rdma` refuses to start (exit 78)."""
        choice = self.choice if self.choice is not None else probe_cluster(self.c)
        if choice.kind is TransportKind.RDMA:
            try:
                dev = RdmaDevice(choice, pyverbs_path=self.c.pyverbs_path)
                try:
                    dev.register_buffer("dram", self.manager.arena[: self.manager.allocator.capacity])
                    if self.dmp is not None:
                        dev.register_buffer("dmp", self.dmp.view)
                except BaseException:
                    dev.close()
                    raise
                self.rdma = dev
                log.info(
                    "cluster: RDMA on %s port %s: DRAM arena%s registered for remote READ",
                    choice.device, choice.port, " and lent DMP region" if self.dmp is not None else "",
                )  # fmt: skip
                self._register_vram(dev)
            except (RdmaError, ValueError, OSError) as e:
                if choice.setting == "rdma":
                    raise ConfigError(
                        [("cluster.transport", "rdma", f"RDMA is not usable here: {e}")]
                    ) from None
                log.warning("cluster: cannot use RDMA (%s); pages move over TCP", e)
                choice = TransportChoice(TransportKind.TCP, f"opening the device failed: {e}", choice.setting)
        self.choice = choice
        self.transports = PeerTransports(choice, clock=self.clock)

    def _register_vram(self, dev: RdmaDevice) -> None:
        """GPUDirect: the L1 pool as RDMA region "vram" (a dma-buf exported by the CUDA driver),
        readable by peers and writable by our own READs. Anything that stops it (runtime API, an
        old driver, a GPU or kernel without dma-buf, a NIC or pyverbs without dma-buf registration)
        is logged once with the reason; L1 and RDMA into DRAM work on regardless."""
        pool = self.manager.vram
        if pool is None:
            return
        from polarkvd.cuda import CudaError
        from polarkvd.tiers.vram import Staging

        try:
            fd = pool.export_dmabuf()
            try:
                dev.register_dmabuf("vram", fd, pool.capacity)
            finally:
                os.close(fd)  # the registration holds its own reference to the dma-buf
            try:
                self.staging = Staging(pool)
            except BaseException:
                dev.deregister("vram")
                raise
        except (CudaError, RdmaError, OSError, ValueError) as e:
            self.vram_reason = f"not registered: {e}"
            log.warning(
                "cluster: L1 is not RDMA-readable (%s); L1 pages are served through DRAM and remote "
                "pages land in DRAM", e,
            )  # fmt: skip
            return
        self.vram_reason = "registered"
        log.info("cluster: L1 pool (%d bytes) registered for RDMA as a dma-buf (GPUDirect)", pool.capacity)

    def vram_landing(self) -> bool:
        """Whether remote pages can be READ straight into L1 slots (the pool is registered)."""
        return self.staging is not None and self.rdma is not None

    async def stop(self) -> None:
        self._closing = True
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.loop.run_in_executor(None, self.server.close)
        for lease_id in list(self._leases):
            self._drop_lease(lease_id)
        if self.rdma is not None:
            # no READ may still be polling a queue pair when the device goes
            await self.loop.run_in_executor(None, lambda: self.net.shutdown(wait=True, cancel_futures=True))
        self.client.close()
        self.net.shutdown(wait=False, cancel_futures=True)
        if self.staging is not None:  # no user left: the network threads are done
            try:
                self.staging.close()
            except Exception as e:  # noqa: BLE001 - the device and the DMP region still go
                log.error("cluster: closing the L1 staging buffer failed: %s", e)
            self.staging = None
        if self.rdma is not None:
            self.rdma.close()  # before the DMP region, the arena and the L1 pool it registered go
            self.rdma = None
        if self.dmp is not None:
            self.dmp.close()

    def space(self) -> dict[str, tuple[int, int]]:
        return {"dmp": (self.dmp.used_bytes, self.dmp.capacity) if self.dmp is not None else (0, 0)}

    def gossip_meta(self) -> dict[str, Any]:
        """What this pool adds to our gossip metadata: `rdma: 1` while peers may READ from us."""
        return {"rdma": 1} if self.rdma is not None else {}

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
                self._forget_rdma(gone)
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
                got = res[0].get("holders")
                if isinstance(got, list) and len(got) == len(idx):
                    for i, h in zip(idx, got):
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
        receives the verified xxh3_64 of each payload (None where it failed).

        Over RDMA when we and the holder offer it and `transports` allows (then the same pages over
        TCP at once if anything goes wrong), else over TCP; the caller cannot tell but by counters."""
        member = self.members.get(holder)
        addr = self._data_addr(member) if member else None
        if addr is None:
            log.debug("cluster: fetch from %s: not a member now", holder)
            return [False] * len(keys)
        if self.rdma is not None and keys and len(views) >= len(keys):
            offers = member is not None and isinstance(member.meta, dict) and member.meta.get("rdma") == 1
            if self.transports.choose(holder, offers) is TransportKind.RDMA:
                try:
                    dest = self._dram_dest(views[: len(keys)], layers)
                    return await self._fetch_rdma(holder, addr, ns, keys, dest, layers, sums)
                except _Fallback as e:
                    if sums is not None:
                        del sums[:]
                    if e.failure:
                        self._rdma_failed(holder, str(e))
        return await self._fetch_tcp(holder, addr, ns, keys, views, layers, sums)

    async def fetch_into_vram(
        self,
        holder: str,
        ns: bytes,
        keys: list[bytes],
        offsets: list[int],
        page_bytes: int,
        sums: list[int | None] | None = None,
    ) -> list[bytes | None | bool] | None:
        """GPUDirect: READ whole pages from `holder` straight into our L1 pool at `offsets`, verified
        through the staging buffer. Per key its parent (verified) or False, as `fetch`; None when
        it could not be done this way (no registered L1 region, the holder offers no RDMA or is in
        back-off, or the attempt failed: counted and backed off like any RDMA failure), and the
        caller then fetches the same pages into DRAM (over TCP after a failure)."""
        member = self.members.get(holder)
        addr = self._data_addr(member) if member else None
        if addr is None or not keys or not self.vram_landing():
            return None
        offers = member is not None and isinstance(member.meta, dict) and member.meta.get("rdma") == 1
        if self.transports.choose(holder, offers) is not TransportKind.RDMA:
            return None
        lengths = [page_bytes] * len(keys)
        staging = self.staging
        hashed = [0]  # bytes copied to the host to verify (network thread; counted on the loop)

        def digest(n: int) -> list[int]:
            hashed[0] += sum(lengths[:n])
            return staging.checksums([(offsets[i], lengths[i]) for i in range(n)])

        try:
            return await self._fetch_rdma(
                holder, addr, ns, keys, _Dest("vram", list(offsets), lengths, digest), None, sums
            )
        except _Fallback as e:
            if sums is not None:
                del sums[:]
            if e.failure:
                self._rdma_failed(holder, str(e))
            self.counters["cluster_vram_landing_fallbacks"] += 1
            return None
        finally:
            self.counters["cluster_vram_verify_bytes"] += hashed[0]

    def _dram_dest(self, views: list[memoryview], layers: tuple[int, int, int] | None) -> _Dest:
        """Arena slices as an RDMA destination (a view outside the registered arena: not applicable)."""
        assert self.rdma is not None
        local = self.rdma.regions["dram"]
        lo, lb = (layers[0], layers[2]) if layers is not None else (0, 0)
        slots: list[int] = []  # where each page's slot starts in our arena
        for v in views:
            try:
                at = buffer_address(v) - local.base - lo * lb
            except (ValueError, TypeError):
                at = -1
            if at < 0 or at + lo * lb + len(v) > local.length:
                raise _Fallback("destination outside the registered arena", failure=False)
            slots.append(at)
        return _Dest(
            "dram", slots, [len(v) for v in views], lambda n: [xxhash.xxh3_64_intdigest(v) for v in views[:n]]
        )

    def _count_fetched(self, kind: str, lengths: Sequence[int], n: int, layers: Any) -> None:
        if layers is None or layers[0] == 0:
            self.counters[f"cluster_fetched_pages_{kind}"] += n
        self.counters[f"cluster_fetched_bytes_{kind}"] += sum(lengths[:n])

    async def _fetch_tcp(
        self,
        holder: str,
        addr: str,
        ns: bytes,
        keys: list[bytes],
        views: list[memoryview],
        layers: tuple[int, int, int] | None,
        sums: list[int | None] | None,
    ) -> list[bytes | None | bool]:
        out: list[bytes | None | bool] = [False] * len(keys)

        def into(header: dict[str, Any]) -> list[memoryview | None]:
            sizes = header.get("sizes")
            if not isinstance(sizes, list) or len(sizes) > len(views):
                raise ProtocolError("bad get reply")
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
        if len(parents) < len(keys):
            log.debug("cluster: %s holds %d of the %d pages asked for now", holder, len(parents), len(keys))
        n = 0
        for i, verified in enumerate(ok):
            if i >= len(parents):
                break
            if not verified:
                self.counters["cluster_corrupt_pages"] += 1
                break  # a prefix: nothing after a bad page is used
            p = parents[i]
            out[i] = p if isinstance(p, bytes) and len(p) == KEY_BYTES else None
            n += 1
        self._count_fetched("tcp", [len(v) for v in views], n, layers)
        return out

    # ------------------------------------------------------------------ fetch over RDMA

    def _rdma_failed(self, holder: str, why: str) -> None:
        """Drop the queue pair (a new one after the back-off), count, remember why."""
        why = why.removeprefix("rdma: ")
        self._drop_endpoint(holder)
        # parallel fetches that failed together are one failure, not several (no extra doubling)
        if self.transports.choose(holder, True) is TransportKind.RDMA:
            self.transports.failed(holder, why)
        self.counters["cluster_rdma_fallbacks"] += 1
        self.last_fallback = f"{holder}: {why}"

    def _drop_endpoint(self, holder: str) -> None:
        with self._rdma_lock:
            entry = self._endpoints.pop(holder, None)
        if entry is not None:
            self._submit_quietly(entry[0].close)

    def _forget_rdma(self, node: str) -> None:
        """A member died or left: its queue pairs (both directions) go, and its back-off record."""
        self._drop_endpoint(node)
        with self._rdma_lock:
            ep = self._accepted.pop(node, None)
        if ep is not None:
            self._submit_quietly(ep.close)
        self.transports.forget(node)

    def _submit_quietly(self, fn: Callable[[], Any]) -> None:
        try:
            self.net.submit(fn)
        except RuntimeError:  # shutting down: close here
            fn()

    def _endpoint(self, holder: str, addr: str, deadline: float, stale: RdmaEndpoint | None = None) -> tuple[RdmaEndpoint, str]:  # fmt: skip
        """Our connected QP to `holder` (network thread): the one we have, or a new one through
        `rdma_connect` (also when `stale` is the one we have: the holder's device restarted)."""
        assert self.rdma is not None
        with self._rdma_lock:
            lock = self._ep_locks.setdefault(holder, threading.Lock())
        with lock:
            with self._rdma_lock:
                have = self._endpoints.get(holder)
            if have is not None and have[0].broken is None and have[0] is not stale:
                return have
            if have is not None:
                self._drop_endpoint(holder)
            left = deadline - time.monotonic()
            if left <= 0:
                raise RdmaTimeout("rdma: no time left to connect")
            ep = self.rdma.endpoint(timeout=self.c.fetch_timeout)
            try:
                header, _ = self.client.call(
                    addr, "rdma_connect", {"from": self.node_id, "params": ep.local_params()}, timeout=left
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
            with self._rdma_lock:
                self._endpoints[holder] = (ep, epoch)
            return ep, epoch

    async def _fetch_rdma(
        self,
        holder: str,
        addr: str,
        ns: bytes,
        keys: list[bytes],
        dest: _Dest,
        layers: tuple[int, int, int] | None,
        sums: list[int | None] | None,
    ) -> list[bytes | None | bool]:
        """pin -> READ the slices into `dest` -> verify each page's xxh3_64 -> unpin. Raises _Fallback."""
        assert self.rdma is not None
        deadline = time.monotonic() + self.c.fetch_timeout
        lo, hi, lb = layers if layers is not None else (0, 1, 0)
        slots = dest.slots
        lease: int | None = None
        try:
            ep, epoch = await self.loop.run_in_executor(
                self.net, lambda: self._endpoint(holder, addr, deadline)
            )
            args: dict[str, Any] = {"ns": ns, "keys": keys, "seconds": self.lease_seconds}
            if layers is not None:
                args["layers"] = list(layers)
            left = deadline - time.monotonic()
            if left <= 0:
                raise RdmaTimeout("rdma: no time left to pin")
            header, _ = await self._call(addr, "pin", args, left)
            lease = header.get("lease")
            pages = header.get("pages")
            if not isinstance(pages, list) or len(pages) > len(keys):
                raise ProtocolError("bad pin reply: pages")
            if not pages:
                return [False] * len(keys)
            if not isinstance(lease, int) or isinstance(lease, bool):
                raise ProtocolError("bad pin reply: lease")
            if header.get("epoch") != epoch:  # the holder's device was reopened: a new QP, once
                ep, epoch = await self.loop.run_in_executor(
                    self.net, lambda: self._endpoint(holder, addr, deadline, stale=ep)
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
            await self.loop.run_in_executor(
                self.net, lambda: ep.read_ops(ops, region=dest.region, timeout=left)
            )
            n = len(refs)
            got = await self.loop.run_in_executor(self.net, lambda: dest.digest(n))
        except _Fallback:
            raise
        except (PolarKVError, OSError, ValueError, asyncio.TimeoutError) as e:
            raise _Fallback(str(e) or type(e).__name__) from e
        finally:
            if isinstance(lease, int) and not isinstance(lease, bool):
                held = lease
                try:
                    self.net.submit(self._unpin, addr, held)
                except RuntimeError:
                    pass  # shutting down: the lease expires at the holder
        bad = next((i for i, (a, b) in enumerate(zip(got, expect)) if a != b), None)
        if bad is not None:
            self.counters["cluster_corrupt_pages"] += 1
            raise _Fallback(f"page {bad} read over RDMA failed its checksum")
        self.transports.succeeded(holder)
        if sums is not None:
            sums.extend(got)
        self._count_fetched("rdma", dest.lengths, n, layers)
        if dest.region == "vram":
            self._count_fetched("vram_rdma", dest.lengths, n, layers)
        return [*parents, *[False] * (len(keys) - n)]

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
            self.client.call(addr, "unpin", {"lease": lease}, timeout=self.c.fetch_timeout)
        except (PolarKVError, OSError) as e:
            log.debug("cluster: unpin of lease %d at %s failed (it expires): %r", lease, addr, e)

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
        layers = _layers_arg(args.get("layers"))
        from_vram: list[bytes] = []
        self._to_dram_first(ns, keys, vram_ok=False, from_vram=from_vram)
        return self._on_loop(lambda: self._pin_for_send(ns, keys, layers, set(from_vram)))

    def _to_dram_first(
        self, ns: bytes, keys: list[bytes], *, vram_ok: bool, from_vram: list[bytes] | None = None
    ) -> None:
        """Transport thread, before pinning for a peer: when the prefix asked for goes on in our disk
        tier or in L1 (unless `vram_ok`: the peer READs L1 itself), bring those pages into DRAM
        first (waiting at most `fetch_timeout`), so they serve a peer as well as DRAM pages. L1
        pages move through the manager's demotion path (`promote_for_peer`); their keys go to
        `from_vram`. A quick look first: pages all in DRAM (or the lent region, or L1 when
        `vram_ok`) cost no trip to the loop."""
        m = self.manager
        if m.disk is None and m.vram is None:
            return
        get, dmp = m.index.get, self.dmp
        for key in keys:
            page = get(key)
            if not (
                page is not None and (page.state == READY or (vram_ok and page.state == READY_VRAM))
            ) and (dmp is None or dmp.get(key) is None):
                break
        else:
            return
        in_dmp = (lambda k: dmp.get(k) is not None) if dmp is not None else (lambda k: False)
        futs = self._on_loop(
            lambda: m.promote_for_peer(ns, keys, in_dmp, vram_ok=vram_ok, from_vram=from_vram)
        )
        if futs:

            async def arrive() -> None:
                await asyncio.wait(futs, timeout=self.c.fetch_timeout)

            asyncio.run_coroutine_threadsafe(arrive(), self.loop).result(self.c.fetch_timeout + 1)

    def _pin_pages(
        self, ns: bytes, keys: list[bytes], layers: list[int] | None, vram: bool = False
    ) -> list[_Pinned]:
        """Pin the longest prefix of `keys` we hold (DRAM first, then the lent DMP region, and with
        `vram` L1 pages, answered as region "vram"); with `layers`, each view is that layer slice
        (a page whose size does not fit stops the prefix). On the loop. A pinned page is neither
        evicted, demoted nor its slot reused until released."""
        m = self.manager
        out: list[_Pinned] = []
        for key in keys:
            page = m.index.get(key)
            if page is not None and page.state == READY and m.namespace_digest(page.ns) == ns:
                page.pins += 1
                view = m.arena[page.offset : page.offset + page.size]
                out.append(
                    _Pinned(key, "dram", page.offset, page.size, page.parent, page, functools.partial(m.unpin_page, page), view)
                )  # fmt: skip
                continue
            if vram and page is not None and page.state == READY_VRAM and m.namespace_digest(page.ns) == ns:
                page.pins += 1  # an L1 page with pins is never demoted nor freed (manager/l1.py)
                out.append(
                    _Pinned(key, "vram", page.offset, page.size, page.parent, page,
                            functools.partial(m.unpin_page, page), None, (page.offset, page.size))
                )  # fmt: skip
                continue
            dmp = self.dmp
            entry = dmp.get(key) if dmp is not None else None
            if dmp is not None and entry is not None and entry.ns == ns:
                view = dmp.pin(entry)
                out.append(
                    _Pinned(key, "dmp", entry.offset, entry.size, entry.parent, entry,
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

    def _known_sums(self, pinned: list[_Pinned], layers: list[int] | None) -> list[int | None]:
        """The xxh3_64 of what is sent of each pinned page, where known from an earlier send or
        arrival: the page's own (whole pages), or one kept for that layer slice of that very page
        object (a page stored again is a new object: its bytes may differ, its sums start over)."""
        if layers is None:
            return [p.holder.checksum for p in pinned]
        lo, hi = layers[0], layers[1]
        get = self._slice_sums.get
        out: list[int | None] = []
        for p in pinned:
            kept = get((p.key, lo, hi))
            out.append(kept[1] if kept is not None and kept[0] is p.holder else None)
        return out

    def _keep_sums(self, pinned: list[_Pinned], layers: list[int] | None, sums: Sequence[int | None]) -> None:
        """Remember checksums computed while sending, for the next send of the same bytes. Loop only."""
        if layers is None:
            for p, c in zip(pinned, sums):
                if p.holder.checksum is None and c is not None:
                    p.holder.checksum = c
            return
        kept = self._slice_sums
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
        """`get`: pin what we hold of `keys`, send it, unpin once sent. `from_vram`: keys that were
        in L1 when asked for (moved to DRAM for this), counted as served from L1 over TCP."""
        pinned = self._pin_pages(ns, keys, layers)
        views = [p.view for p in pinned if p.view is not None]  # no vram here: every page has a view
        parents = [p.parent for p in pinned]
        if layers is None or layers[0] == 0:
            self.counters["cluster_served_pages"] += len(views)
        self.counters["cluster_served_bytes"] += sum(p.nbytes for p in pinned)
        if from_vram:
            was = [p for p in pinned if p.key in from_vram]
            if layers is None or layers[0] == 0:
                self.counters["cluster_served_pages_vram_tcp"] += len(was)
            self.counters["cluster_served_bytes_vram_tcp"] += sum(p.nbytes for p in was)

        # checksums known from earlier sends or arrivals; the transport hashes the rest into this
        # list as it sends, and they are kept for the next time
        sums: list[int | None] = self._known_sums(pinned, layers)

        def on_sent() -> None:
            def unpin() -> None:
                self._keep_sums(pinned, layers, sums)
                for p in pinned:
                    p.release()

            self.loop.call_soon_threadsafe(unpin)

        return Reply({"sizes": [len(v) for v in views], "parents": parents}, views, on_sent, sums)

    # ------------------------------------------------------------------ the peer service: RDMA

    def _need_rdma(self) -> RdmaDevice:
        if self.rdma is None:
            why = self.choice.reason if self.choice is not None else "not started"
            raise PolarKVError(f"this member does not offer RDMA ({why})", code=ErrorCode.UNAVAILABLE)
        return self.rdma

    def _h_rdma_connect(self, args: dict[str, Any], payload: PayloadReader) -> Reply:
        """A requester's QP parameters in, ours out (one QP per requesting member: a new connect from
        the same member replaces its old QP)."""
        dev = self._need_rdma()
        src = args.get("from")
        if not isinstance(src, str) or not 1 <= len(src) <= MAX_NODE_ID:
            raise ProtocolError("rdma_connect needs from (the requester's node id)")
        ep, params = dev.accept(args.get("params"), timeout=self.c.fetch_timeout)  # bad params: bad_request
        with self._rdma_lock:
            old = [self._accepted.pop(src, None)]
            self._accepted[src] = ep
            while len(self._accepted) > MAX_ACCEPTED_QPS:
                old.append(self._accepted.popitem(last=False)[1])
        for o in old:
            if o is not None:
                o.close()
        self.counters["cluster_rdma_accepted"] += 1
        return Reply({"params": params, "epoch": self.rdma_epoch})

    def _h_pin(self, args: dict[str, Any], payload: PayloadReader) -> Reply:
        """Pin the longest held prefix of `keys` under a lease; per page where it is (region, offset,
        size), its checksum (of the layer slice with `layers`) and parent."""
        self._need_rdma()
        keys = _keys_arg(args.get("keys"))
        ns = args.get("ns")
        if not isinstance(ns, bytes):
            raise ProtocolError("pin needs ns (namespace digest)")
        layers = _layers_arg(args.get("layers"))
        seconds = args.get("seconds", self.lease_seconds)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise ProtocolError("seconds must be a positive number")
        seconds = min(float(seconds), self.lease_seconds)
        if len(self._leases) >= MAX_RDMA_LEASES:
            raise PolarKVError(f"over {MAX_RDMA_LEASES} open leases", code=ErrorCode.TOO_LARGE)
        vram = self.staging is not None  # L1 is READ in place: region "vram"
        self._to_dram_first(ns, keys, vram_ok=vram)
        pinned = self._on_loop(lambda: self._pin_pages(ns, keys, layers, vram))
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
                got = self.staging.checksums([pinned[i].span for i in todo])
                for i, c in zip(todo, got):
                    sums[i] = c
            hashed = sum(pinned[i].span[1] for i in todo)
        except BaseException:
            self.loop.call_soon_threadsafe(_release_all, pinned)
            raise

        def lease() -> int | None:
            self._keep_sums(pinned, layers, sums)  # for the next time
            self.counters["cluster_vram_verify_bytes"] += hashed
            in_vram = [p for p in pinned if p.region == "vram"]
            if layers is None or layers[0] == 0:
                self.counters["cluster_served_pages"] += len(pinned)
                self.counters["cluster_rdma_served_pages"] += len(pinned)
                self.counters["cluster_served_pages_vram_rdma"] += len(in_vram)
            served = sum(p.nbytes for p in pinned)
            self.counters["cluster_served_bytes"] += served
            self.counters["cluster_rdma_served_bytes"] += served
            self.counters["cluster_served_bytes_vram_rdma"] += sum(p.nbytes for p in in_vram)
            if not pinned:
                return None
            lease_id = next(self._lease_ids)
            timer = self.loop.call_later(seconds, self._expire_lease, lease_id)
            self._leases[lease_id] = _Lease(pinned, timer)
            return lease_id

        lease_id = self._on_loop(lease)
        return Reply(
            {
                "lease": lease_id,
                "epoch": self.rdma_epoch,
                "pages": [[p.region, p.offset, p.size, c, p.parent] for p, c in zip(pinned, sums)],
            }
        )

    def _h_unpin(self, args: dict[str, Any], payload: PayloadReader) -> Reply:
        self._need_rdma()
        lease_id = args.get("lease")
        if isinstance(lease_id, bool) or not isinstance(lease_id, int):
            raise ProtocolError("unpin needs lease (an integer)")
        n = self._on_loop(lambda: self._drop_lease(lease_id))
        if n is None:
            raise PageNotFound(f"no lease {lease_id} (expired or released)")
        return Reply({"released": n})

    def _drop_lease(self, lease_id: int) -> int | None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return None
        lease.timer.cancel()
        for p in lease.pages:
            p.release()
        return len(lease.pages)

    def _expire_lease(self, lease_id: int) -> None:
        if self._drop_lease(lease_id) is not None:
            self.counters["cluster_rdma_leases_expired"] += 1
            log.debug("cluster: RDMA lease %d expired (the fetcher never released it)", lease_id)

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
        c = self.counters
        out: dict[str, Any] = {
            "metamap": self.metamap.stats(),
            "transport": dict(self.server.stats),
            "fetched": {
                kind: {
                    "pages": c[f"cluster_fetched_pages_{kind}"],
                    "bytes": c[f"cluster_fetched_bytes_{kind}"],
                }
                for kind in ("rdma", "tcp")
            },
            # L1 traffic (GPUDirect): pages READ into our L1, and our L1 pages served per transport
            # (rdma: READ by peers from region "vram"; tcp: moved to DRAM and sent by `get`)
            "vram": {
                "fetched": {
                    "rdma": {
                        "pages": c["cluster_fetched_pages_vram_rdma"],
                        "bytes": c["cluster_fetched_bytes_vram_rdma"],
                    }
                },
                "served": {
                    kind: {
                        "pages": c[f"cluster_served_pages_vram_{kind}"],
                        "bytes": c[f"cluster_served_bytes_vram_{kind}"],
                    }
                    for kind in ("rdma", "tcp")
                },
                "landing_fallbacks": c["cluster_vram_landing_fallbacks"],
                "verify_bytes": c["cluster_vram_verify_bytes"],
            },
            "rdma": self.rdma_report(),
        }
        if self.dmp is not None:
            out["dmp"] = {
                "pages": len(self.dmp),
                "bytes": self.dmp.ready_bytes,
                "used_bytes": self.dmp.used_bytes,
                "capacity_bytes": self.dmp.capacity,
                **self.dmp.stats,
            }
        return out

    def rdma_report(self) -> dict[str, Any]:
        """The RDMA side of `status --cluster --json`: on or off and why, queue pairs, leases, the
        per-peer back-off, fallbacks to TCP and the last reason."""
        dev = self.rdma
        with self._rdma_lock:
            endpoints, accepted = sorted(self._endpoints), sorted(self._accepted)
        return {
            "enabled": dev is not None,
            "reason": self.choice.reason if self.choice is not None else "not started",
            "device": f"{dev.name} port {dev.port}" if dev is not None else None,
            "regions": {r.name: r.length for r in dev.regions.values()} if dev is not None else {},
            "connected_to": endpoints,
            "accepted_from": accepted,
            "leases": len(self._leases),
            "lease_seconds": self.lease_seconds,
            "backoff": self.transports.report(),
            "fallbacks": self.counters["cluster_rdma_fallbacks"],
            "last_fallback": self.last_fallback,
            "vram": {"registered": self.staging is not None, "reason": self.vram_reason},
        }

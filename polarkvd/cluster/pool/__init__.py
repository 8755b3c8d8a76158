"""The cluster's pages as this daemon sees them: find them, fetch them, lend and borrow DRAM.

Owns the data side of cluster membership:
- the meta map traffic (`metamap.MetaMap`): our own pages announced to their owners, owners'
  answers to "where are these keys" queries;
- the peer service on `cluster.data_address` (`transport.peer_server.PeerServer`): ops `where`,
  `announce`, `get` (pages out of our DRAM or the DMP region we lend) and `put` (a peer demotes a
  page into our DMP region), and for RDMA `rdma_connect` (a queue pair for a peer), `pin` (pin pages
  under a lease that expires on its own, and say where they are) and `unpin`;
- the client side (`transport.peer_client.PeerClient`): locate a prefix in the cluster, fetch pages
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

Parts (one module each, sharing this object's state): `locate.py` (the meta map's client side,
membership, `locate`), `fetch.py` (fetches, TCP or RDMA), `rdma_reads.py` (one-sided READs), `lend.py`
(demotion to peers, the lent region's `put`), `serve.py` (the peer service); `common.py` holds their
records. The manager is seen only through `manager/peers.py` and its events.

Threads: the manager, the meta map, the DMP store and membership live on the event loop. Peer
requests arrive on transport threads and hop to the loop for every state change (`on_loop`);
blocking client calls run in a small thread pool so the loop never waits on the network.
Records are hints: a page that moved or vanished is a miss (the engine recomputes), never wrong
bytes — every page is checked against its checksum, key, namespace and size on arrival.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from polarkvd.cluster.membership import Member
from polarkvd.cluster.metamap import MetaMap
from polarkvd.cluster.pool.common import FETCH_BATCH_PAGES, NET_THREADS, Lease, rdma_lease_seconds
from polarkvd.cluster.pool.fetch import Fetcher
from polarkvd.cluster.pool.lend import Lending
from polarkvd.cluster.pool.locate import MetaMapClient
from polarkvd.cluster.pool.rdma_reads import RdmaReads
from polarkvd.cluster.pool.serve import PeerService
from polarkvd.config import Config
from polarkvd.config.values import split_address
from polarkvd.errors import ConfigError
from polarkvd.tiers.dmp import DmpStore
from polarkvd.transport.peer_client import PeerClient
from polarkvd.transport.peer_server import PeerServer
from polarkvd.transport.peer_wire import data_key
from polarkvd.transport.pipeline import LAYER_GROUPS
from polarkvd.transport.rdma import PeerTransports, RdmaDevice, RdmaEndpoint
from polarkvd.transport.rdma_params import RdmaError, TransportKind
from polarkvd.transport.rdma_probe import TransportChoice, probe_cluster

if TYPE_CHECKING:
    from polarkvd.cluster.auth import CurveKeys
    from polarkvd.manager.peers import PeerPages

log = logging.getLogger(__name__)

__all__ = ["ClusterPool", "rdma_lease_seconds"]


class ClusterPool:
    def __init__(
        self,
        cfg: Config,
        pages: PeerPages,
        keys: CurveKeys | None,
        node_id: str,
        transport: TransportChoice | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`transport`: the daemon's probe result (`transport.rdma_probe.probe_cluster`); None probes again
        at `start`. `clock` times the per-peer RDMA back-off."""
        # the parts, each owning one concern (their modules say which); they share this state
        self.metamap_client = MetaMapClient(self)
        self.fetcher = Fetcher(self)
        self.rdma_reads = RdmaReads(self)
        self.lending = Lending(self)
        self.service = PeerService(self)
        self.cfg = cfg
        self.c = cfg.cluster
        self.pages = pages
        self.node_id = node_id
        self.loop = asyncio.get_running_loop()
        secret = data_key(keys.secret) if keys is not None else None
        self.metamap = MetaMap(node_id)
        # what happens to our pages (manager/events.py): drained into the meta map before it is
        # read or its announcements go out
        self._events = pages.events.subscribe()
        self.dmp = DmpStore(self.c.dmp_bytes, cfg.dram.slab_bytes) if self.c.dmp_bytes > 0 else None
        host, port = split_address(self.c.data_address)
        self.server = PeerServer(
            host,
            port,
            key=secret,
            handlers={
                "where": self.service.h_where,
                "announce": self.service.h_announce,
                "get": self.service.h_get,
                "put": self.lending.h_put,
                "rdma_connect": self.service.h_rdma_connect,
                "pin": self.service.h_pin,
                "unpin": self.service.h_unpin,
            },
        )
        self.client = PeerClient(key=secret, timeout=self.c.fetch_timeout)
        self.net = concurrent.futures.ThreadPoolExecutor(NET_THREADS, thread_name_prefix="polarkv-net")
        self.members: dict[str, Member] = {}  # alive members other than us, by node id
        self.suspects: set[str] = set()
        self.hints: dict[bytes, tuple[str, ...]] = {}  # key -> holders, from recent lookups
        self._slice_sums: dict[tuple[bytes, int, int], tuple[Any, int]] = {}  # see _known_sums
        self.counters = pages.counters
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
        self._leases: dict[int, Lease] = {}
        self._lease_ids = itertools.count(1)
        self.lease_seconds = rdma_lease_seconds(self.c.fetch_timeout)
        self.last_fallback = ""
        # GPUDirect: the L1 pool registered as region "vram", or why not (said once at start)
        self.staging: Any = None  # tiers.vram.Staging while the region is registered
        self.vram_reason = "no L1 pool" if pages.l1_pool is None else "RDMA is off"
        # the API the manager, the daemon and tests call: bound to the part that owns it
        self.announce_disk_pages = self.metamap_client.announce_disk_pages
        self.drain_events = self.metamap_client.drain_events
        self.page_added = self.metamap_client.page_added
        self.page_removed = self.metamap_client.page_removed
        self.locate = self.metamap_client.locate
        self.holders = self.metamap_client.holders
        self.leading = self.metamap_client.leading
        self.on_members = self.metamap_client.on_members
        self.fetch = self.fetcher.fetch
        self.fetch_into_vram = self.fetcher.fetch_into_vram
        self.demote_targets = self.lending.demote_targets
        self.demote = self.lending.demote

    def start(self) -> str:
        """Open the RDMA device when RDMA was chosen, bind the peer service; returns the data address
        to advertise (host from gossip's)."""
        self._open_rdma()
        self.server.start()
        self._flusher = asyncio.create_task(self.metamap_client.flush_loop(), name="metamap-flush")
        self.metamap.set_members([self.node_id], time.monotonic())
        if self.pages.has_disk:  # peers can have our disk pages too (promoted here, then sent)
            for digest in self.pages.namespaces():
                self.metamap_client.announce_disk_pages(digest)
        return self.server.address

    def _open_rdma(self) -> None:
        """RDMA needs the device open and the arena and the DMP region registered for remote READ.
        When that fails: `auto` logs why and stays on TCP; `rdma` refuses to start (exit 78)."""
        choice = self.choice if self.choice is not None else probe_cluster(self.c)
        if choice.kind is TransportKind.RDMA:
            try:
                dev = RdmaDevice(choice, pyverbs_path=self.c.pyverbs_path)
                try:
                    dev.register_buffer("dram", self.pages.arena)
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
        pool = self.pages.l1_pool
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
        self.pages.events.unsubscribe(self._events)
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        await self.loop.run_in_executor(None, self.server.close)
        for lease_id in list(self._leases):
            self.service.drop_lease(lease_id)
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

    def report(self) -> dict[str, Any]:
        self.metamap_client.drain_events()
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

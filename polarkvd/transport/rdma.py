"""RDMA READ of remote pages with pyverbs: the device and the verbs that move bytes.

Owns:
- the device side (`RdmaDevice`): context, protection domain, memory regions over buffers that exist
  already (the DRAM arena, the DMP region; `ibv_reg_mr` on their address), dma-buf regions for CUDA
  memory (GPUDirect);
- one reliable-connected queue pair per peer (`RdmaEndpoint`): its parameters (`rdma_params.PeerParams`,
  carried over the existing TCP peer channel and validated on arrival); INIT -> RTR -> RTS; one-sided
  RDMA READs of remote page slices straight into a local region, signalled completions, a deadline,
  and on any failure the QP moved to ERROR, drained and destroyed before the caller gets the error
  (so no late DMA can land in slots the caller reuses);
- per-peer fallback (`PeerTransports`, pure): a peer whose RDMA failed uses TCP until a back-off
  passes, then RDMA is tried again.

Beside it: `rdma_probe.py` decides at start whether RDMA is used (`cluster.transport = "auto" |
"rdma" | "tcp"`, with the precise reason) and imports pyverbs; `rdma_params.py` holds what peers
exchange and the read plans (`plan_reads`, pure).

It must not know pages, keys, tiers or policy: callers hand in addresses, offsets and lengths, and
verify what landed (the pool checks every page's checksum, exactly as after a TCP fetch). It never
registers memory for remote WRITE. pyverbs is imported lazily (rdma_probe.py, docs/RDMA.md).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from polarkvd.errors import ProtocolError

if TYPE_CHECKING:
    pass

from polarkvd.transport import rdma_probe
from polarkvd.transport.rdma_params import (
    ABORT_GRACE,
    MAX_RD_ATOMIC,
    MAX_READ_BYTES,
    MAX_REGION_NAME,
    MAX_SGE,
    POLL_BATCH,
    PageRef,
    PeerParams,
    RdmaError,
    RdmaNotSupported,
    RdmaTimeout,
    ReadOp,
    RemoteRegion,
    TransportKind,
    build_connect_attr,
    build_read_wrs,
    free_wrs,
    gid_to_bytes,
    plan_reads,
)
from polarkvd.transport.rdma_probe import TransportChoice

log = logging.getLogger("polarkvd.transport.rdma")

# ---------------------------------------------------------------------------------------------- device


@dataclasses.dataclass
class LocalRegion:
    name: str
    base: int  # address (iova for dma-buf regions) of byte 0, as SGEs and peers use it
    length: int
    lkey: int
    rkey: int
    remote: bool  # peers may READ it (advertised in local_params)
    mr: Any = dataclasses.field(repr=False, default=None)
    anchor: Any = dataclasses.field(repr=False, default=None)  # keeps a Python buffer exported (mapped)


class RdmaDevice:
    """One opened device port: context, protection domain, registered regions, the QPs made from it.

    Memory registration pins pages: the daemon needs RLIMIT_MEMLOCK (systemd `LimitMEMLOCK=`) of at
    least the registered bytes. Close the device before unmapping what it registered."""

    def __init__(self, choice: TransportChoice, *, pyverbs_path: str = "", verbs: Any = None) -> None:
        if choice.kind is not TransportKind.RDMA or choice.device is None or choice.port is None:
            raise ValueError(f"not an RDMA choice: {choice}")
        self.v = v = verbs if verbs is not None else rdma_probe.import_verbs(pyverbs_path)
        self.name, self.port = choice.device, choice.port
        self.gid_index = choice.gid_index if choice.gid_index is not None else 0
        self.regions: dict[str, LocalRegion] = {}
        self.endpoints: set[RdmaEndpoint] = set()
        self._lock = threading.Lock()
        self.ctx: Any = None
        self.pd: Any = None
        try:
            self.ctx = v.device.Context(name=self.name)
            self.dev_attr = self.ctx.query_device()
            self.port_attr = self.ctx.query_port(self.port)
            if self.port_attr.state != v.e.IBV_PORT_ACTIVE:
                raise RdmaError(f"{self.name} port {self.port} is not active")
            self.global_route = self.port_attr.link_layer == v.e.IBV_LINK_LAYER_ETHERNET
            self.gid = gid_to_bytes(str(self.ctx.query_gid(self.port, self.gid_index)))
            self.pd = v.pd.PD(self.ctx)
        except (v.Error, OSError) as err:
            self.close()
            raise RdmaError(f"cannot open RDMA device {self.name} port {self.port}: {err}") from err
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- memory regions

    def _access(self, remote: bool) -> int:
        e = self.v.e
        return e.IBV_ACCESS_LOCAL_WRITE | (e.IBV_ACCESS_REMOTE_READ if remote else 0)

    def _add(self, region: LocalRegion) -> LocalRegion:
        with self._lock:
            if region.name in self.regions:
                raise ValueError(f"region {region.name!r} registered twice")
            self.regions[region.name] = region
        return region

    def register(self, name: str, address: int, length: int, *, remote: bool = True) -> LocalRegion:
        """Register memory that exists already (`ibv_reg_mr` on its address; pyverbs' MR(address=...)
        does not allocate or free it). `remote`: peers may READ it; never remote WRITE."""
        if not 1 <= len(name) <= MAX_REGION_NAME or address <= 0 or length <= 0:
            raise ValueError(f"bad region {name!r} at {address:#x} of {length} bytes")
        try:
            mr = self.v.mr.MR(self.pd, length, self._access(remote), address=address)
        except (self.v.Error, OSError) as err:
            hint = (
                " (RLIMIT_MEMLOCK too low? systemd: LimitMEMLOCK=infinity)"
                if _errno(err) == errno.ENOMEM
                else ""
            )
            raise RdmaError(
                f"registering {name!r} ({length} bytes) on {self.name} failed: {err}{hint}"
            ) from err
        return self._add(LocalRegion(name, address, length, mr.lkey, mr.rkey, remote, mr))

    def register_buffer(self, name: str, buf: Any, *, remote: bool = True) -> LocalRegion:
        """Register a writable Python buffer (mmap, bytearray, memoryview of the arena). The buffer stays
        exported while registered, so the mmap cannot be closed under the device's feet."""
        view = memoryview(buf)
        if view.readonly or not view.c_contiguous:
            raise ValueError(f"region {name!r}: need a writable, contiguous buffer")
        view = view.cast("B")
        anchor = (ctypes.c_char * len(view)).from_buffer(view)
        region = self.register(name, ctypes.addressof(anchor), len(view), remote=remote)
        region.anchor = anchor
        return region

    def register_dmabuf(
        self, name: str, fd: int, length: int, *, offset: int = 0, remote: bool = True
    ) -> LocalRegion:
        """Register `length` bytes of a dma-buf (GPU memory exported as a file descriptor) from `offset`.

        pyverbs 44's DmaBufMR registers with iova = offset, so that is the region's base address for
        local SGEs and for peers' READs."""
        cls = getattr(self.v.mr, "DmaBufMR", None)
        if cls is None:
            raise RdmaNotSupported(
                "this pyverbs has no DmaBufMR (dma-buf registration needs rdma-core >= 34)"
            )
        try:
            mr = cls(self.pd, length, self._access(remote), dmabuf=fd, offset=offset)
        except (self.v.Error, OSError) as err:
            if _errno(err) in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
                raise RdmaNotSupported(f"{self.name} cannot register dma-buf memory: {err}") from err
            raise RdmaError(f"registering dma-buf {name!r} on {self.name} failed: {err}") from err
        return self._add(LocalRegion(name, offset, length, mr.lkey, mr.rkey, remote, mr))

    def register_cuda(self, name: str, device_ptr: int, length: int, *, remote: bool = False) -> LocalRegion:
        """GPUDirect: register CUDA memory through a dma-buf exported by the CUDA driver
        (cuMemGetHandleForAddressRange, CUDA >= 11.7 with the open kernel modules), so READs land in
        GPU memory without passing through DRAM. Needs cuda-python; `device_ptr` and `length` aligned
        to the host page size."""
        cu = _cuda_driver()
        ok = cu.CUresult.CUDA_SUCCESS
        # GPUDirect RDMA needs synchronous memory operations on the range (as rdma-core's own test sets).
        (err,) = cu.cuPointerSetAttribute(
            1, cu.CUpointer_attribute.CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, device_ptr
        )
        if err != ok:
            raise RdmaNotSupported(f"CUDA refused SYNC_MEMOPS on {device_ptr:#x}: {err}")
        handle_type = cu.CUmemRangeHandleType.CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD
        err, fd = cu.cuMemGetHandleForAddressRange(device_ptr, length, handle_type, 0)
        if err != ok:
            raise RdmaNotSupported(
                f"CUDA cannot export {length} bytes at {device_ptr:#x} as a dma-buf: {err}"
            )
        try:
            return self.register_dmabuf(name, int(fd), length, remote=remote)
        finally:
            os.close(int(fd))  # the MR holds its own reference to the dma-buf

    def deregister(self, name: str) -> None:
        with self._lock:
            region = self.regions.pop(name, None)
        if region is not None:
            region.mr.close()
            region.anchor = None

    def remote_regions(self) -> tuple[RemoteRegion, ...]:
        return tuple(
            RemoteRegion(r.name, r.base, r.length, r.rkey) for r in self.regions.values() if r.remote
        )

    # -------------------------------------------------------------- queue pairs

    def endpoint(self, **kw: Any) -> RdmaEndpoint:
        return RdmaEndpoint(self, **kw)

    def accept(self, peer_params: object, **kw: Any) -> tuple[RdmaEndpoint, dict[str, Any]]:
        """The holder's side of `rdma_connect`: a QP connected to the requester's, and the params to
        reply with. Validates the request first (ProtocolError on bad params)."""
        peer = PeerParams.from_wire(peer_params)
        ep = RdmaEndpoint(self, depth=1, **kw)
        try:
            ep.connect(peer)
        except BaseException:
            ep.close()
            raise
        return ep, ep.local_params()

    def close(self) -> None:
        """Endpoints, then regions, then the PD and the context (the order verbs requires)."""
        with self._lock:
            endpoints = list(self.endpoints)
        for ep in endpoints:
            ep.close()
        for name in list(self.regions):
            try:
                self.deregister(name)
            except Exception as err:  # noqa: BLE001 - keep closing the rest
                log.warning("rdma: deregistering %s failed: %s", name, err)
        for obj in (self.pd, self.ctx):
            if obj is not None:
                try:
                    obj.close()
                except Exception as err:  # noqa: BLE001
                    log.warning("rdma: closing %s failed: %s", type(obj).__name__, err)
        self.pd = self.ctx = None


def _errno(err: BaseException) -> int | None:
    return getattr(err, "error_code", None) or getattr(err, "errno", None)


def _cuda_driver() -> Any:
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6

        return driver
    except ImportError:
        pass
    try:
        from cuda import cuda  # cuda-python 11.x / 12.0-12.5

        return cuda
    except ImportError as err:
        raise RdmaNotSupported(f"GPUDirect needs cuda-python (pip install cuda-python): {err}") from err


class RdmaEndpoint:
    """One RC queue pair (and its completion queue) towards one peer.

    The requester: `ep = dev.endpoint()`, send `ep.local_params()` in `rdma_connect`, `ep.connect(reply)`,
    then `read_ops(...)`. The holder: `dev.accept(request_params)`. One caller at a time reads
    through an endpoint (a lock serialises them). After any failure the endpoint is `broken` (its QP
    destroyed): make a new one after the back-off."""

    def __init__(
        self,
        dev: RdmaDevice,
        *,
        depth: int = 64,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        v, e, a = dev.v, dev.v.e, dev.dev_attr
        self.dev, self.v = dev, v
        self.timeout, self.clock, self.sleep = timeout, clock, sleep
        self.depth = max(1, min(depth, a.max_qp_wr, a.max_cqe))
        self.max_sge = max(1, min(MAX_SGE, a.max_sge_rd or 1, a.max_sge))
        self.max_bytes = max(1, min(MAX_READ_BYTES, dev.port_attr.max_msg_sz or MAX_READ_BYTES))
        self.rd_atomic = max(1, min(MAX_RD_ATOMIC, a.max_qp_rd_atom or 1))  # we answer this many at once
        self.init_rd_atomic = max(1, min(MAX_RD_ATOMIC, a.max_qp_init_rd_atom or 1))  # we issue this many
        self.psn = (rng or random.SystemRandom()).getrandbits(24)
        self.peer: PeerParams | None = None
        self.broken: str | None = None
        self._lock = threading.Lock()
        self.cq: Any = None
        self.qp: Any = None
        try:
            self.cq = v.cq.CQ(dev.ctx, self.depth)
            cap = v.qp.QPCap(max_send_wr=self.depth, max_recv_wr=1, max_send_sge=self.max_sge, max_recv_sge=1)
            init = v.qp.QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap, sq_sig_all=0)
            attr = v.qp.QPAttr(port_num=dev.port)
            attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ
            attr.pkey_index = 0
            self.qp = v.qp.QP(dev.pd, init, attr)  # an RC QP with a QPAttr comes back in INIT
        except (v.Error, OSError) as err:
            self.close()
            raise RdmaError(f"creating a queue pair on {dev.name} failed: {err}") from err
        with dev._lock:
            dev.endpoints.add(self)

    def local_params(self) -> dict[str, Any]:
        pa = self.dev.port_attr
        return PeerParams(
            lid=pa.lid,
            gid=self.dev.gid,
            qpn=self.qp.qp_num,
            psn=self.psn,
            mtu=pa.active_mtu,
            rd_atomic=self.rd_atomic,
            regions=self.dev.remote_regions(),
        ).to_wire()

    def connect(self, peer_params: PeerParams | object) -> None:
        """Bring the QP to RTS towards the peer's QP (validates wire params first)."""
        peer = peer_params if isinstance(peer_params, PeerParams) else PeerParams.from_wire(peer_params)
        if self.qp is None:
            raise RdmaError(f"endpoint closed: {self.broken or 'closed'}")
        attr = build_connect_attr(
            self.v,
            port=self.dev.port,
            gid_index=self.dev.gid_index,
            global_route=self.dev.global_route or peer.lid == 0,
            local_mtu=self.dev.port_attr.active_mtu,
            sq_psn=self.psn,
            max_rd_atomic=self.init_rd_atomic,
            max_dest_rd_atomic=self.rd_atomic,
            peer=peer,
        )
        try:
            self.qp.to_rts(attr)
        except (self.v.Error, OSError) as err:
            self._teardown(f"connecting to qpn {peer.qpn} failed: {err}")
            raise RdmaError(f"rdma: connecting to qpn {peer.qpn} failed: {err}") from err
        self.peer = peer

    def read(self, remote_addr: int, rkey: int, local_offset: int, length: int, *, region: str = "dram",
             timeout: float | None = None) -> None:  # fmt: skip
        """READ `length` bytes at the peer's `remote_addr` (rkey) into our `region` at `local_offset`."""
        ops = plan_reads(
            [PageRef(remote_addr, local_offset, rkey)], (0, 1), length, self.max_sge, self.max_bytes
        )
        self.read_ops(ops, region=region, timeout=timeout)

    def read_ops(self, ops: Sequence[ReadOp], *, region: str = "dram", timeout: float | None = None) -> int:
        """Post the READs (at most `depth` in flight), wait for every completion; bytes read.

        All or nothing: on an error completion, a failed post or the deadline, the QP is moved to
        ERROR, its outstanding READs are flushed (or, failing that, the QP destroyed) before RdmaError
        is raised, so nothing lands in the local region afterwards; what did land may be partial."""
        with self._lock:
            if self.broken is not None or self.qp is None:
                raise RdmaError(f"rdma endpoint unusable: {self.broken or 'closed'}")
            if self.peer is None:
                raise RdmaError("rdma endpoint not connected")
            local = self.dev.regions.get(region)
            if local is None:
                raise ValueError(f"no local region {region!r} registered")
            self._check(ops, local)
            e = self.v.e
            deadline = self.clock() + (self.timeout if timeout is None else timeout)
            posted = done = spins = 0
            while done < len(ops):
                room = self.depth - (posted - done)
                if room and posted < len(ops):
                    batch = ops[posted : posted + room]
                    wrs = build_read_wrs(self.v, batch, local.base, local.lkey, posted)
                    try:
                        self.qp.post_send(wrs[0])
                    except (self.v.Error, OSError) as err:
                        self._abort(
                            f"posting RDMA READs failed: {err}", outstanding=posted - done + len(batch)
                        )
                        raise RdmaError(f"rdma: posting READs failed: {err}") from err
                    finally:
                        free_wrs(wrs)
                    posted += len(batch)
                n, wcs = self.cq.poll(min(posted - done, POLL_BATCH))
                for i, wc in enumerate(wcs):
                    if wc.status != e.IBV_WC_SUCCESS:
                        status = _wc_status(self.v, wc.status)
                        why = f"RDMA READ {wc.wr_id} failed: {status} (vendor error {wc.vendor_err})"
                        self._abort(why, outstanding=posted - done - len(wcs[i:]))
                        raise RdmaError(f"rdma: {why}")
                    done += 1
                if done < len(ops) and self.clock() >= deadline:
                    why = f"timed out with {posted - done} of {len(ops)} READs outstanding"
                    self._abort(why, outstanding=posted - done)
                    raise RdmaTimeout(f"rdma: {why}")
                if n:
                    spins = 0
                    continue
                spins += 1
                self.sleep(0 if spins < 64 else min(0.0002 * (spins - 63), 0.001))
            return sum(op.length for op in ops)

    def _check(self, ops: Sequence[ReadOp], local: LocalRegion) -> None:
        """Refuse (before posting) a READ outside what the peer registered or outside our region: such a
        READ would fail on the wire and break the QP for everyone."""
        assert self.peer is not None
        keys = {r.rkey: r for r in self.peer.regions}
        for op in ops:
            r = keys.get(op.rkey)
            if r is None or not r.addr <= op.remote_addr or op.remote_addr + op.length > r.addr + r.length:
                raise ProtocolError(
                    f"rdma: READ of {op.length} bytes at {op.remote_addr:#x} is outside the peer's regions"
                )
            if not 1 <= len(op.segments) <= self.max_sge or op.length > self.max_bytes:
                raise ValueError(
                    f"READ of {op.length} bytes in {len(op.segments)} pieces exceeds this QP's limits"
                )
            if sum(s.length for s in op.segments) != op.length:
                raise ValueError("READ segments do not add up to its length")
            for s in op.segments:
                if s.local_offset < 0 or s.local_offset + s.length > local.length:
                    raise ValueError(
                        f"local [{s.local_offset}, +{s.length}) is outside region {local.name!r}"
                    )

    def _abort(self, why: str, outstanding: int = 0) -> None:
        """ERROR state flushes every outstanding READ; wait (briefly) for the flushes, then destroy."""
        v = self.v
        try:
            self.qp.modify(v.qp.QPAttr(qp_state=v.e.IBV_QPS_ERR), v.e.IBV_QP_STATE)
        except (v.Error, OSError) as err:
            log.debug("rdma: moving the QP to ERROR failed: %s", err)
        if outstanding:
            until = self.clock() + ABORT_GRACE
            while outstanding > 0 and self.clock() < until:
                try:
                    n, _ = self.cq.poll(min(outstanding, POLL_BATCH))
                except (v.Error, OSError):
                    break
                outstanding -= n
                if not n:
                    self.sleep(0.0005)
        self._teardown(why)

    def _teardown(self, why: str) -> None:
        self.broken = why
        log.debug("rdma: endpoint to qpn %s closed: %s", self.peer.qpn if self.peer else "?", why)
        self._close_verbs()

    def _close_verbs(self) -> None:
        for name in ("qp", "cq"):  # the QP before its CQ (verbs refuses to destroy a CQ in use)
            obj = getattr(self, name)
            setattr(self, name, None)
            if obj is not None:
                try:
                    obj.close()
                except Exception as err:  # noqa: BLE001
                    log.warning("rdma: closing the %s failed: %s", name.upper(), err)
        with self.dev._lock:
            self.dev.endpoints.discard(self)

    def close(self) -> None:
        """Destroy the QP; waits for a READ in progress on another thread to finish (or time out)."""
        with self._lock:
            if self.broken is None:
                self.broken = "closed"
            self._close_verbs()


def _wc_status(v: Any, status: int) -> str:
    fn = getattr(v.cq, "cqe_status_to_str", None)
    try:
        return f"{fn(status)} ({status})" if fn else str(status)
    except Exception:  # noqa: BLE001
        return str(status)


# ---------------------------------------------------------------------------------------------- per peer


@dataclasses.dataclass
class _PeerState:
    failures: int = 0
    error: str = ""
    retry_at: float = 0.0


class PeerTransports:
    """Which transport each peer's fetches use. RDMA when we chose it and the peer offers it, until a
    failure: then TCP for `backoff` seconds (doubling per consecutive failure, up to `max_backoff`),
    then RDMA is tried again; a success clears the record. Time comes from `clock`."""

    def __init__(
        self,
        local: TransportChoice,
        *,
        backoff: float = 30.0,
        max_backoff: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local = local
        self.backoff, self.max_backoff, self.clock = backoff, max_backoff, clock
        self._peers: dict[str, _PeerState] = {}
        self._lock = threading.Lock()

    def choose(self, peer: str, peer_has_rdma: bool) -> TransportKind:
        return self.decide(peer, peer_has_rdma)[0]

    def decide(self, peer: str, peer_has_rdma: bool) -> tuple[TransportKind, str]:
        if self.local.kind is not TransportKind.RDMA:
            return TransportKind.TCP, f"this daemon uses TCP: {self.local.reason}"
        if not peer_has_rdma:
            return TransportKind.TCP, "the peer offers no RDMA"
        with self._lock:
            st = self._peers.get(peer)
            if st is not None and st.failures:
                left = st.retry_at - self.clock()
                if left > 0:
                    return TransportKind.TCP, f"RDMA failed ({st.error}); retrying in {left:.0f}s"
                return TransportKind.RDMA, f"retrying RDMA after {st.failures} failure(s)"
        return TransportKind.RDMA, "RDMA"

    def failed(self, peer: str, error: BaseException | str) -> float:
        """Record a failure; returns the back-off before RDMA is tried again for this peer."""
        with self._lock:
            st = self._peers.setdefault(peer, _PeerState())
            st.failures += 1
            st.error = str(error) or type(error).__name__
            delay = min(self.backoff * 2 ** (st.failures - 1), self.max_backoff)
            st.retry_at = self.clock() + delay
        log.warning("rdma: peer %s: %s; using TCP, RDMA again in %.0fs", peer, st.error, delay)
        return delay

    def succeeded(self, peer: str) -> None:
        with self._lock:
            st = self._peers.pop(peer, None)
        if st is not None and st.failures:
            log.info("rdma: peer %s: RDMA works again after %d failure(s)", peer, st.failures)

    def forget(self, peer: str) -> None:
        with self._lock:
            self._peers.pop(peer, None)

    def report(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        with self._lock:
            return {
                p: {
                    "failures": s.failures,
                    "error": s.error,
                    "retry_in_s": round(max(0.0, s.retry_at - now), 3),
                }
                for p, s in self._peers.items()
            }

"""RDMA parameters both ends agree on, and how READs are planned: the transport kinds and errors,
the limits, a peer's queue pair and regions as exchanged over the authenticated data channel
(`PeerParams`, `RemoteRegion`), read plans that gather contiguous layer slices (`plan_reads`), and
the verbs work requests built from them. Pure: no device, tested without RDMA hardware."""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from polarkvd.errors import ProtocolError, TransportError

if TYPE_CHECKING:
    pass


SETTINGS = ("auto", "rdma", "tcp")
WIRE_VERSION = 1

#: Limits on what we build and what we accept from a peer.
MAX_SGE = 16  # scatter entries per READ we ever ask for (the device's max_sge_rd caps it further)
MAX_READ_BYTES = 1 << 30  # bytes per READ work request (the port's max_msg_sz caps it further)
MAX_REGIONS = 8
MAX_REGION_NAME = 32
_U16, _U24, _U32, _U64 = (1 << 16) - 1, (1 << 24) - 1, (1 << 32) - 1, (1 << 64) - 1

#: QP timing (ibv_modify_qp): local ACK timeout 4.096 us * 2^14 = 67 ms, 7 retries -> a dead peer
#: fails a READ in about half a second, well inside cluster.fetch_timeout.
QP_TIMEOUT, QP_RETRY, QP_RNR_RETRY, QP_MIN_RNR_TIMER = 14, 7, 7, 12
MAX_RD_ATOMIC = 16  # outstanding READs per QP we ask for (the device caps it)
ABORT_GRACE = 0.5  # seconds to wait for flushed completions after moving a QP to ERROR
POLL_BATCH = 16


class TransportKind(str, enum.Enum):
    RDMA = "rdma"
    TCP = "tcp"


class RdmaError(TransportError):
    """An RDMA operation failed (device, registration, connection, a READ); the peer falls back to TCP."""


class RdmaTimeout(RdmaError):
    """READs did not complete before the deadline; the QP was torn down."""


class RdmaNotSupported(RdmaError):
    """What was asked for cannot be done with this pyverbs, driver or machine (e.g. dma-buf)."""


log = logging.getLogger("polarkvd.transport.rdma")

# ---------------------------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class RemoteRegion:
    name: str
    addr: int
    length: int
    rkey: int

    def address_of(self, offset: int, length: int) -> int:
        """The remote address of [offset, offset+length) inside this region; ProtocolError outside it."""
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ProtocolError(
                f"rdma: [{offset}, {offset + length}) lies outside region {self.name!r} of {self.length} bytes"
            )
        return self.addr + offset


@dataclasses.dataclass(frozen=True)
class PeerParams:
    """What one side of an RC connection tells the other (over the authenticated TCP channel)."""

    lid: int
    gid: bytes  # 16 bytes, network order
    qpn: int
    psn: int
    mtu: int  # ibv_mtu enum value (1 = 256 ... 5 = 4096)
    rd_atomic: int  # READs this side can answer at once (its responder resources)
    regions: tuple[RemoteRegion, ...] = ()

    def region(self, name: str) -> RemoteRegion:
        for r in self.regions:
            if r.name == name:
                return r
        raise ProtocolError(f"rdma: the peer registered no region {name!r}")

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": WIRE_VERSION,
            "lid": self.lid,
            "gid": self.gid,
            "qpn": self.qpn,
            "psn": self.psn,
            "mtu": self.mtu,
            "rd_atomic": self.rd_atomic,
            "regions": [[r.name, r.addr, r.length, r.rkey] for r in self.regions],
        }

    @classmethod
    def from_wire(cls, obj: object) -> PeerParams:
        """Validate a peer's parameters; ProtocolError (bad_request) naming the field otherwise."""
        if not isinstance(obj, Mapping):
            raise ProtocolError("rdma params: expected a map")
        if obj.get("v") != WIRE_VERSION:
            raise ProtocolError(
                f"rdma params: version {obj.get('v')!r} not supported (this daemon speaks {WIRE_VERSION})"
            )

        def num(field: str, lo: int, hi: int) -> int:
            x = obj.get(field)
            if not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi:
                raise ProtocolError(f"rdma params: {field} must be an integer in {lo}..{hi}, got {x!r}")
            return x

        gid = obj.get("gid")
        if not isinstance(gid, bytes) or len(gid) != 16:
            raise ProtocolError(f"rdma params: gid must be 16 bytes, got {type(gid).__name__} {gid!r:.40}")
        raw = obj.get("regions", [])
        if not isinstance(raw, list) or len(raw) > MAX_REGIONS:
            raise ProtocolError(f"rdma params: regions must be a list of at most {MAX_REGIONS}")
        regions: list[RemoteRegion] = []
        for r in raw:
            if not (isinstance(r, (list, tuple)) and len(r) == 4):
                raise ProtocolError("rdma params: a region is [name, addr, length, rkey]")
            name, addr, length, rkey = r
            if not isinstance(name, str) or not 1 <= len(name) <= MAX_REGION_NAME:
                raise ProtocolError(
                    f"rdma params: region name must be 1..{MAX_REGION_NAME} characters, got {name!r:.40}"
                )
            for field, x, lo, hi in (
                ("addr", addr, 0, _U64),
                ("length", length, 1, _U64),
                ("rkey", rkey, 0, _U32),
            ):
                if not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi:
                    raise ProtocolError(
                        f"rdma params: region {name!r} {field} must be an integer in {lo}..{hi}, got {x!r}"
                    )
            if addr + length - 1 > _U64:
                raise ProtocolError(f"rdma params: region {name!r} wraps around the address space")
            if any(x.name == name for x in regions):
                raise ProtocolError(f"rdma params: region {name!r} listed twice")
            regions.append(RemoteRegion(name, addr, length, rkey))
        return cls(
            lid=num("lid", 0, _U16),
            gid=gid,
            qpn=num("qpn", 1, _U24),
            psn=num("psn", 0, _U24),
            mtu=num("mtu", 1, 5),
            rd_atomic=num("rd_atomic", 1, 255),
            regions=tuple(regions),
        )


def gid_to_bytes(text: str) -> bytes:
    """pyverbs' GID text ('fe80:0000:...', 8 groups of 4 hex digits) -> 16 bytes."""
    parts = text.split(":")
    if len(parts) != 8 or any(len(p) != 4 for p in parts):
        raise ValueError(f"not a GID: {text!r}")
    return bytes.fromhex("".join(parts))


def gid_to_text(raw: bytes) -> str:
    h = raw.hex()
    return ":".join(h[i : i + 4] for i in range(0, 32, 4))


def buffer_address(buf: Any) -> int:
    """The address of the first byte of a writable, contiguous, non-empty buffer (e.g. an arena slice:
    its offset in a registered region is this minus the region's base)."""
    view = memoryview(buf)
    if view.readonly or not view.c_contiguous or view.nbytes == 0:
        raise ValueError("need a writable, contiguous, non-empty buffer")
    view = view.cast("B")
    anchor = (ctypes.c_char * len(view)).from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor
        view.release()


# ---------------------------------------------------------------------------------------------- planning


class PageRef(NamedTuple):
    remote_addr: int  # where the page starts on the holder (an address inside a region it registered)
    local_offset: int  # where its slot starts in our local region
    rkey: int = 0  # the holder region's rkey (pages of one plan may come from several regions)


class Segment(NamedTuple):
    local_offset: int
    length: int


@dataclasses.dataclass(frozen=True)
class ReadOp:
    """One RDMA READ: `length` contiguous remote bytes scattered over `segments` of the local region."""

    remote_addr: int
    rkey: int
    length: int
    segments: tuple[Segment, ...]
    pages: tuple[int, ...]  # indexes (into the planned pages) this READ carries bytes of


def plan_reads(
    pages: Sequence[PageRef | tuple[int, int] | tuple[int, int, int]],
    layer_range: tuple[int, int],
    layer_bytes: int,
    max_sge: int,
    max_bytes: int,
) -> list[ReadOp]:
    """READs that bring layers [lo, hi) of every page into its local slot.

    Pages are layer-major, so layers lo..hi-1 of a page are one contiguous slice at
    `lo * layer_bytes`. Neighbouring slices (in the given order) that are contiguous on the holder
    and share an rkey go into one READ, as long as it stays within `max_bytes` and its local side
    within `max_sge` scatter entries (slices contiguous locally as well share one entry). A slice
    longer than what fits is split across READs. Order is kept: READs are posted, and complete, in
    the order of the pages."""
    lo, hi = layer_range
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi):
        raise ValueError(f"layer_range must be (lo, hi) with 0 <= lo < hi, got {layer_range!r}")
    if layer_bytes < 1 or max_sge < 1 or not 1 <= max_bytes <= 1 << 31:
        raise ValueError(
            f"need layer_bytes >= 1, max_sge >= 1, 1 <= max_bytes <= 2^31 "
            f"(got {layer_bytes}, {max_sge}, {max_bytes})"
        )
    start, size = lo * layer_bytes, (hi - lo) * layer_bytes
    ops: list[ReadOp] = []
    cur: dict[str, Any] | None = None

    def close() -> None:
        if cur is not None:
            ops.append(
                ReadOp(cur["remote"], cur["rkey"], cur["length"], tuple(cur["segs"]), tuple(cur["pages"]))
            )

    for index, ref in enumerate(pages):
        remote, local, rkey = PageRef(*ref)
        if remote < 0 or local < 0 or not 0 <= rkey <= _U32 or remote + start + size - 1 > _U64:
            raise ValueError(f"page {index}: bad reference {ref!r}")
        remote, local, left = remote + start, local + start, size
        while left:
            if cur is not None and cur["rkey"] == rkey and cur["remote"] + cur["length"] == remote:
                room = max_bytes - cur["length"]
                last_off, last_len = cur["segs"][-1]
                joins = last_off + last_len == local
                if room and (joins or len(cur["segs"]) < max_sge):
                    take = min(left, room)
                    if joins:
                        cur["segs"][-1] = Segment(last_off, last_len + take)
                    else:
                        cur["segs"].append(Segment(local, take))
                    cur["length"] += take
                    if cur["pages"][-1] != index:
                        cur["pages"].append(index)
                    remote, local, left = remote + take, local + take, left - take
                    continue
            close()
            take = min(left, max_bytes)
            cur = {
                "remote": remote,
                "rkey": rkey,
                "length": take,
                "segs": [Segment(local, take)],
                "pages": [index],
            }
            remote, local, left = remote + take, local + take, left - take
    close()
    return ops


# ---------------------------------------------------------------------------------------------- verbs builders


def build_connect_attr(
    v: Any,
    *,
    port: int,
    gid_index: int,
    global_route: bool,
    local_mtu: int,
    sq_psn: int,
    max_rd_atomic: int,
    max_dest_rd_atomic: int,
    peer: PeerParams,
) -> Any:
    """The QPAttr that takes an RC QP from INIT to RTS towards `peer` (QP.to_rts sets the masks)."""
    e = v.e
    attr = v.qp.QPAttr(port_num=port)
    attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ
    attr.pkey_index = 0
    attr.path_mtu = min(local_mtu, peer.mtu)
    attr.dest_qp_num = peer.qpn
    attr.rq_psn = peer.psn
    attr.sq_psn = sq_psn
    attr.max_dest_rd_atomic = max_dest_rd_atomic
    attr.max_rd_atomic = max(1, min(max_rd_atomic, peer.rd_atomic))
    attr.min_rnr_timer = QP_MIN_RNR_TIMER
    attr.timeout = QP_TIMEOUT
    attr.retry_cnt = QP_RETRY
    attr.rnr_retry = QP_RNR_RETRY
    if global_route:
        gr = v.addr.GlobalRoute(dgid=v.addr.GID(gid_to_text(peer.gid)), sgid_index=gid_index, hop_limit=64)
        attr.ah_attr = v.addr.AHAttr(dlid=peer.lid, is_global=1, port_num=port, gr=gr)
    else:
        attr.ah_attr = v.addr.AHAttr(dlid=peer.lid, is_global=0, port_num=port)
    return attr


def build_read_wrs(v: Any, ops: Sequence[ReadOp], base: int, lkey: int, first_id: int) -> list[Any]:
    """Chained, signalled RDMA READ work requests for `ops` into the local region at `base`.

    pyverbs 44 copies the SGEs into the WR when it is built, and its SGE/SendWR objects free their C
    memory only in close() (their destructor is misspelled, `__dealloc`), exactly once: the SGEs are
    closed here, the WRs by `free_wrs` after post_send."""
    e = v.e
    wrs: list[Any] = []
    try:
        for i, op in enumerate(ops):
            sges = [v.wr.SGE(base + s.local_offset, s.length, lkey) for s in op.segments]
            try:
                wr = v.wr.SendWR(
                    wr_id=first_id + i,
                    opcode=e.IBV_WR_RDMA_READ,
                    num_sge=len(sges),
                    sg=sges,
                    send_flags=e.IBV_SEND_SIGNALED,
                )
            finally:
                for s in sges:
                    s.close()
            wr.set_wr_rdma(op.rkey, op.remote_addr)
            if wrs:
                wrs[-1].next_wr = wr  # the setter only; pyverbs 44's next_wr getter raises
            wrs.append(wr)
    except BaseException:
        free_wrs(wrs)
        raise
    return wrs


def free_wrs(wrs: Iterable[Any]) -> None:
    for wr in wrs:
        wr.close()

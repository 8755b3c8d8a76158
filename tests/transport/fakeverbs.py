"""An in-process stand-in for pyverbs 44, for what no real part can do on these machines.

There is no RDMA device here, so faults such as a port that is DOWN, an error completion or a READ
that never completes cannot be produced with the real library. This fake has the same names and
call shapes as pyverbs 44 (checked against its sources: Context(name=), query_device/port/gid/gid_type,
PD(ctx), MR(pd, length, access, address=), CQ(ctx, cqe).poll(n) -> (n, [WC]), QP(pd, QPInitAttr,
QPAttr) in INIT, to_rts(QPAttr), modify(QPAttr, mask), post_send(SendWR chain), SGE(addr, length,
lkey), SendWR(wr_id=, opcode=, num_sge=, sg=, send_flags=), set_wr_rdma(rkey, addr), the enum values)
and performs a READ as a memmove between registered buffers of the same process. SGE and SendWR
count close() calls: pyverbs 44 frees their C memory only there, so 0 calls leak and 2 double-free.
The tests that use the real pyverbs (object construction) keep this fake honest about names.

With `Fabric(dmabuf=True)` it also has pyverbs 44's `DmaBufMR(pd, length, access, dmabuf=fd,
offset=0)` (iova = offset, as `ibv_reg_dmabuf_mr` is called by pyverbs), for GPUDirect: the fd must
come from `fake_dmabuf(address, length)`, a FAKE dma-buf (an empty memfd) that stands for host memory
at `address` (in tests: the "device memory" of FakeCuda, tests/tiers/test_vram.py, which is host
memory too). READs into or out of such a region translate iova -> that host memory. NOT a dma-buf,
and nothing here says anything about GPUs or NICs: it lets the logic above pyverbs run.

`ProcessFabric` is the same fake spread over processes, for daemons talking to each other (FAKE
DEVICE: there is no RDMA hardware or kernel support on these machines). Each process gets one RoCE
device whose GID encodes its pid; memory regions and queue pairs are announced as files in a shared
directory; a READ is a `process_vm_readv` from the holder's pid at the registered address, allowed
only where a real RC QP would allow it (both QPs connected to each other, the rkey registered for
remote READ by the holder, the range inside it). `write_fake_pyverbs(dir, state_dir)` writes a
`pyverbs` package that a daemon loads through `cluster.pyverbs_path`; the file `state_dir/mode`
(or `mode-<pid>`) says what READs do: execute, fail (error completion), hang (never complete).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# pyverbs 44's enum values (pyverbs.enums), as far as polarkvd uses them.
E = types.SimpleNamespace(
    IBV_ACCESS_LOCAL_WRITE=1,
    IBV_ACCESS_REMOTE_WRITE=2,
    IBV_ACCESS_REMOTE_READ=4,
    IBV_QPT_RC=2,
    IBV_WR_RDMA_READ=4,
    IBV_SEND_SIGNALED=2,
    IBV_WC_SUCCESS=0,
    IBV_WC_REM_ACCESS_ERR=10,
    IBV_WC_WR_FLUSH_ERR=5,
    IBV_PORT_DOWN=1,
    IBV_PORT_ACTIVE=4,
    IBV_LINK_LAYER_INFINIBAND=1,
    IBV_LINK_LAYER_ETHERNET=2,
    IBV_GID_TYPE_SYSFS_IB_ROCE_V1=0,
    IBV_GID_TYPE_SYSFS_ROCE_V2=1,
    IBV_MTU_1024=3,
    IBV_MTU_4096=5,
    IBV_QPS_RESET=0,
    IBV_QPS_INIT=1,
    IBV_QPS_RTR=2,
    IBV_QPS_RTS=3,
    IBV_QPS_ERR=6,
    IBV_QP_STATE=1,
)
ZERO_GID = "0000:0000:0000:0000:0000:0000:0000:0000"


class PyverbsError(Exception):
    def __init__(self, msg: str, error_code: int = -1) -> None:
        super().__init__(msg)
        self.error_code = error_code


@dataclass
class Port:
    state: int = E.IBV_PORT_ACTIVE
    link_layer: int = E.IBV_LINK_LAYER_INFINIBAND
    lid: int = 7
    active_mtu: int = E.IBV_MTU_4096
    max_msg_sz: int = 1 << 30
    gids: list[tuple[str, int]] = field(
        default_factory=lambda: [("fe80:0000:0000:0000:0202:c9ff:fe00:0001", 0)]
    )

    @property
    def gid_tbl_len(self) -> int:
        return len(self.gids)


@dataclass
class Dev:
    name: str
    ports: list[Port] = field(default_factory=lambda: [Port()])
    openable: bool = True
    max_sge_rd: int = 4


# FAKE dma-bufs: (st_dev, st_ino) of a memfd -> (host address, length) it stands for
_DMABUFS: dict[tuple[int, int], tuple[int, int]] = {}


def fake_dmabuf(address: int, length: int) -> int:
    """A FAKE dma-buf fd (an empty memfd) standing for `length` bytes of host memory at `address`;
    the fake DmaBufMR maps it back. The caller closes it (a registration keeps what it needs)."""
    fd = os.memfd_create("polarkv-fake-dmabuf")
    st = os.fstat(fd)
    _DMABUFS[(st.st_dev, st.st_ino)] = (address, length)
    return fd


class Fabric:
    """The host's devices and everything registered on them; `mode` decides what a READ does:
    "execute" (copy the bytes and complete), "hang" (never complete), "fail" (REM_ACCESS_ERR),
    "gate" (held until `gate` is set, then copied and completed: a READ caught in flight).
    `dmabuf`: the module has DmaBufMR (see the module docstring)."""

    def __init__(
        self, devices: list[Dev] | None = None, list_error: str | None = None, dmabuf: bool = False
    ) -> None:
        self.dmabuf = dmabuf
        self.dmabuf_reads = 0  # READs whose source or destination was a dma-buf region
        self.devices = devices if devices is not None else [Dev("mlx5_0")]
        self.list_error = list_error
        self.mode = "execute"
        self.gate = threading.Event()
        self.held: list[tuple[Any, Any]] = []  # (qp, wr) of READs waiting for the gate
        self.mrs: dict[int, MRInfo] = {}
        self.qps: dict[int, Any] = {}
        self.keys = itertools.count(0x100)
        self.qpns = itertools.count(0x40)
        self.closed: list[str] = []
        self.wr_closes: list[int] = []  # close() count of every SGE and SendWR made
        self.reads = 0  # READ work requests executed successfully
        self.verbs = self._module()

    # hooks ProcessFabric overrides: what a READ mode is now, connecting, and the copy itself
    def current_mode(self) -> str:
        return self.mode

    def mr_added(self, rkey: int, info: MRInfo) -> None:
        self.mrs[rkey] = info

    def mr_removed(self, rkey: int) -> None:
        self.mrs.pop(rkey, None)

    def qp_created(self, qp: Any) -> None:
        self.qps[qp.qp_num] = qp

    def qp_closed(self, qp: Any) -> None:
        self.qps.pop(qp.qp_num, None)

    def connect(self, qp: Any, attr: Any) -> None:
        if attr.dest_qp_num not in self.qps:
            raise PyverbsError("Failed to modify QP state to RTR", 22)

    def execute_read(self, qp: Any, wr: Any) -> bool:
        peer = self.qps.get(qp.attr.dest_qp_num)
        src = self.mrs.get(wr.rkey)
        length = sum(s[1] for s in wr.sges)
        if (
            peer is None or peer.attr is None or peer.attr.dest_qp_num != qp.qp_num
            or src is None or src.pd is not peer.pd or not src.access & E.IBV_ACCESS_REMOTE_READ
            or not peer.access & E.IBV_ACCESS_REMOTE_READ
            or not src.addr <= wr.raddr or wr.raddr + length > src.addr + src.length
        ):  # fmt: skip
            return False
        if not self.local_ok(wr):
            return False
        at = src.to_host(wr.raddr)
        for addr, n, lkey in wr.sges:
            ctypes.memmove(self.mrs[lkey].to_host(addr), at, n)
            at += n
        self.dmabuf_reads += src.host is not None or any(self.mrs[k].host is not None for _, _, k in wr.sges)
        return True

    def local_ok(self, wr: Any) -> bool:
        for addr, n, lkey in wr.sges:
            dst = self.mrs.get(lkey)
            if dst is None or not dst.addr <= addr or addr + n > dst.addr + dst.length:
                return False
        return True

    def _module(self) -> types.SimpleNamespace:
        fabric = self

        def get_device_list() -> list[Any]:
            if fabric.list_error is not None:
                raise PyverbsError(fabric.list_error)
            return [types.SimpleNamespace(name=d.name.encode()) for d in fabric.devices]

        class Context:
            def __init__(self, name: str) -> None:
                dev = next((d for d in fabric.devices if d.name == name), None)
                if dev is None or not dev.openable:
                    raise PyverbsError(f"Failed to open device {name}")
                self.dev, self.name = dev, name

            def query_device(self) -> Any:
                return types.SimpleNamespace(
                    phys_port_cnt=len(self.dev.ports), max_qp_wr=256, max_cqe=256, max_sge=8,
                    max_sge_rd=self.dev.max_sge_rd, max_qp_rd_atom=16, max_qp_init_rd_atom=16,
                )  # fmt: skip

            def query_port(self, port: int) -> Port:
                return self.dev.ports[port - 1]

            def query_gid(self, port: int, index: int) -> str:
                return self.dev.ports[port - 1].gids[index][0]

            def query_gid_type(self, port: int, index: int) -> int:
                return self.dev.ports[port - 1].gids[index][1]

            def close(self) -> None:
                fabric.closed.append(f"ctx {self.name}")

        class PD:
            def __init__(self, ctx: Context) -> None:
                self.ctx = ctx

            def close(self) -> None:
                fabric.closed.append("pd")

        class MR:
            def __init__(self, pd: PD, length: int = 0, access: int = 0, address: int | None = None) -> None:
                assert address, "polarkvd registers existing memory only"
                self.lkey = self.rkey = next(fabric.keys)
                fabric.mr_added(self.rkey, MRInfo(address, length, access, pd))

            def close(self) -> None:
                fabric.mr_removed(self.rkey)
                fabric.closed.append(f"mr {self.rkey:#x}")

        class DmaBufMR(MR):
            """pyverbs 44's signature; iova = offset (FAKE: maps a fake_dmabuf fd to host memory)."""

            def __init__(self, pd: PD, length: int, access: int, dmabuf: Any = None, offset: int = 0,
                         gpu: int = 0, gtt: int = 0) -> None:  # fmt: skip
                st = os.fstat(dmabuf)  # a closed or foreign fd fails here, as ibv_reg_dmabuf_mr would
                host = _DMABUFS.get((st.st_dev, st.st_ino))
                if host is None or offset + length > host[1]:
                    raise PyverbsError("Failed to register a dma-buf MR", 22)
                self.lkey = self.rkey = next(fabric.keys)
                fabric.mr_added(self.rkey, MRInfo(offset, length, access, pd, host[0] + offset))

        class CQ:
            def __init__(self, ctx: Context, cqe: int) -> None:
                self.cqe, self.wcs = cqe, []

            def poll(self, num_entries: int = 1) -> tuple[int, list[Any]]:
                if fabric.held and fabric.gate.is_set():
                    held, fabric.held = fabric.held, []
                    for qp, wr in held:
                        ok = qp.qp_state == E.IBV_QPS_RTS and fabric.execute_read(qp, wr)
                        fabric.reads += ok
                        qp.cq.wcs.append(WC(wr.wr_id, E.IBV_WC_SUCCESS if ok else E.IBV_WC_REM_ACCESS_ERR))
                out, self.wcs = self.wcs[:num_entries], self.wcs[num_entries:]
                return len(out), out

            def close(self) -> None:
                fabric.closed.append("cq")

        class Bag:
            def __init__(self, **kw: Any) -> None:
                self.__dict__.update(kw)

        class QPAttr(Bag):
            def __init__(self, qp_state: int = E.IBV_QPS_INIT, cur_qp_state: int = 0, port_num: int = 1,
                         path_mtu: int = E.IBV_MTU_1024) -> None:  # fmt: skip
                super().__init__(qp_state=qp_state, port_num=port_num, path_mtu=path_mtu)

        class QP:
            def __init__(self, pd: PD, init: Any, attr: Any = None) -> None:
                assert init.qp_type == E.IBV_QPT_RC
                self.pd, self.cq, self.cap = pd, init.send_cq, init.cap
                self.qp_num = next(fabric.qpns)
                self.qp_state = E.IBV_QPS_INIT if attr is not None else E.IBV_QPS_RESET
                self.access = attr.qp_access_flags if attr is not None else 0
                self.pending: list[Any] = []
                self.attr: Any = None
                fabric.qp_created(self)

            def to_rts(self, attr: Any) -> None:
                fabric.connect(self, attr)
                self.attr, self.qp_state = attr, E.IBV_QPS_RTS

            def modify(self, attr: Any, mask: int) -> None:
                assert mask == E.IBV_QP_STATE
                self.qp_state = attr.qp_state
                if attr.qp_state == E.IBV_QPS_ERR:
                    mine = [wr for qp, wr in fabric.held if qp is self]
                    fabric.held = [(qp, wr) for qp, wr in fabric.held if qp is not self]
                    for wr_id in self.pending + [wr.wr_id for wr in mine]:
                        self.cq.wcs.append(WC(wr_id, E.IBV_WC_WR_FLUSH_ERR))
                    self.pending = []

            def post_send(self, wr: Any) -> None:
                if self.qp_state != E.IBV_QPS_RTS:
                    raise PyverbsError("Failed to post send", 22)
                mode = fabric.current_mode()
                while wr is not None:
                    assert wr.opcode == E.IBV_WR_RDMA_READ and wr.send_flags & E.IBV_SEND_SIGNALED
                    assert wr.num_sge == len(wr.sges) <= self.cap.max_send_sge
                    if mode == "hang":
                        self.pending.append(wr.wr_id)
                    elif mode == "gate":
                        fabric.held.append((self, wr))
                    elif mode == "fail" or not fabric.execute_read(self, wr):
                        self.cq.wcs.append(WC(wr.wr_id, E.IBV_WC_REM_ACCESS_ERR))
                    else:
                        fabric.reads += 1
                        self.cq.wcs.append(WC(wr.wr_id, E.IBV_WC_SUCCESS))
                    wr = wr.next

            def close(self) -> None:
                fabric.qp_closed(self)
                fabric.closed.append(f"qp {self.qp_num:#x}")

        class SGE:
            def __init__(self, addr: int, length: int, lkey: int) -> None:
                self.addr, self.length, self.lkey = addr, length, lkey
                self.slot = len(fabric.wr_closes)
                fabric.wr_closes.append(0)

            def close(self) -> None:
                fabric.wr_closes[self.slot] += 1

        class SendWR:
            def __init__(self, wr_id: int = 0, opcode: int = 0, num_sge: int = 0, imm_data: int = 0,
                         sg: Any = None, send_flags: int = E.IBV_SEND_SIGNALED) -> None:  # fmt: skip
                if num_sge < 1 or sg is None:
                    raise PyverbsError("A WR needs at least one SGE")
                self.wr_id, self.opcode, self.num_sge, self.send_flags = wr_id, opcode, num_sge, send_flags
                self.sges = [(s.addr, s.length, s.lkey) for s in sg[:num_sge]]  # copied, as pyverbs does
                self.next: Any = None
                self.rkey = self.raddr = 0
                self.slot = len(fabric.wr_closes)
                fabric.wr_closes.append(0)

            def set_wr_rdma(self, rkey: int, addr: int) -> None:
                self.rkey, self.raddr = rkey, addr

            @property
            def next_wr(self) -> Any:
                raise PyverbsError("A WR needs at least one SGE")  # what pyverbs 44's getter does

            @next_wr.setter
            def next_wr(self, val: Any) -> None:
                self.next = val

            def close(self) -> None:
                fabric.wr_closes[self.slot] += 1

        return types.SimpleNamespace(
            device=types.SimpleNamespace(
                get_device_list=get_device_list,
                Context=Context,
                port_state_to_str=lambda s: {1: "DOWN", 2: "INIT", 3: "ARMED", 4: "ACTIVE"}.get(s, str(s)),
            ),
            pd=types.SimpleNamespace(PD=PD),
            mr=types.SimpleNamespace(MR=MR, **({"DmaBufMR": DmaBufMR} if fabric.dmabuf else {})),
            cq=types.SimpleNamespace(
                CQ=CQ,
                cqe_status_to_str=lambda s: {5: "WR flush error", 10: "Remote access error"}.get(s, "?"),
            ),  # fmt: skip
            qp=types.SimpleNamespace(QP=QP, QPAttr=QPAttr, QPCap=Bag, QPInitAttr=_init_attr(Bag)),
            wr=types.SimpleNamespace(SGE=SGE, SendWR=SendWR),
            addr=types.SimpleNamespace(
                GID=lambda val: val,
                GlobalRoute=lambda dgid, sgid_index=0, hop_limit=1: Bag(dgid=dgid, sgid_index=sgid_index),
                AHAttr=lambda dlid=0, is_global=0, port_num=1, gr=None: Bag(
                    dlid=dlid, is_global=is_global, gr=gr
                ),
            ),
            e=E,
            Error=PyverbsError,
            origin="fake",
        )


def _init_attr(bag: type) -> Any:
    def make(qp_type: int, scq: Any = None, rcq: Any = None, cap: Any = None, sq_sig_all: int = 1) -> Any:
        return bag(qp_type=qp_type, send_cq=scq, recv_cq=rcq, cap=cap, sq_sig_all=sq_sig_all)

    return make


@dataclass
class MRInfo:
    addr: int  # the region's base as SGEs and peers use it (the iova for a dma-buf region)
    length: int
    access: int
    pd: Any
    host: int | None = None  # a dma-buf region: the host memory its iova `addr` stands for

    def to_host(self, addr: int) -> int:
        return addr if self.host is None else self.host + (addr - self.addr)


@dataclass
class WC:
    wr_id: int
    status: int
    vendor_err: int = 0


# ---------------------------------------------------------------------------------------------- across processes


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.argtypes = [
    ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.c_ulong,
]  # fmt: skip
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_PR_SET_PTRACER, _PR_SET_PTRACER_ANY = 0x59616D61, ctypes.c_ulong(-1)


def pid_gid(pid: int) -> str:
    """The fake RoCE GID of the process `pid` (its last 32 bits are the pid)."""
    return f"fe80:0000:0000:0000:0000:0000:{pid >> 16 & 0xFFFF:04x}:{pid & 0xFFFF:04x}"


class ProcessFabric(Fabric):
    """FAKE DEVICE across processes (see the module docstring): this process's view of a fabric whose
    shared state is files in `state_dir`; READs copy from the holder process with process_vm_readv."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.pid = os.getpid()
        port = Port(link_layer=E.IBV_LINK_LAYER_ETHERNET, lid=0, gids=[(pid_gid(self.pid), E.IBV_GID_TYPE_SYSFS_ROCE_V2)])  # fmt: skip
        super().__init__([Dev("fake_roce0", ports=[port])])
        self.keys = itertools.count((self.pid & 0x3FF) << 20 | 0x100)  # rkeys distinct across processes
        # where Yama restricts ptrace to descendants, let sibling processes (other daemons) read us
        _libc.prctl(_PR_SET_PTRACER, _PR_SET_PTRACER_ANY, 0, 0, 0)

    def current_mode(self) -> str:
        for name in (f"mode-{self.pid}", "mode"):
            try:
                return (self.dir / name).read_text().strip() or "execute"
            except FileNotFoundError:
                continue
        return "execute"

    def _file(self, kind: str, pid: int, n: int) -> Path:
        return self.dir / f"{kind}-{pid}-{n}"

    def mr_added(self, rkey: int, info: MRInfo) -> None:
        super().mr_added(rkey, info)
        host = info.addr if info.host is None else info.host
        self._file("mr", self.pid, rkey).write_text(f"{info.addr} {info.length} {info.access} {host}")

    def mr_removed(self, rkey: int) -> None:
        super().mr_removed(rkey)
        self._file("mr", self.pid, rkey).unlink(missing_ok=True)

    def qp_created(self, qp: Any) -> None:
        super().qp_created(qp)
        self._file("qp", self.pid, qp.qp_num).write_text("init")

    def qp_closed(self, qp: Any) -> None:
        super().qp_closed(qp)
        self._file("qp", self.pid, qp.qp_num).unlink(missing_ok=True)

    def connect(self, qp: Any, attr: Any) -> None:
        gr = getattr(attr.ah_attr, "gr", None)
        if gr is None:
            raise PyverbsError("fake RoCE needs a global route", 22)
        parts = str(gr.dgid).split(":")
        qp.dest_pid = int(parts[6], 16) << 16 | int(parts[7], 16)
        if not self._file("qp", qp.dest_pid, attr.dest_qp_num).exists():
            raise PyverbsError("Failed to modify QP state to RTR", 22)
        self._file("qp", self.pid, qp.qp_num).write_text(f"{qp.dest_pid} {attr.dest_qp_num}")

    def execute_read(self, qp: Any, wr: Any) -> bool:
        dpid, dqpn = qp.dest_pid, qp.attr.dest_qp_num
        try:
            peer = self._file("qp", dpid, dqpn).read_text()
            addr, length, access, host = map(int, self._file("mr", dpid, wr.rkey).read_text().split())
        except (FileNotFoundError, ValueError):
            return False
        total = sum(s[1] for s in wr.sges)
        if (
            peer != f"{self.pid} {qp.qp_num}" or not access & E.IBV_ACCESS_REMOTE_READ
            or not addr <= wr.raddr or wr.raddr + total > addr + length or not self.local_ok(wr)
        ):  # fmt: skip
            return False
        local = (_IOVec * len(wr.sges))(*[_IOVec(self.mrs[k].to_host(a), n) for a, n, k in wr.sges])
        remote = (_IOVec * 1)(_IOVec(host + (wr.raddr - addr), total))
        return _libc.process_vm_readv(dpid, local, len(wr.sges), remote, 1, 0) == total


_PACKAGE_INIT = '''"""FAKE pyverbs for tests (tests/transport/fakeverbs.py ProcessFabric): no RDMA device exists here."""
import importlib.util as _u
import sys as _s

_spec = _u.spec_from_file_location("polarkv_fakeverbs", {source!r})
_mod = _u.module_from_spec(_spec)
_s.modules["polarkv_fakeverbs"] = _mod
_spec.loader.exec_module(_mod)
fabric = _mod.ProcessFabric({state!r})
'''
_SUBMODULES = {
    "device": "globals().update(vars(_p.fabric.verbs.device))",
    "pd": "globals().update(vars(_p.fabric.verbs.pd))",
    "mr": "globals().update(vars(_p.fabric.verbs.mr))",
    "cq": "globals().update(vars(_p.fabric.verbs.cq))",
    "qp": "globals().update(vars(_p.fabric.verbs.qp))",
    "wr": "globals().update(vars(_p.fabric.verbs.wr))",
    "addr": "globals().update(vars(_p.fabric.verbs.addr))",
    "enums": "globals().update(vars(_p.fabric.verbs.e))",
    "pyverbs_error": "PyverbsError = _p.fabric.verbs.Error",
}


def write_fake_pyverbs(root: str | os.PathLike[str], state_dir: str | os.PathLike[str]) -> str:
    """Write a FAKE `pyverbs` package under `root` backed by ProcessFabric(state_dir); returns the
    directory to give a daemon as `cluster.pyverbs_path`."""
    pkg = Path(root) / "pyverbs"
    pkg.mkdir(parents=True, exist_ok=True)
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        _PACKAGE_INIT.format(source=str(Path(__file__).resolve()), state=str(state_dir))
    )
    for name, body in _SUBMODULES.items():
        (pkg / f"{name}.py").write_text(f"import pyverbs as _p\n{body}\n")
    return str(root)

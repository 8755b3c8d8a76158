"""RDMA: which transport a daemon takes and why, READ planning, per-peer fallback, the peer parameters,
the verbs objects against the real pyverbs 44, and (where a device exists) a real RDMA READ.

These machines have no RDMA device (no kernel support), so: the probe runs against the real pyverbs
where Debian's python3-pyverbs is installed (it fails in get_device_list(), as on any host without a
device); faults a real part cannot produce here (DOWN ports, RoCE GID tables, error completions,
READs that never complete) use tests/transport/fakeverbs.py; `@pytest.mark.rdma` tests run where
`ibv_devices` lists a device with an active port and skip with the reason elsewhere.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import random
import shutil
import subprocess
import sys

import msgpack
import numpy as np
import pytest

from polarkvd.errors import ConfigError, ProtocolError
from polarkvd.transport import rdma_params, rdma_probe
from polarkvd.transport.peer_client import PeerClient
from polarkvd.transport.rdma import PeerTransports, RdmaDevice
from polarkvd.transport.rdma_params import (
    PageRef,
    PeerParams,
    RdmaError,
    RdmaNotSupported,
    RdmaTimeout,
    ReadOp,
    RemoteRegion,
    Segment,
    TransportKind,
    plan_reads,
)
from polarkvd.transport.rdma_probe import TransportChoice, describe_choice, probe
from tests.conftest import REPO_ROOT, FakeClock, bad_pages, chain_tokens, clean_env, store_chain
from tests.transport.fakeverbs import Dev, E, Fabric, Port

# ---------------------------------------------------------------------------------------------- helpers


@functools.cache
def debian_pyverbs_path() -> str | None:
    """The directory a system Python on PATH imports pyverbs from (Debian's python3-pyverbs), or None.
    $POLARKV_TEST_PYVERBS_PATH overrides the search."""
    if os.environ.get("POLARKV_TEST_PYVERBS_PATH"):
        return os.environ["POLARKV_TEST_PYVERBS_PATH"]
    code = "import os, pyverbs; print(os.path.dirname(os.path.dirname(pyverbs.__file__)))"
    seen = set()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        exe = os.path.join(d, "python3")
        if not os.access(exe, os.X_OK) or os.path.realpath(exe) in seen:
            continue
        seen.add(os.path.realpath(exe))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        try:
            r = subprocess.run([exe, "-c", code], capture_output=True, text=True, timeout=30, env=env)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    return None


@pytest.fixture(scope="module")
def real_verbs():
    """The real pyverbs 44 loaded into this Python through cluster.pyverbs_path's loader."""
    path = debian_pyverbs_path()
    if path is None:
        pytest.skip("Debian's python3-pyverbs is not installed (apt-get install python3-pyverbs)")
    try:
        return rdma_probe.import_verbs(path)
    except ImportError as e:
        pytest.skip(f"pyverbs from {path} does not load into this Python: {e}")


@functools.cache
def device_skip_reason() -> str | None:
    """None where `ibv_devices` lists a device and the probe finds an active port; else why not."""
    exe = shutil.which("ibv_devices")
    if exe is None:
        return "no ibv_devices (apt-get install ibverbs-utils), so no RDMA device is known"
    r = subprocess.run([exe], capture_output=True, text=True, timeout=30)
    listed = [line.split()[0] for line in r.stdout.splitlines()[2:] if line.strip()]
    if r.returncode != 0 or not listed:
        return f"ibv_devices lists no RDMA device ({(r.stderr or r.stdout).strip() or r.returncode})"
    path = debian_pyverbs_path()
    if path is None:
        return "python3-pyverbs is not installed"
    choice = probe("auto", pyverbs_path=path)
    if choice.kind is not TransportKind.RDMA:
        return f"RDMA device listed but not usable: {choice.reason}"
    return None


def needs_device() -> None:
    reason = device_skip_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def fabric(monkeypatch: pytest.MonkeyPatch) -> Fabric:
    """A fake host (see fakeverbs.py) behind the module's lazy import."""
    fab = Fabric()
    monkeypatch.setattr(rdma_probe, "import_verbs", lambda path="": fab.verbs)
    return fab


def _missing(path: str = "") -> None:
    raise ImportError("No module named 'pyverbs'")


# ---------------------------------------------------------------------------------------------- probe


def test_tcp_setting_never_touches_pyverbs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        rdma_probe, "import_verbs", lambda path="": pytest.fail("pyverbs imported for transport = tcp")
    )
    c = probe("tcp")
    assert c.kind is TransportKind.TCP and c.reason == "configured"
    assert describe_choice(c) == "transport tcp (cluster.transport = tcp): configured"


def test_auto_without_pyverbs_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rdma_probe, "import_verbs", _missing)
    c = probe("auto")
    assert c.kind is TransportKind.TCP
    assert c.reason == "pyverbs not importable: No module named 'pyverbs'"
    line = describe_choice(c)
    assert (
        line.startswith("transport tcp (cluster.transport = auto): pyverbs not importable")
        and "docs/RDMA.md" in line
    )


def test_the_import_is_lazy_and_its_failure_is_the_reason() -> None:
    """In this venv (no --system-site-packages) pyverbs does not import: importing the module costs
    nothing, and probe() reports the real import error."""
    code = (
        "import sys; from polarkvd.transport import rdma, rdma_probe; assert 'pyverbs' not in sys.modules; "
        "print(rdma_probe.probe('auto').reason)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=clean_env())  # fmt: skip
    assert r.returncode == 0, r.stderr
    reason = r.stdout.strip()
    if reason.startswith("pyverbs not importable"):
        assert "No module named 'pyverbs'" in reason
    else:  # a venv that can import pyverbs: then it is the device list that decides
        assert reason.startswith(("no RDMA device", "no active RDMA port")) or "active" in reason


def test_pyverbs_path_loads_the_real_library_and_reports_no_device(real_verbs) -> None:
    """The real pyverbs, loaded alone from Debian's directory: on a host without RDMA support
    get_device_list() raises, and that is the reason given."""
    path = debian_pyverbs_path()
    assert real_verbs.device.__name__ == "pyverbs.device" and real_verbs.origin.startswith(path)
    c = probe("auto", pyverbs_path=path)
    if device_skip_reason() is None:
        assert c.kind is TransportKind.RDMA
        return
    assert c.kind is TransportKind.TCP
    assert c.reason.startswith("no RDMA device"), c.reason
    with pytest.raises(ConfigError) as info:
        probe("rdma", pyverbs_path=path)
    assert info.value.problems[0][:2] == ("cluster.transport", "rdma")
    assert c.reason in str(info.value) and 'transport = "auto"' in str(info.value)


def test_a_pyverbs_path_that_is_not_a_directory_is_the_reason(tmp_path) -> None:
    c = probe("auto", pyverbs_path=str(tmp_path / "nope"))
    assert c.kind is TransportKind.TCP and "is not a directory" in c.reason


def test_a_pyverbs_built_for_another_python_is_named_as_the_cause(tmp_path) -> None:
    """Debian's pyverbs is compiled for the system Python; a daemon on another minor version is told so."""
    pkg = tmp_path / "pyverbs"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "device.cpython-399-x86_64-linux-gnu.so").write_bytes(b"")
    code = f"from polarkvd.transport import rdma_probe; print(rdma_probe.probe('auto', pyverbs_path={str(tmp_path)!r}).reason)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=clean_env())  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("pyverbs not importable: No module named 'pyverbs.device'")
    assert "its compiled modules are cpython-399-x86_64-linux-gnu.so; this Python needs cpython-3" in r.stdout


def test_the_real_device_open_fails_cleanly_without_a_device(real_verbs) -> None:
    if device_skip_reason() is None:
        pytest.skip("this host has an RDMA device")
    choice = TransportChoice(TransportKind.RDMA, "test", "rdma", "mlx5_0", 1, 0, "InfiniBand")
    with pytest.raises(RdmaError, match="cannot open RDMA device mlx5_0 port 1"):
        RdmaDevice(choice, verbs=real_verbs)


@pytest.mark.parametrize(
    "fabric_kw, reason",
    [
        ({"list_error": "Failed to get devices list"}, "no RDMA device (get_device_list() failed: Failed to get devices list)"),
        ({"devices": []}, "no RDMA device (get_device_list() lists none)"),
        ({"devices": [Dev("mlx5_0", [Port(state=E.IBV_PORT_DOWN)])]}, "no active RDMA port (mlx5_0 port 1: DOWN)"),
        ({"devices": [Dev("mlx5_0", openable=False)]}, "no active RDMA port (mlx5_0: cannot open (Failed to open device mlx5_0))"),
        (
            {"devices": [Dev("rxe0", [Port(link_layer=E.IBV_LINK_LAYER_ETHERNET, gids=[(rdma_probe._ZERO_GID, 1)])])]},
            "no active RDMA port (rxe0 port 1: no GID configured (no IP address on the RoCE interface?))",
        ),
    ],
)  # fmt: skip
def test_auto_falls_back_with_the_precise_reason(monkeypatch: pytest.MonkeyPatch, fabric_kw, reason) -> None:
    fab = Fabric(**fabric_kw)
    monkeypatch.setattr(rdma_probe, "import_verbs", lambda path="": fab.verbs)
    c = probe("auto")
    assert (c.kind, c.reason) == (TransportKind.TCP, reason)
    with pytest.raises(ConfigError, match="RDMA is not usable here"):
        probe("rdma")


def test_auto_takes_the_first_active_port(monkeypatch: pytest.MonkeyPatch) -> None:
    fab = Fabric(
        [
            Dev("mlx5_0", [Port(state=E.IBV_PORT_DOWN)]),
            Dev("mlx5_1", [Port(state=E.IBV_PORT_DOWN), Port(lid=9)]),
        ]
    )
    monkeypatch.setattr(rdma_probe, "import_verbs", lambda path="": fab.verbs)
    for setting in ("auto", "rdma"):
        c = probe(setting)
        assert (c.kind, c.device, c.port, c.gid_index, c.link_layer) == (
            TransportKind.RDMA,
            "mlx5_1",
            2,
            0,
            "InfiniBand",
        )
        assert c.reason == "mlx5_1 port 2 active (InfiniBand, lid 9, gid index 0)"
    assert (
        describe_choice(c)
        == "transport rdma (cluster.transport = rdma): mlx5_1 port 2 active (InfiniBand, lid 9, gid index 0)"
    )
    assert sum(1 for x in fab.closed if x.startswith("ctx")) == 4  # every probed context closed again


def test_roce_picks_a_v2_ipv4_gid_unless_one_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    gids = [
        ("fe80:0000:0000:0000:5054:00ff:fe12:3456", 0),  # v1 link-local
        ("fe80:0000:0000:0000:5054:00ff:fe12:3456", 1),  # v2 link-local
        ("0000:0000:0000:0000:0000:ffff:0a00:0001", 0),  # v1 IPv4
        ("0000:0000:0000:0000:0000:ffff:0a00:0001", 1),  # v2 IPv4: the one RoCE fabrics route
    ]
    fab = Fabric([Dev("mlx5_0", [Port(link_layer=E.IBV_LINK_LAYER_ETHERNET, lid=0, gids=gids)])])
    monkeypatch.setattr(rdma_probe, "import_verbs", lambda path="": fab.verbs)
    c = probe("auto")
    assert (c.gid_index, c.link_layer) == (3, "Ethernet") and "RoCE v2" in c.reason
    assert probe("auto", gid_index=1).gid_index == 1
    assert probe("auto", gid_index=7).kind is TransportKind.TCP  # out of the table: the reason says so
    assert "gid index 7 out of range" in probe("auto", gid_index=7).reason


def test_a_named_device_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    fab = Fabric([Dev("mlx5_0"), Dev("mlx5_1", [Port(), Port(lid=4)])])
    monkeypatch.setattr(rdma_probe, "import_verbs", lambda path="": fab.verbs)
    assert (probe("auto", device="mlx5_1").device, probe("auto", device="mlx5_1").port) == ("mlx5_1", 1)
    assert probe("auto", device="mlx5_1:2").port == 2
    assert probe("auto", device="mlx5_7").reason == "RDMA device 'mlx5_7' not found (devices: mlx5_0, mlx5_1)"
    assert "has no port 3" in probe("auto", device="mlx5_1:3").reason
    with pytest.raises(ConfigError, match="cluster.rdma_device"):
        probe("auto", device=":2")


def test_an_unknown_setting_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="cluster.transport"):
        probe("infiniband")


def test_the_options_parse_and_refuse(tmp_path) -> None:
    from polarkvd.config import load_config

    cfg = load_config(env={}, overrides={"cluster.transport": "tcp", "cluster.rdma_device": "mlx5_0:1", "cluster.rdma_gid_index": "3"})  # fmt: skip
    assert (cfg.cluster.transport, cfg.cluster.rdma_device, cfg.cluster.rdma_gid_index) == (
        "tcp",
        "mlx5_0:1",
        3,
    )
    assert load_config(env={}).cluster.transport == "auto"
    for key, bad in (
        ("cluster.transport", "ib"),
        ("cluster.rdma_device", "mlx5 0"),
        ("cluster.rdma_gid_index", "256"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(env={}, overrides={key: bad})


# ---------------------------------------------------------------------------------------------- planning


def test_whole_pages_in_neighbouring_slots_become_one_read() -> None:
    ops = plan_reads(
        [(0x1000, 0), (0x1100, 0x100), (0x1200, 0x200)], (0, 4), 0x40, max_sge=4, max_bytes=1 << 20
    )
    assert ops == [ReadOp(0x1000, 0, 0x300, (Segment(0, 0x300),), (0, 1, 2))]


def test_a_layer_slice_reads_only_those_layers() -> None:
    # 4 layers of 0x40 bytes per page; layers 1..2 of each page are at +0x40, 0x80 bytes long
    ops = plan_reads([(0x1000, 0x800), (0x5000, 0x900)], (1, 3), 0x40, max_sge=4, max_bytes=1 << 20)
    assert ops == [
        ReadOp(0x1040, 0, 0x80, (Segment(0x840, 0x80),), (0,)),
        ReadOp(0x5040, 0, 0x80, (Segment(0x940, 0x80),), (1,)),
    ]


def test_contiguous_remote_pages_scatter_into_scattered_slots_up_to_max_sge() -> None:
    pages = [(0x1000 + i * 0x100, 0x10000 - i * 0x1000) for i in range(5)]
    ops = plan_reads(pages, (0, 1), 0x100, max_sge=2, max_bytes=1 << 20)
    assert [op.pages for op in ops] == [(0, 1), (2, 3), (4,)]
    assert ops[0].segments == (Segment(0x10000, 0x100), Segment(0xF000, 0x100))
    assert all(op.length == sum(s.length for s in op.segments) for op in ops)


def test_max_bytes_splits_and_rkeys_never_mix() -> None:
    ops = plan_reads(
        [PageRef(0, 0, 1), PageRef(0x300, 0x300, 1), PageRef(0x600, 0x600, 2)], (0, 3), 0x100, 4, 0x200
    )
    assert [(op.remote_addr, op.rkey, op.length, op.pages) for op in ops] == [
        (0x000, 1, 0x200, (0,)),
        (0x200, 1, 0x200, (0, 1)),
        (0x400, 1, 0x200, (1,)),
        (0x600, 2, 0x200, (2,)),
        (0x800, 2, 0x100, (2,)),
    ]


@pytest.mark.parametrize("args", [((0, 0), 64, 1, 64), ((2, 1), 64, 1, 64), ((0, 1), 0, 1, 64), ((0, 1), 64, 0, 64), ((0, 1), 64, 1, 0), ((0, 1), 64, 1, 1 << 32)])  # fmt: skip
def test_bad_plans_are_refused(args) -> None:
    with pytest.raises(ValueError):
        plan_reads([(0, 0)], *args)
    with pytest.raises(ValueError, match="page 0"):
        plan_reads([(-1, 0)], (0, 1), 64, 1, 64)


@pytest.mark.parametrize("seed", range(20))
def test_executing_a_plan_lands_exactly_the_requested_bytes(seed: int) -> None:
    """Random holders' layouts, slot orders, layer ranges and limits: copying each READ's remote bytes
    into its scatter list gives exactly what copying each page's slice would, and nothing else."""
    rng = random.Random(seed)
    layers, lb = rng.randint(1, 6), rng.choice([16, 48, 64])
    page = layers * lb
    n = rng.randint(1, 12)
    remote_slots = rng.sample(range(n + 4), n) if rng.random() < 0.5 else list(range(n))
    local_slots = rng.sample(range(n + 4), n)
    remote = np.random.default_rng(seed).integers(0, 256, (n + 4) * page, dtype=np.uint8)
    lo = rng.randrange(layers)
    hi = rng.randint(lo + 1, layers)
    pages = [(remote_slots[i] * page, local_slots[i] * page) for i in range(n)]
    max_sge, max_bytes = rng.randint(1, 4), rng.choice([lb, 2 * lb + 8, 1 << 20])
    ops = plan_reads(pages, (lo, hi), lb, max_sge, max_bytes)
    got = np.zeros((n + 4) * page, np.uint8)
    for op in ops:
        assert 1 <= len(op.segments) <= max_sge and op.length <= max_bytes
        data, at = remote[op.remote_addr : op.remote_addr + op.length], 0
        for s in op.segments:
            got[s.local_offset : s.local_offset + s.length] = data[at : at + s.length]
            at += s.length
        assert at == op.length
    want = np.zeros_like(got)
    for r, loc in pages:
        want[loc + lo * lb : loc + hi * lb] = remote[r + lo * lb : r + hi * lb]
    assert np.array_equal(got, want)
    assert [p for op in ops for p in op.pages] == sorted(p for op in ops for p in op.pages)  # page order kept


# ---------------------------------------------------------------------------------------------- fallback


def rdma_choice() -> TransportChoice:
    return TransportChoice(TransportKind.RDMA, "mlx5_0 port 1 active", "auto", "mlx5_0", 1, 0, "InfiniBand")


def test_a_failed_peer_uses_tcp_until_its_backoff_passes_then_rdma_again() -> None:
    clock = FakeClock(100.0)
    pt = PeerTransports(rdma_choice(), backoff=10, max_backoff=35, clock=clock)
    assert pt.choose("b", True) is TransportKind.RDMA
    assert pt.failed("b", RdmaTimeout("rdma: timed out")) == 10
    kind, why = pt.decide("b", True)
    assert kind is TransportKind.TCP and "timed out" in why and "retrying in 10s" in why
    assert pt.choose("c", True) is TransportKind.RDMA  # other peers are not affected
    clock.now += 10
    assert pt.decide("b", True) == (TransportKind.RDMA, "retrying RDMA after 1 failure(s)")
    assert pt.failed("b", "again") == 20  # consecutive failures double the back-off...
    clock.now += 20
    assert pt.failed("b", "again") == 35  # ...up to max_backoff
    assert pt.report()["b"] == {"failures": 3, "error": "again", "retry_in_s": 35.0}
    clock.now += 35
    pt.succeeded("b")  # a success clears the record
    assert pt.report() == {} and pt.choose("b", True) is TransportKind.RDMA
    pt.failed("b", "x")
    pt.forget("b")  # a peer that left starts clean when it returns
    assert pt.choose("b", True) is TransportKind.RDMA


def test_tcp_when_we_or_the_peer_have_no_rdma() -> None:
    pt = PeerTransports(rdma_choice(), clock=FakeClock())
    assert pt.decide("b", False) == (TransportKind.TCP, "the peer offers no RDMA")
    tcp = PeerTransports(TransportChoice(TransportKind.TCP, "no RDMA device (x)"), clock=FakeClock())
    assert tcp.decide("b", True) == (TransportKind.TCP, "this daemon uses TCP: no RDMA device (x)")


# ---------------------------------------------------------------------------------------------- parameters


def good_params() -> PeerParams:
    return PeerParams(
        lid=3, gid=bytes(range(16)), qpn=0x1234, psn=0xABCDE, mtu=5, rd_atomic=16,
        regions=(RemoteRegion("dram", 0x7F00_0000_0000, 64 << 20, 0x1F2E), RemoteRegion("dmp", 0x7E00_0000_0000, 4 << 20, 7)),
    )  # fmt: skip


def test_params_round_trip_through_the_wire_encoding() -> None:
    p = good_params()
    wire = msgpack.unpackb(msgpack.packb(p.to_wire()), raw=False)  # what the TCP peer channel carries
    assert PeerParams.from_wire(wire) == p
    assert p.region("dram").address_of(4096, 4096) == 0x7F00_0000_1000
    with pytest.raises(ProtocolError, match="outside region 'dmp'"):
        p.region("dmp").address_of((4 << 20) - 10, 11)
    with pytest.raises(ProtocolError, match="no region 'gpu'"):
        p.region("gpu")
    assert rdma_params.gid_to_bytes(rdma_params.gid_to_text(p.gid)) == p.gid


@pytest.mark.parametrize(
    "change, error",
    [
        ({"v": 2}, "version 2 not supported"),
        ({"qpn": 0}, "qpn must be an integer in 1..16777215"),
        ({"qpn": 1 << 24}, "qpn must be"),
        ({"psn": "5"}, "psn must be an integer"),
        ({"lid": True}, "lid must be an integer"),
        ({"mtu": 6}, "mtu must be an integer in 1..5"),
        ({"rd_atomic": 0}, "rd_atomic must be"),
        ({"gid": b"\x00" * 15}, "gid must be 16 bytes"),
        ({"gid": "fe80::1"}, "gid must be 16 bytes"),
        ({"regions": {"dram": 1}}, "regions must be a list"),
        ({"regions": [["dram", 1, 2]]}, "a region is [name, addr, length, rkey]"),
        ({"regions": [["", 1, 2, 3]]}, "region name must be"),
        ({"regions": [["dram", -1, 2, 3]]}, "region 'dram' addr must be"),
        ({"regions": [["dram", 1, 0, 3]]}, "region 'dram' length must be"),
        ({"regions": [["dram", 1, 2, 1 << 32]]}, "region 'dram' rkey must be"),
        ({"regions": [["dram", (1 << 64) - 1, 2, 3]]}, "wraps around"),
        ({"regions": [["a", 1, 2, 3], ["a", 5, 2, 3]]}, "listed twice"),
        ({"regions": [[f"r{i}", 1, 2, 3] for i in range(9)]}, "at most 8"),
    ],
)
def test_bad_peer_params_are_refused_with_the_field(change: dict, error: str) -> None:
    wire = {**good_params().to_wire(), **change}
    with pytest.raises(ProtocolError) as info:
        PeerParams.from_wire(wire)
    assert error in str(info.value) and info.value.code.value == "bad_request"


def test_params_must_be_a_map() -> None:
    with pytest.raises(ProtocolError, match="expected a map"):
        PeerParams.from_wire([1, 2])


# ---------------------------------------------------------------------------------------------- the real pyverbs objects


def test_connect_attributes_build_with_the_real_pyverbs(real_verbs) -> None:
    """The QP attributes for INIT->RTR->RTS, built from the real pyverbs 44 classes (no device needed
    for these): every name and value we set exists and reads back."""
    v, peer = real_verbs, good_params()
    kw = dict(
        port=1,
        gid_index=3,
        local_mtu=v.e.IBV_MTU_1024,
        sq_psn=77,
        max_rd_atomic=8,
        max_dest_rd_atomic=16,
        peer=peer,
    )
    a = rdma_params.build_connect_attr(v, global_route=True, **kw)
    assert (a.dest_qp_num, a.rq_psn, a.sq_psn, a.path_mtu) == (0x1234, 0xABCDE, 77, v.e.IBV_MTU_1024)
    assert (a.max_rd_atomic, a.max_dest_rd_atomic, a.timeout, a.retry_cnt, a.rnr_retry) == (8, 16, 14, 7, 7)
    assert a.qp_access_flags == v.e.IBV_ACCESS_LOCAL_WRITE | v.e.IBV_ACCESS_REMOTE_READ  # never remote write
    ah = a.ah_attr
    assert (ah.is_global, ah.sgid_index, ah.dgid) == (1, 3, rdma_params.gid_to_text(peer.gid))
    b = rdma_params.build_connect_attr(v, global_route=False, **kw)
    assert (b.ah_attr.is_global, b.ah_attr.dlid) == (0, 3)


def test_read_work_requests_build_with_the_real_pyverbs(real_verbs) -> None:
    v = real_verbs
    ops = plan_reads(
        [(0x10000 + i * 0x100, 0x8000 - i * 0x1000) for i in range(5)], (0, 1), 0x100, 2, 1 << 20
    )
    wrs = rdma_params.build_read_wrs(v, ops, base=0x7F00_0000_0000, lkey=0x55, first_id=40)
    try:
        assert [(w.wr_id, w.num_sge, w.opcode, w.send_flags) for w in wrs] == [
            (40 + i, len(op.segments), v.e.IBV_WR_RDMA_READ, v.e.IBV_SEND_SIGNALED)
            for i, op in enumerate(ops)
        ]
    finally:
        rdma_params.free_wrs(wrs)


# ---------------------------------------------------------------------------------------------- endpoints (fake device)


def _buffer(size: int, seed: int | None = None) -> bytearray:
    return bytearray(
        np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
        if seed is not None
        else size
    )


def _pair(fab: Fabric, clock: FakeClock | None = None, size: int = 1 << 16, **kw):
    """Two devices in one process, each with its "dram" region registered first (as the daemon does),
    and an endpoint connected back to back through the rdma_connect exchange (msgpack, as on the wire)."""
    choice = rdma_choice()
    holder, fetcher = RdmaDevice(choice, verbs=fab.verbs), RdmaDevice(choice, verbs=fab.verbs)
    remote, local = _buffer(size, seed=size), _buffer(size)
    holder.register_buffer("dram", remote)
    fetcher.register_buffer("dram", local)
    extra = (
        {"clock": clock, "sleep": lambda s: setattr(clock, "now", clock.now + max(s, 1e-3))} if clock else {}
    )
    ep = fetcher.endpoint(**extra, **kw)
    _, reply = holder.accept(msgpack.unpackb(msgpack.packb(ep.local_params())))
    ep.connect(msgpack.unpackb(msgpack.packb(reply)))
    return holder, fetcher, ep, remote, local


def test_read_pages_back_to_back_on_the_fake_fabric(fabric: Fabric) -> None:
    holder, fetcher, ep, remote, local = _pair(fabric)
    r = ep.peer.region("dram")
    assert (r.length, r.rkey) == (len(remote), holder.regions["dram"].rkey)
    pages = [PageRef(r.address_of(i * 4096, 4096), (15 - i) * 4096, r.rkey) for i in range(8)]
    ops = plan_reads(pages, (0, 4), 1024, ep.max_sge, ep.max_bytes)
    assert ep.read_ops(ops) == 8 * 4096
    for i in range(8):
        assert local[(15 - i) * 4096 : (16 - i) * 4096] == remote[i * 4096 : (i + 1) * 4096]
    ep.read(r.address_of(0, 100), r.rkey, 60000, 100)
    assert local[60000:60100] == remote[:100]
    assert set(fabric.wr_closes) == {1}  # every SGE and WR freed exactly once
    # out of the peer's region: refused before anything is posted, the QP stays usable
    with pytest.raises(ProtocolError, match="outside the peer's regions"):
        ep.read(r.addr + r.length - 10, r.rkey, 0, 20)
    with pytest.raises(ValueError, match="outside region 'dram'"):
        ep.read(r.addr, r.rkey, len(local) - 10, 20)
    too_wide = plan_reads(pages, (0, 4), 1024, ep.max_sge + 1, ep.max_bytes)
    with pytest.raises(ValueError, match="exceeds this QP's limits"):
        ep.read_ops(too_wide)
    assert ep.broken is None
    ep.read(r.addr, r.rkey, 0, 10)
    fetcher.close()
    holder.close()
    assert not fabric.qps and not fabric.mrs


def test_an_error_completion_tears_the_qp_down(fabric: Fabric) -> None:
    holder, fetcher, ep, remote, local = _pair(fabric)
    r = ep.peer.region("dram")
    fabric.mode = "fail"
    with pytest.raises(RdmaError, match="Remote access error"):
        ep.read(r.addr, r.rkey, 0, 4096)
    assert ep.broken and ep.qp is None and ep.cq is None
    with pytest.raises(RdmaError, match="unusable"):
        ep.read(r.addr, r.rkey, 0, 4096)
    assert set(fabric.wr_closes) == {1}


def test_a_read_that_never_completes_times_out_and_is_flushed(fabric: Fabric) -> None:
    clock = FakeClock()
    holder, fetcher, ep, remote, local = _pair(fabric, clock, timeout=2.0, depth=4)
    r = ep.peer.region("dram")
    fabric.mode = "hang"
    qp = ep.qp
    pages = [PageRef(r.address_of(i * 4096, 4096), i * 4096, r.rkey) for i in range(0, 16, 2)]
    ops = plan_reads(pages, (0, 1), 4096, 1, 4096)
    start = clock.now
    with pytest.raises(RdmaTimeout, match="timed out with 4 of 8 READs outstanding"):
        ep.read_ops(ops)
    assert 2.0 <= clock.now - start < 3.0
    assert qp.qp_state == E.IBV_QPS_ERR and not qp.pending  # moved to ERROR and flushed before raising
    assert ep.broken and ep.qp is None  # then destroyed: no late DMA into our slots
    assert set(fabric.wr_closes) == {1}


def test_connect_validates_and_reports(fabric: Fabric) -> None:
    dev = RdmaDevice(rdma_choice(), verbs=fabric.verbs)
    ep = dev.endpoint()
    with pytest.raises(ProtocolError, match="qpn"):
        ep.connect({**good_params().to_wire(), "qpn": "x"})
    with pytest.raises(RdmaError, match="connecting to qpn 4660 failed"):
        ep.connect(good_params().to_wire())  # no such QP on the fabric
    assert ep.broken
    with pytest.raises(RdmaError, match="not connected"):
        dev.endpoint().read_ops([])
    dev.close()


def test_register_buffer_keeps_the_mapping_alive(fabric: Fabric) -> None:
    dev = RdmaDevice(rdma_choice(), verbs=fabric.verbs)
    m = mmap.mmap(-1, 1 << 16)
    region = dev.register_buffer("dram", m)
    assert region.base == ctypes.addressof(ctypes.c_char.from_buffer(m)) and region.length == 1 << 16
    with pytest.raises(BufferError):
        m.close()  # registered memory cannot be unmapped under the device
    with pytest.raises(ValueError, match="twice"):
        dev.register_buffer("dram", bytearray(10))
    with pytest.raises(ValueError, match="writable"):
        dev.register_buffer("ro", b"abc")
    dev.deregister("dram")
    m.close()
    dev.close()


def test_dmabuf_and_cuda_say_what_is_missing(fabric: Fabric, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = RdmaDevice(rdma_choice(), verbs=fabric.verbs)
    with pytest.raises(RdmaNotSupported, match="no DmaBufMR"):
        dev.register_dmabuf("gpu", 5, 1 << 16)  # the fake, like a pyverbs older than rdma-core 34
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(RdmaNotSupported, match="GPUDirect needs cuda-python"):
        dev.register_cuda("gpu", 0x7000_0000, 1 << 16)
    dev.close()


def test_pyverbs_44_has_dmabuf_registration(real_verbs) -> None:
    assert hasattr(real_verbs.mr, "DmaBufMR")
    assert "dmabuf" in (real_verbs.mr.DmaBufMR.__init__.__doc__ or "")


# ---------------------------------------------------------------------------------------------- a real device


@pytest.mark.rdma
def test_real_rdma_read_back_to_back() -> None:
    """Two endpoints of one device in one process, connected back to back: READ pages, bytes equal."""
    needs_device()
    path = debian_pyverbs_path()
    choice = probe("rdma", pyverbs_path=path)
    holder, fetcher = RdmaDevice(choice, pyverbs_path=path), RdmaDevice(choice, pyverbs_path=path)
    remote, local = mmap.mmap(-1, 1 << 20), mmap.mmap(-1, 1 << 20)
    remote[:] = os.urandom(1 << 20)
    try:
        holder.register_buffer("dram", remote)
        fetcher.register_buffer("dram", local)
        ep = fetcher.endpoint(timeout=5.0)
        _, reply = holder.accept(ep.local_params())
        ep.connect(reply)
        r = ep.peer.region("dram")
        pages = [PageRef(r.address_of(i * 65536, 65536), (15 - i) * 65536, r.rkey) for i in range(16)]
        ops = plan_reads(pages, (0, 4), 16384, ep.max_sge, ep.max_bytes)
        assert ep.read_ops(ops) == 1 << 20
        for i in range(16):
            assert local[(15 - i) * 65536 : (16 - i) * 65536] == remote[i * 65536 : (i + 1) * 65536]
    finally:
        fetcher.close()
        holder.close()
        remote.close()
        local.close()


@pytest.mark.rdma
@pytest.mark.gpu
def test_real_rdma_read_into_cuda_memory() -> None:
    """GPUDirect: READ into CUDA memory registered through a dma-buf."""
    needs_device()
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        try:
            from cuda import cuda as cu
        except ImportError:
            pytest.skip("cuda-python is not installed")
    if cu.cuInit(0)[0] != cu.CUresult.CUDA_SUCCESS:
        pytest.skip("no CUDA device")
    err, dev = cu.cuDeviceGet(0)
    err, ctx = cu.cuCtxCreate(0, dev)
    size = 1 << 21
    err, ptr = cu.cuMemAlloc(size)
    path = debian_pyverbs_path()
    choice = probe("rdma", pyverbs_path=path)
    holder, fetcher = RdmaDevice(choice, pyverbs_path=path), RdmaDevice(choice, pyverbs_path=path)
    remote = mmap.mmap(-1, size)
    remote[:] = os.urandom(size)
    try:
        holder.register_buffer("dram", remote)
        try:
            fetcher.register_cuda("gpu", int(ptr), size)
        except RdmaNotSupported as e:
            pytest.skip(str(e))
        ep = fetcher.endpoint(timeout=5.0)
        _, reply = holder.accept(ep.local_params())
        ep.connect(reply)
        r = ep.peer.region("dram")
        ep.read(r.addr, r.rkey, 0, size, region="gpu")
        back = bytearray(size)
        assert cu.cuMemcpyDtoH(back, ptr, size)[0] == cu.CUresult.CUDA_SUCCESS
        assert bytes(back) == remote[:]
    finally:
        fetcher.close()
        holder.close()
        remote.close()
        cu.cuMemFree(ptr)
        cu.cuCtxDestroy(ctx)


# ---------------------------------------------------------------------------------------------- the daemon


def _cluster_sets(**extra: str) -> dict[str, str]:
    return {
        "cluster.enabled": "true",
        "cluster.insecure": "true",
        "cluster.node_id": "solo",
        "cluster.gossip_address": "127.0.0.1:0",
        "cluster.data_address": "127.0.0.1:0",
        **extra,
    }


def _serves_over_tcp(d) -> None:
    """A peer fetches pages from the daemon's data address over TCP: byte-exact."""
    with d.engine() as kv:
        keys = store_chain(kv, chain_tokens(5, 3))
        ns_digest = kv.ns_digest
    with d.control() as c:
        rep = c.cluster()
    views = [memoryview(bytearray(kv.page_bytes)) for _ in keys]
    with PeerClient(key=None, timeout=10) as client:
        header, ok = client.call(rep["data_address"], "get", {"ns": ns_digest, "keys": keys}, into=lambda h: views[: len(h["sizes"])])  # fmt: skip
    assert ok == [True] * len(keys)
    with d.engine() as kv:
        assert bad_pages(kv, keys, views) == []
    return rep


@pytest.mark.cluster
def test_a_daemon_without_rdma_starts_says_why_and_serves_over_tcp(daemon_factory) -> None:
    """transport = auto in a venv that cannot import pyverbs: the daemon starts, logs which transport
    it took and why, reports it, and serves pages to peers over TCP."""
    d = daemon_factory(_cluster_sets(**{"cluster.transport": "auto"}))
    line = next((x for x in d.log().splitlines() if "transport tcp (cluster.transport = auto)" in x), None)
    assert line is not None, d.log()
    assert "pyverbs not importable" in line or "no RDMA device" in line or "no active RDMA port" in line
    rep = _serves_over_tcp(d)
    assert rep["page_transport"]["kind"] == "tcp" and rep["page_transport"]["reason"] in line


@pytest.mark.cluster
def test_a_daemon_with_the_real_pyverbs_and_no_device_says_no_device(daemon_factory) -> None:
    path = debian_pyverbs_path()
    if path is None:
        pytest.skip("Debian's python3-pyverbs is not installed")
    if device_skip_reason() is None:
        pytest.skip("this host has an RDMA device")
    d = daemon_factory(_cluster_sets(**{"cluster.transport": "auto", "cluster.pyverbs_path": path}))
    log = d.log()
    if "pyverbs not importable" in log:
        pytest.skip("Debian's pyverbs does not load into this Python (another minor version)")
    assert "transport tcp (cluster.transport = auto): no RDMA device (get_device_list() failed" in log
    _serves_over_tcp(d)


@pytest.mark.cluster
def test_transport_rdma_without_a_device_refuses_to_start(daemon_factory) -> None:
    with pytest.raises(RuntimeError) as info:
        daemon_factory(_cluster_sets(**{"cluster.transport": "rdma"}))
    text = str(info.value)
    assert "daemon exited with 78" in text
    assert "cluster.transport = 'rdma': RDMA is not usable here" in text

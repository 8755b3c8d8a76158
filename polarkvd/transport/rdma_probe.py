"""Whether this host uses RDMA, decided once at start, and importing pyverbs.

`probe`: `cluster.transport = "auto" | "rdma" | "tcp"`. `auto` takes RDMA when pyverbs imports and
`get_device_list()` lists a device with an ACTIVE port, else TCP with the precise reason; `rdma`
refuses to start (ConfigError, exit 78) when that probe fails, because the operator asked for it
explicitly; `tcp` never touches pyverbs. `describe_choice` is the one log line that says why.

pyverbs is imported lazily and only here. It is Debian's `python3-pyverbs` (rdma-core 44 here), built
for the system Python; PyPI's `pyverbs` needs a matching libibverbs and does not import against
Debian's. A venv that cannot import it gets it through `cluster.pyverbs_path`: that directory's
`pyverbs` package alone is loaded (not the rest of the directory, so no other system package can
shadow the venv's). docs/RDMA.md says how to enable it on an RDMA host.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import threading
import types
from typing import TYPE_CHECKING, Any

from polarkvd.errors import ConfigError

if TYPE_CHECKING:
    from polarkvd.config import ClusterSection

from polarkvd.transport.rdma_params import (
    SETTINGS,
    TransportKind,
)

log = logging.getLogger("polarkvd.transport.rdma")

# ---------------------------------------------------------------------------------------------- pyverbs


class ImportFailure(ImportError):
    pass


_verbs_cache: dict[str, types.SimpleNamespace] = {}
_verbs_lock = threading.Lock()


def import_verbs(pyverbs_path: str = "") -> types.SimpleNamespace:
    """pyverbs' modules as one namespace: device, pd, mr, cq, qp, wr, addr, e (enums), Error.

    Raises ImportError whose text says what failed. With `pyverbs_path`, the `pyverbs` package of that
    directory is loaded on its own (a spec over just that directory), unless pyverbs is loaded already."""
    with _verbs_lock:
        if pyverbs_path in _verbs_cache:
            return _verbs_cache[pyverbs_path]
        if pyverbs_path and not os.path.isdir(pyverbs_path):
            raise ImportFailure(f"cluster.pyverbs_path {pyverbs_path!r} is not a directory")
        if pyverbs_path and "pyverbs" not in sys.modules:
            load_package_from(pyverbs_path)
        try:
            mods = {
                name: importlib.import_module(f"pyverbs.{name}")
                for name in ("device", "pd", "mr", "cq", "qp", "wr", "addr", "enums", "pyverbs_error")
            }
        except ImportError as err:
            raise ImportFailure(import_hint(err)) from err
        verbs = types.SimpleNamespace(
            **{k: v for k, v in mods.items() if k not in ("enums", "pyverbs_error")},
            e=mods["enums"],
            Error=mods["pyverbs_error"].PyverbsError,
            origin=os.path.dirname(getattr(sys.modules["pyverbs"], "__file__", "") or "?"),
        )
        _verbs_cache[pyverbs_path] = verbs
        return verbs


def load_package_from(path: str) -> None:
    spec = importlib.machinery.PathFinder.find_spec("pyverbs", [path])
    if spec is None or spec.loader is None:
        raise ImportFailure(f"no pyverbs package in cluster.pyverbs_path {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pyverbs"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules["pyverbs"]
        raise ImportFailure(f"loading pyverbs from {path!r} failed: {err}") from err


def import_hint(err: ImportError) -> str:
    """The import error, plus the likely cause when pyverbs' compiled modules are for another Python."""
    text = str(err)
    pkg = sys.modules.get("pyverbs")
    where = getattr(pkg, "__path__", None)
    if where and "pyverbs." in text:
        suffixes = {
            n.split(".", 1)[1] for d in where if os.path.isdir(d) for n in os.listdir(d) if n.endswith(".so")
        }
        mine = importlib.machinery.EXTENSION_SUFFIXES[0].lstrip(".")
        if suffixes and mine not in suffixes:
            text += f" (its compiled modules are {', '.join(sorted(suffixes))}; this Python needs {mine})"
    return text


# ---------------------------------------------------------------------------------------------- the choice


@dataclasses.dataclass(frozen=True)
class TransportChoice:
    kind: TransportKind
    reason: str
    setting: str = "auto"
    device: str | None = None
    port: int | None = None
    gid_index: int | None = None
    link_layer: str | None = None  # "InfiniBand" or "Ethernet" (RoCE)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["kind"] = self.kind.value
        return out


def describe_choice(choice: TransportChoice) -> str:
    """The start-up log line: which transport, what was asked for, and why."""
    text = f"transport {choice.kind.value} (cluster.transport = {choice.setting}): {choice.reason}"
    if choice.kind is TransportKind.TCP and choice.setting == "auto":
        text += "; pages move over TCP (docs/RDMA.md says how to enable RDMA)"
    return text


def parse_device_spec(spec: str) -> tuple[str, int | None]:
    """`cluster.rdma_device`: "" (any), "NAME" (any active port) or "NAME:PORT"."""
    name, sep, port = spec.strip().partition(":")
    if sep and (not port.isdigit() or not 1 <= int(port) <= 255):
        raise ValueError(f"expected NAME or NAME:PORT (port 1..255), got {spec!r}")
    if not name and spec.strip():
        raise ValueError(f"expected NAME or NAME:PORT, got {spec!r}")
    return name, int(port) if sep else None


def probe_cluster(c: ClusterSection) -> TransportChoice:
    """`probe` with the `[cluster]` options."""
    return probe(c.transport, device=c.rdma_device, gid_index=c.rdma_gid_index, pyverbs_path=c.pyverbs_path)


def probe(setting: str, *, device: str = "", gid_index: int = -1, pyverbs_path: str = "") -> TransportChoice:
    """Decide the page transport. "rdma" without a usable device raises ConfigError (exit 78)."""
    if setting not in SETTINGS:
        raise ConfigError([("cluster.transport", setting, f"expected one of {', '.join(SETTINGS)}")])
    if setting == "tcp":
        return TransportChoice(TransportKind.TCP, "configured", setting)
    choice = _probe_rdma(setting, device, gid_index, pyverbs_path)
    if setting == "rdma" and choice.kind is not TransportKind.RDMA:
        raise ConfigError(
            [
                (
                    "cluster.transport",
                    "rdma",
                    f'RDMA is not usable here: {choice.reason} (transport = "auto" falls back to TCP)',
                )
            ]
        )
    return choice


def _tcp(setting: str, reason: str) -> TransportChoice:
    return TransportChoice(TransportKind.TCP, reason, setting)


def _probe_rdma(setting: str, device: str, gid_index: int, pyverbs_path: str) -> TransportChoice:
    try:
        want_name, want_port = parse_device_spec(device)
    except ValueError as err:
        raise ConfigError([("cluster.rdma_device", device, str(err))]) from None
    try:
        v = import_verbs(pyverbs_path)
    except ImportError as err:
        return _tcp(setting, f"pyverbs not importable: {err}")
    try:
        devices = v.device.get_device_list()
    except (v.Error, OSError) as err:
        return _tcp(setting, f"no RDMA device (get_device_list() failed: {err})")
    names = [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in devices]
    if not names:
        return _tcp(setting, "no RDMA device (get_device_list() lists none)")
    if want_name and want_name not in names:
        return _tcp(setting, f"RDMA device {want_name!r} not found (devices: {', '.join(names)})")
    tried: list[str] = []
    for name in [want_name] if want_name else names:
        try:
            ctx = v.device.Context(name=name)
        except (v.Error, OSError) as err:
            tried.append(f"{name}: cannot open ({err})")
            continue
        try:
            found = _probe_ports(v, ctx, name, want_port, gid_index, tried)
        except (v.Error, OSError) as err:
            tried.append(f"{name}: query failed ({err})")
            found = None
        finally:
            ctx.close()
        if found is not None:
            port, gid, link, detail = found
            return TransportChoice(
                TransportKind.RDMA, f"{name} port {port} active ({detail})", setting, name, port, gid, link
            )
    return _tcp(setting, f"no active RDMA port ({'; '.join(tried)})")


def _probe_ports(
    v: Any, ctx: Any, name: str, want_port: int | None, gid_index: int, tried: list[str]
) -> tuple[int, int, str, str] | None:
    nports = ctx.query_device().phys_port_cnt
    for port in [want_port] if want_port else range(1, nports + 1):
        if port > nports:
            tried.append(f"{name} has no port {port} (ports 1..{nports})")
            continue
        pa = ctx.query_port(port)
        if pa.state != v.e.IBV_PORT_ACTIVE:
            state = (
                v.device.port_state_to_str(pa.state) if hasattr(v.device, "port_state_to_str") else pa.state
            )
            tried.append(f"{name} port {port}: {state}")
            continue
        link = "Ethernet" if pa.link_layer == v.e.IBV_LINK_LAYER_ETHERNET else "InfiniBand"
        try:
            gid, note = _pick_gid(v, ctx, port, pa, gid_index, link)
        except LookupError as err:
            tried.append(f"{name} port {port}: {err}")
            continue
        lid = f"lid {pa.lid}, " if link == "InfiniBand" else ""
        return port, gid, link, f"{link}, {lid}gid index {gid}{note}"
    return None


_ZERO_GID = "0000:0000:0000:0000:0000:0000:0000:0000"
_V4_MAPPED = "0000:0000:0000:0000:0000:ffff:"


def _pick_gid(v: Any, ctx: Any, port: int, pa: Any, gid_index: int, link: str) -> tuple[int, str]:
    """The GID index to use: the configured one, 0 on InfiniBand, else the best RoCE GID: v2 with an
    IPv4-mapped address, then v2, then v1 (routable RoCE v2 is what RoCE fabrics are set up for)."""
    if gid_index >= 0:
        if gid_index >= pa.gid_tbl_len:
            raise LookupError(f"gid index {gid_index} out of range (table has {pa.gid_tbl_len})")
        if str(ctx.query_gid(port, gid_index)) == _ZERO_GID:
            raise LookupError(f"gid index {gid_index} is empty")
        return gid_index, " (configured)"
    if link == "InfiniBand":
        return 0, ""
    best: tuple[int, int] | None = None
    for i in range(pa.gid_tbl_len):
        try:
            gid = str(ctx.query_gid(port, i))
        except (v.Error, OSError):
            continue
        if gid == _ZERO_GID:
            continue
        try:
            v2 = ctx.query_gid_type(port, i) == v.e.IBV_GID_TYPE_SYSFS_ROCE_V2
        except (v.Error, OSError):
            v2 = False
        score = (0 if gid.startswith(_V4_MAPPED) else 1) if v2 else 2
        if best is None or score < best[0]:
            best = (score, i)
    if best is None:
        raise LookupError("no GID configured (no IP address on the RoCE interface?)")
    return best[1], " (RoCE v2)" if best[0] < 2 else " (RoCE v1)"

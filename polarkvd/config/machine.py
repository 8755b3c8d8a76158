"""Machine-dependent defaults: where the sockets and the state go (the system service's directories,
or the user's), and `resolve`, which turns "auto" sizes and empty paths of a configuration into
concrete values for this machine (`polarkvd/resources.py` then checks the machine can give them)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from polarkvd.config.values import AUTO, GiB, MiB

if TYPE_CHECKING:
    from polarkvd.config import Config


def default_runtime_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("RUNTIME_DIRECTORY"):  # systemd RuntimeDirectory=
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/run/polarkv")
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "polarkv"
    return Path(f"/tmp/polarkv-{os.getuid()}")


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("STATE_DIRECTORY"):  # systemd StateDirectory=
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/polarkv")
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "polarkv"


SYSTEM_RUNTIME_DIR = Path("/run/polarkv")  # the system service's (systemd RuntimeDirectory=polarkv)


def _client_socket(env: Mapping[str, str], var: str, name: str) -> Path:
    """A client's default: $VAR, else this user's runtime directory, else the system service's."""
    if env.get(var):
        return Path(env[var])
    own = default_runtime_dir(env) / name
    system = SYSTEM_RUNTIME_DIR / name
    return own if own.exists() or not system.exists() else system


def default_engine_socket(env: Mapping[str, str] | None = None) -> Path:
    """Where engines find the daemon: $POLARKV_SOCKET, else the user's or the system's runtime dir."""
    return _client_socket(os.environ if env is None else env, "POLARKV_SOCKET", "engine.sock")


def default_control_socket(env: Mapping[str, str] | None = None) -> Path:
    return _client_socket(os.environ if env is None else env, "POLARKV_CONTROL_SOCKET", "control.sock")


def free_bytes(path: Path) -> int:
    """Free bytes of the file system that holds `path` (or would: its nearest existing parent)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def tree_bytes(path: Path) -> int:
    """Bytes the files under `path` occupy on disk."""
    total = 0
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            for name in files:
                try:
                    total += os.stat(os.path.join(root, name)).st_blocks * 512
                except OSError:
                    pass
    return total


def resolve(cfg: Config, env: Mapping[str, str] | None = None) -> Config:
    """A copy with every path filled in and every "auto" size computed for this machine."""
    import psutil

    out = dataclasses.replace(
        cfg,
        daemon=dataclasses.replace(cfg.daemon),
        dram=dataclasses.replace(cfg.dram),
        disk=dataclasses.replace(cfg.disk),
        metrics=dataclasses.replace(cfg.metrics),
        cluster=dataclasses.replace(cfg.cluster),
        vram=dataclasses.replace(cfg.vram),
        quotas=dataclasses.replace(cfg.quotas),
    )
    d = out.daemon
    d.runtime_dir = d.runtime_dir or str(default_runtime_dir(env))
    d.state_dir = d.state_dir or str(default_state_dir(env))
    d.engine_socket = d.engine_socket or str(Path(d.runtime_dir) / "engine.sock")
    d.control_socket = d.control_socket or str(Path(d.runtime_dir) / "control.sock")
    out.disk.path = out.disk.path or str(Path(d.state_dir) / "pages")
    d.tuning_file = d.tuning_file or str(Path(d.state_dir) / "tuning.toml")
    d.seed_file = d.seed_file or str(Path(d.state_dir) / "page-seed")
    if not out.cluster.node_id:
        import socket

        out.cluster.node_id = socket.gethostname()
    if out.dram.capacity == AUTO:
        total = psutil.virtual_memory().total
        shm_free = free_bytes(Path(out.dram.shm_dir))
        cap = min(2 * GiB, total // 8, shm_free // 2)
        out.dram.capacity = max(out.dram.slab_bytes, cap // out.dram.slab_bytes * out.dram.slab_bytes)
    if out.disk.capacity == AUTO:
        free = free_bytes(Path(out.disk.path)) + tree_bytes(Path(out.disk.path))
        out.disk.capacity = max(64 * MiB, min(16 * GiB, free // 4))
    return out

"""What this machine can give a resolved configuration: RAM, the arena's tmpfs, locked memory, disk
space and, for `cluster.transport = "rdma"`, an RDMA device (the probe).

Checked by `polarkvd serve` at start-up and by `polarkvd check-config`; kept out of `config/`,
which stays a leaf that reads and validates settings without looking at the machine's devices.
"""

from __future__ import annotations

import os
import resource
import shutil
from pathlib import Path

from polarkvd.config import Config
from polarkvd.config.machine import free_bytes, tree_bytes
from polarkvd.config.values import GiB
from polarkvd.errors import ConfigError
from polarkvd.transport.rdma_probe import probe_cluster  # imports pyverbs itself only when probing


def check_resources(cfg: Config) -> list[tuple[str, object, str]]:
    """What this machine cannot give the (resolved) config, with the numbers. Empty when it fits."""
    import psutil

    out: list[tuple[str, object, str]] = []
    gib = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    avail = psutil.virtual_memory().available
    if cfg.dram.capacity > avail:
        out.append(
            (
                "dram.capacity",
                cfg.dram.capacity,
                f"needs {gib(cfg.dram.capacity)} but only {gib(avail)} of RAM is available",
            )
        )
    shm = Path(cfg.dram.shm_dir)
    if not shm.is_dir():
        out.append(("dram.shm_dir", cfg.dram.shm_dir, "is not a directory"))
    else:
        shm_free = shutil.disk_usage(shm).free
        if cfg.dram.capacity > shm_free:
            out.append(
                (
                    "dram.capacity",
                    cfg.dram.capacity,
                    f"needs {gib(cfg.dram.capacity)} of {shm} but only {gib(shm_free)} is free",
                )
            )
    if cfg.dram.lock_memory:
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft != resource.RLIM_INFINITY and soft < cfg.dram.capacity:
            out.append(
                (
                    "dram.lock_memory",
                    True,
                    f"RLIMIT_MEMLOCK is {gib(soft)}, below dram.capacity {gib(cfg.dram.capacity)} (set LimitMEMLOCK=infinity)",
                )
            )
    if cfg.disk.enabled:
        p = Path(cfg.disk.path)
        free = free_bytes(p) + tree_bytes(p)
        if cfg.disk.capacity > free:
            out.append(
                (
                    "disk.capacity",
                    cfg.disk.capacity,
                    f"needs {gib(cfg.disk.capacity)} at {p} but only {gib(free)} is free there (counting pages already stored)",
                )
            )
    if cfg.cluster.enabled and cfg.dram.capacity + cfg.cluster.dmp_bytes > avail:
        out.append(
            (
                "cluster.dmp_bytes",
                cfg.cluster.dmp_bytes,
                f"lending {gib(cfg.cluster.dmp_bytes)} beside dram.capacity {gib(cfg.dram.capacity)} "
                f"needs more than the {gib(avail)} of RAM available",
            )
        )
    out.extend(path_problems(cfg))
    if cfg.cluster.enabled and cfg.cluster.transport == "rdma":
        try:
            probe_cluster(cfg.cluster)
        except ConfigError as e:
            out.extend(e.problems)
    return out


#: A Unix socket's path is at most this many bytes (sun_path is 108, with its NUL).
MAX_SOCKET_PATH = 107


def path_problems(cfg: Config) -> list[tuple[str, object, str]]:
    """The directories the daemon creates or writes at start: each must be (or can become) a directory
    this user writes in, and a socket path must fit a Unix socket address."""
    out: list[tuple[str, object, str]] = []
    d = cfg.daemon
    dirs = [
        (f"daemon.{k}", getattr(d, k), Path(getattr(d, k)).parent)
        for k in ("engine_socket", "control_socket")
    ]
    if cfg.disk.enabled:
        dirs.append(("disk.path", cfg.disk.path, Path(cfg.disk.path)))
    if not (cfg.cluster.enabled and cfg.cluster.key_file) and not os.path.lexists(d.seed_file):
        dirs.append(("daemon.seed_file", d.seed_file, Path(d.seed_file).parent))  # created at start
    for key, value, path in dirs:
        why = _dir_problem(path)
        if why is not None:
            out.append((key, value, why))
    for key in ("engine_socket", "control_socket"):
        n = len(os.fsencode(getattr(d, key)))
        if n > MAX_SOCKET_PATH:
            out.append(
                (
                    f"daemon.{key}",
                    getattr(d, key),
                    f"is {n} bytes long; a Unix socket path is at most {MAX_SOCKET_PATH} (choose a shorter "
                    "daemon.runtime_dir or socket path)",
                )
            )
    return out


def _dir_problem(path: Path) -> str | None:
    """Why `path` cannot be, or be created as, a directory this user writes in; None if it can."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} exists and is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        ro = " (a read-only file system)" if _read_only(existing) else ""
        return f"{existing} is not writable by this user{ro}"
    return None


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False

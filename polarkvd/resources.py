"""What this machine can give a resolved configuration: RAM, the arena's tmpfs, locked memory, disk
space and, for `cluster.transport = "rdma"`, an RDMA device (the probe).

Checked by `polarkvd serve` at start-up and by `polarkvd check-config`; kept out of `config/`,
which stays a leaf that reads and validates settings without looking at the machine's devices.
"""

from __future__ import annotations

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
    if cfg.cluster.enabled and cfg.cluster.transport == "rdma":
        try:
            probe_cluster(cfg.cluster)
        except ConfigError as e:
            out.extend(e.problems)
    return out

"""Configuration: typed, validated, layered.

A leaf package (imports only `errors`): the sections here and in `kv_events.py` and `quotas.py`, what
an option is in `options.py`, how values are parsed in `values.py`, machine-dependent defaults and
`resolve` in `machine.py`. Precedence, lowest first:

    built-in defaults  <  TOML file (--config)  <  POLARKV_<SECTION>_<KEY> environment  <  --set flags

Sizes accept units ("8GiB", "512MB", "1.5G", plain bytes); durations accept "30s", "500ms", "2m".
Every problem is collected and reported at once with its key, value and reason (`ConfigError`), so
`polarkvd check-config` can list them all. `machine.resolve()` turns "auto" sizes and empty paths into
concrete values for this machine; `polarkvd/resources.py` compares the result with what the machine has.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from polarkvd.config.kv_events import KvEventsConfig
from polarkvd.config.machine import (
    default_state_dir,
)
from polarkvd.config.options import Knob, OptionProblems
from polarkvd.config.options import option as _opt
from polarkvd.config.quotas import QuotasConfig
from polarkvd.config.values import (
    AUTO,
    GiB,
    MiB,
    choice,
    finite,
    int_in,
    number_in,
    parse_address_list,
    parse_bool,
    parse_dir,
    parse_duration,
    parse_fraction,
    parse_int,
    parse_listen_address,
    parse_mode,
    parse_path,
    parse_size,
    parse_str,
    positive,
)
from polarkvd.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _group_commit_window(value: object) -> float:
    out = parse_duration(value)
    if not 0 <= out <= 1:  # also refuses NaN
        raise ValueError("must be a duration from 0 to 1s, e.g. '2ms'")
    return out


def _lookup_table_entries(value: object) -> int:
    n = parse_int(value)
    if not 0 <= n <= 1 << 26:
        raise ValueError("must be 0 (auto) or at most 67108864")
    return n


def _min_compression_ratio(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("expected a number")
    try:
        out = float(value)
    except ValueError:
        raise ValueError("expected a number") from None
    finite(out, "a number")
    if not 1.0 <= out <= 16.0:
        raise ValueError("must be between 1 (compress whenever smaller) and 16")
    return out


def _promote_after_loads(value: object) -> int:
    n = parse_int(value)
    if not 0 <= n <= 16:
        raise ValueError("must be 0 (never) to 16")
    return n


def _size_or_auto(value: object) -> int:
    out = parse_size(value, allow_auto=True)
    if out == 0:
        raise ValueError("must be greater than zero (or 'auto')")
    return out


POLICY_NAMES = ("lru", "s3fifo", "cost")


#: daemon.max_sessions and max_unattached_connections at most: a thread each, far beyond any host's engines
MAX_CONNECTIONS = 1 << 16


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclasses.dataclass
class DaemonConfig:
    runtime_dir: str = _opt(
        "",
        parse_path,
        "sockets live here; empty = $RUNTIME_DIRECTORY, /run/polarkv (root), $XDG_RUNTIME_DIR/polarkv or /tmp/polarkv-$UID",
    )
    state_dir: str = _opt(
        "",
        parse_path,
        "persistent state; empty = $STATE_DIRECTORY, /var/lib/polarkv (root) or $XDG_STATE_HOME/polarkv",
    )
    engine_socket: str = _opt("", parse_path, "engine API socket; empty = <runtime_dir>/engine.sock")
    control_socket: str = _opt(
        "", parse_path, "control API socket (CLI, TUI); empty = <runtime_dir>/control.sock"
    )
    engine_socket_mode: int = _opt(0o660, parse_mode, "file mode of the engine socket")
    control_socket_mode: int = _opt(0o600, parse_mode, "file mode of the control socket")
    log_level: str = _opt(
        "info", choice(*LOG_LEVELS), "log level", live=Knob("log level", "of the daemon's log, live")
    )
    lease_seconds: float = _opt(
        30.0,
        positive(parse_duration),
        "pins and reservations of an engine that stops answering expire after this",
        live=Knob("lease seconds", "pins of a silent engine expire after"),
    )
    max_sessions: int = _opt(
        1024,
        int_in(1, MAX_CONNECTIONS, "each costs a thread and lookup-table room"),
        "attached engine connections at most",
    )
    max_unattached_connections: int = _opt(
        64,
        int_in(1, MAX_CONNECTIONS, "each costs a thread"),
        "engine connections that have not sent hello yet, at most (each costs a thread): a new one "
        "closes the oldest (too_large error). Engine connections (threads) <= max_sessions + this",
    )
    hello_timeout: float = _opt(
        10.0,
        positive(parse_duration),
        "an engine connection that has not attached (hello) by then is closed",
    )
    max_frame_bytes: int = _opt(16 * MiB, positive(parse_size), "largest request frame accepted")
    max_keys_per_request: int = _opt(1 << 16, positive(parse_int), "most page keys in one request")
    log_format: str = _opt(
        "text",
        choice(*LOG_FORMATS),
        "stderr log lines: text (key=value, logfmt) or json, one line per event",
    )
    shutdown_timeout: float = _opt(
        30.0,
        parse_duration,
        "at SIGTERM, wait at most this long for disk writes before exiting (keep below TimeoutStopSec)",
    )
    tuning_file: str = _opt(
        "",
        parse_path,
        "live knobs saved from `polarkvd tui`, read by `serve` right after --config; empty = <state_dir>/tuning.toml",
    )
    seed_file: str = _opt(
        "",
        parse_path,
        "the page-key seed, created mode 0600 at first start; unused in a cluster with a key file "
        "(the seed comes from the key); empty = <state_dir>/page-seed",
    )


@dataclasses.dataclass
class DramConfig:
    capacity: int = _opt(
        AUTO, _size_or_auto, "L2 arena size; auto = min(2GiB, 1/8 of RAM, 1/2 of free /dev/shm)"
    )
    slab_bytes: int = _opt(
        64 * MiB, positive(parse_size), "arena allocation unit; every page must fit in one slab"
    )
    policy: str = _opt(
        "lru",
        choice(*POLICY_NAMES),
        "eviction policy",
        live=Knob(
            "eviction policy", "lru, s3fifo (scan-resistant), or cost (keeps what is dear to recompute)"
        ),
    )
    shm_dir: str = _opt("/dev/shm", parse_dir, "where the shared-memory arena file is created")
    lock_memory: bool = _opt(False, parse_bool, "mlock the arena (needs LimitMEMLOCK); keeps KV out of swap")
    high_watermark: float = _opt(
        1.0,
        parse_fraction,
        "above this fraction of the arena in use, pages are demoted to disk in the background down to "
        "low_watermark; 1.0 = only on demand, when full",
        live=Knob("high watermark", "demote in the background above this; 1 = off"),
    )
    low_watermark: float = _opt(
        0.9,
        parse_fraction,
        "background demotion stops at this fraction (at most high_watermark)",
        live=Knob("low watermark", "…down to this fraction of DRAM"),
    )
    min_prefix_pages: int = _opt(
        1,
        positive(parse_int),
        "admission: a sequence of fewer full pages than this is not stored (reserve answers no-space); 1 = store all",
        live=Knob("min prefix pages", "shorter sequences are not stored"),
    )
    lookup_table_entries: int = _opt(
        0,
        _lookup_table_entries,
        "entries of the shared lookup table engines probe without a round trip (rounded up to a power "
        "of two, 32 bytes each); 0 = auto: twice the 64 KiB pages that fit in DRAM plus one per 256 KiB of disk, 4096..4Mi",
    )


@dataclasses.dataclass
class DiskConfig:
    enabled: bool = _opt(True, parse_bool, "keep pages evicted from DRAM compressed on disk")
    path: str = _opt("", parse_path, "page directory; empty = <state_dir>/pages")
    capacity: int = _opt(AUTO, _size_or_auto, "disk tier size; auto = min(16GiB, 1/4 of free space)")
    policy: str = _opt(
        "lru",
        choice(*POLICY_NAMES),
        "eviction policy",
        live=Knob(
            "eviction policy", "lru, s3fifo (scan-resistant), or cost (keeps what is dear to recompute)"
        ),
    )
    compression_level: int = _opt(
        1, parse_int, "zstd level (1 measured best: higher is slower and no smaller on KV)"
    )
    min_compression_ratio: float = _opt(
        1.25,
        _min_compression_ratio,
        "store a page compressed only if that makes it this many times smaller; pages that compress "
        "less are stored raw (a hit then costs a copy, not a decompression); 1 = compress whenever smaller",
    )
    io_threads: int = _opt(2, int_in(1, 256), "threads compressing, writing and reading pages")
    read_gbps: float = _opt(
        0.0,
        number_in(0, 1000),
        "page reads' GB/s the cost policy decides by; 0 = the daemon's own measurements",
    )
    max_pending_bytes: int = _opt(
        256 * MiB, positive(parse_size), "demotions queued for writing at most; more are dropped (counted)"
    )
    index_flush_seconds: float = _opt(5.0, positive(parse_duration), "how often the disk index is persisted")
    save_on_shutdown: bool = _opt(
        True,
        parse_bool,
        "at SIGTERM, write DRAM pages not yet on disk (within daemon.shutdown_timeout): restarts start warm",
    )
    write_through: bool = _opt(
        False,
        parse_bool,
        "write-through: commit answers once its pages are on disk and synced (acknowledged = durable; "
        "evictions then cost no write); false = write-back, pages are written when evicted from DRAM",
        live=Knob("write mode", "write-through: commits also go to disk"),
    )
    group_commit_window: float = _opt(
        0.002,
        _group_commit_window,
        "write-through: how long a batch of durable writes stays open for more commits before it is "
        "written and synced together (group commit); 0 = no wait",
    )
    write_through_sync: str = _opt(
        "files",
        choice("files", "filesystem"),
        "write-through: how a batch is synced: 'files' = fdatasync each page file and fsync each "
        "directory touched; 'filesystem' = one syncfs per batch (fewer syncs, but it also flushes "
        "everything else dirty on that file system: for a disk.path on a file system of its own)",
    )


@dataclasses.dataclass
class MetricsConfig:
    enabled: bool = _opt(True, parse_bool, "serve Prometheus metrics over HTTP")
    address: str = _opt(
        "127.0.0.1:9808",
        parse_listen_address,
        "HOST:PORT of the metrics endpoint (/metrics); port 0 = any free port (logged); 'off' = disabled",
    )


def _at_least_one(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("expected a number >= 1")
    try:
        out = float(value)
    except ValueError:
        raise ValueError("expected a number >= 1") from None
    finite(out, "a number >= 1")
    if not out >= 1:
        raise ValueError("must be >= 1")
    return out


def _rdma_device(value: object) -> str:
    """Empty (any device), "NAME" or "NAME:PORT"."""
    text = parse_str(value).strip()
    m = re.fullmatch(r"[A-Za-z0-9_.-]+(?::([1-9][0-9]{0,2}))?", text)
    if text and (m is None or int(m.group(1) or 1) > 255):
        raise ValueError("expected an RDMA device NAME or NAME:PORT, port 1..255 (ibv_devices lists them)")
    return text


def _gid_index(value: object) -> int:
    out = parse_int(value)
    if not -1 <= out <= 255:
        raise ValueError("expected a GID table index 0..255, or -1 to pick one")
    return out


@dataclasses.dataclass
class ClusterSection:
    enabled: bool = _opt(False, parse_bool, "join a cluster of daemons (gossip membership, meta map, DMP)")
    node_id: str = _opt("", parse_str, "this daemon's name in the cluster; empty = the host name")
    gossip_address: str = _opt(
        "0.0.0.0:7946", parse_listen_address, "HOST:PORT the gossip (membership) socket binds"
    )
    data_address: str = _opt(
        "0.0.0.0:7947",
        parse_listen_address,
        "HOST:PORT the page transport (meta map queries, page fetches) binds",
    )
    advertise_host: str = _opt(
        "",
        parse_str,
        "host or IP peers use to reach this daemon; empty = the bind host, or this host's address",
    )
    seeds: tuple[str, ...] = _opt((), parse_address_list, "gossip HOST:PORT of a few members to join through")
    key_file: str = _opt(
        "", parse_path, "the cluster's CURVE key pair (`polarkvd keygen`); required unless insecure = true"
    )
    insecure: bool = _opt(
        False,
        parse_bool,
        "explicit opt-out: no authentication between peers (trusted networks only; warned at start)",
    )
    dmp_bytes: int = _opt(0, parse_size, "DRAM this daemon lends to the cluster's pool (L3); 0 = lends none")
    replicas: int = _opt(1, positive(parse_int), "copies of each page demoted to the pool")
    lookup_timeout: float = _opt(
        0.05,
        positive(parse_duration),
        "an engine lookup waits at most this long for the cluster's answer (then: miss)",
    )
    fetch_timeout: float = _opt(
        2.0, positive(parse_duration), "a page fetch from a peer gives up after this (then: miss)"
    )
    probe_interval: float = _opt(
        0.5, positive(parse_duration), "membership: one failure-detection probe per interval"
    )
    probe_timeout: float = _opt(
        0.2, positive(parse_duration), "membership: wait for a direct ack (< probe_interval)"
    )
    suspicion_mult: float = _opt(
        4.0, _at_least_one, "membership: a suspect is declared dead after about mult*log10(n)*probe_interval"
    )
    transport: str = _opt(
        "auto",
        choice("auto", "rdma", "tcp"),
        "page fetches: auto = RDMA READ where pyverbs and an active RDMA port exist, else TCP; "
        "rdma = refuse to start without them; tcp = always TCP",
    )
    rdma_device: str = _opt(
        "", _rdma_device, "RDMA device as NAME or NAME:PORT; empty = the first active port"
    )
    rdma_gid_index: int = _opt(
        -1, _gid_index, "GID table index; -1 = 0 on InfiniBand, the best RoCE v2 GID on Ethernet"
    )
    pyverbs_path: str = _opt(
        "",
        parse_path,
        "directory with Debian's pyverbs package, loaded alone; empty = this Python's own import path",
    )


def _device_index(value: object) -> int:
    out = parse_int(value)
    if not 0 <= out <= 255:
        raise ValueError(
            "expected a CUDA device index 0..255 (as nvidia-smi numbers them, after CUDA_VISIBLE_DEVICES)"
        )
    return out


@dataclasses.dataclass
class VramConfig:
    enabled: bool = _opt(
        False,
        parse_bool,
        "L1: keep pages in a pool of GPU memory owned by the daemon; hosts without CUDA run without it",
    )
    capacity: int = _opt(4 * GiB, positive(parse_size), "size of the GPU page pool, allocated whole at start")
    device: int = _opt(0, _device_index, "CUDA device index of the pool (the engines' GPU)")
    slab_bytes: int = _opt(
        64 * MiB, positive(parse_size), "pool allocation unit; every page must fit in one slab"
    )
    cuda_api: str = _opt(
        "auto",
        choice("auto", "driver", "runtime"),
        "CUDA library: auto = the driver's libcuda, else libcudart; driver or runtime = only that one",
    )
    policy: str = _opt(
        "lru", choice(*POLICY_NAMES), "eviction policy of L1 (which pages go down to DRAM first)"
    )
    high_watermark: float = _opt(
        0.9,
        parse_fraction,
        "above this fraction of the pool in use, pages are demoted to DRAM in the background down to "
        "low_watermark (also when a reserve finds the pool full)",
    )
    low_watermark: float = _opt(
        0.75, parse_fraction, "background demotion of L1 stops at this fraction (at most high_watermark)"
    )
    promote_after_loads: int = _opt(
        2,
        _promote_after_loads,
        "a DRAM page that engines attached with L1 load this many times (lately) is copied into L1 in "
        "the background; 0 = never, 1 = on its first load",
    )


@dataclasses.dataclass
class Config:
    daemon: DaemonConfig = dataclasses.field(default_factory=DaemonConfig)
    dram: DramConfig = dataclasses.field(default_factory=DramConfig)
    disk: DiskConfig = dataclasses.field(default_factory=DiskConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    cluster: ClusterSection = dataclasses.field(default_factory=ClusterSection)
    vram: VramConfig = dataclasses.field(default_factory=VramConfig)
    quotas: QuotasConfig = dataclasses.field(default_factory=QuotasConfig)
    kv_events: KvEventsConfig = dataclasses.field(default_factory=KvEventsConfig)

    def get(self, dotted: str) -> Any:
        section, key = dotted.split(".", 1)
        return getattr(getattr(self, section), key)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "daemon": DaemonConfig,
    "dram": DramConfig,
    "disk": DiskConfig,
    "metrics": MetricsConfig,
    "cluster": ClusterSection,
    "vram": VramConfig,
    "quotas": QuotasConfig,
    "kv_events": KvEventsConfig,
}


def option_fields() -> dict[str, dataclasses.Field[Any]]:
    """Every option as "section.key" -> its dataclass field (metadata: parse, doc, live)."""
    out = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            out[f"{section}.{f.name}"] = f
    return out


LIVE_KNOBS = tuple(name for name, f in option_fields().items() if f.metadata["live"])


def shown_knob(dotted: str, value: object) -> str:
    """A knob's value for a log line: quotas.tenants is keyed by cache_salts, which are secrets."""
    if dotted == "quotas.tenants" and isinstance(value, dict):
        return f"<{len(value)} tenants>"
    return repr(value)


def parse_option(dotted: str, value: object) -> Any:
    """Parse one option value; raises ConfigError naming the key."""
    fields = option_fields()
    if dotted not in fields:
        raise ConfigError([(dotted, value, f"unknown option; known: {', '.join(sorted(fields))}")])
    try:
        return fields[dotted].metadata["parse"](value)
    except OptionProblems as e:
        raise ConfigError([(f"{dotted}.{k}", v, why) for k, v, why in e.problems]) from None
    except ValueError as e:
        raise ConfigError([(dotted, value, str(e))]) from None


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    tuning: bool = False,
) -> Config:
    """Build a Config from defaults, a TOML file, POLARKV_* variables and overrides, in that order.

    With `tuning` (what `polarkvd serve` does), the tuning overlay (`daemon.tuning_file`, live knobs
    saved from `polarkvd tui`) comes right after the file: it beats the file, while the environment
    and --set, which an operator gives explicitly at start, still beat it.
    """
    env = os.environ if env is None else env
    problems: list[tuple[str, object, str]] = []
    raw: dict[str, object] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except OSError as e:
            raise ConfigError([("--config", str(path), f"cannot read: {e.strerror or e}")]) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError([("--config", str(path), f"not valid TOML: {e}")]) from None
        for section, table in doc.items():
            if section not in SECTIONS:
                problems.append((section, "[table]", f"unknown section; known: {', '.join(SECTIONS)}"))
                continue
            if not isinstance(table, dict):
                problems.append((section, table, "expected a [table]"))
                continue
            for key, value in table.items():
                raw[f"{section}.{key}"] = value
    fields = option_fields()
    if tuning:
        overlay = tuning_path(raw, env, overrides or {})
        try:
            raw.update(read_tuning(overlay))
        except ConfigError as e:
            problems.extend(e.problems)
    for name in fields:
        var = "POLARKV_" + name.replace(".", "_").upper()
        if var in env:
            raw[name] = env[var]
    for name, value in (overrides or {}).items():
        raw[name] = value

    cfg = Config()
    for name, value in raw.items():
        if name not in fields:
            problems.append((name, value, "unknown option"))
            continue
        try:
            parsed = fields[name].metadata["parse"](value)
        except OptionProblems as e:
            problems.extend((f"{name}.{k}", v, why) for k, v, why in e.problems)
            continue
        except ValueError as e:
            problems.append((name, value, str(e)))
            continue
        section, key = name.split(".", 1)
        setattr(getattr(cfg, section), key, parsed)
    problems.extend(_cross_checks(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def _cross_checks(cfg: Config) -> list[tuple[str, object, str]]:
    out: list[tuple[str, object, str]] = []
    if cfg.dram.capacity != AUTO and cfg.dram.slab_bytes > cfg.dram.capacity:
        out.append(
            ("dram.slab_bytes", cfg.dram.slab_bytes, f"larger than dram.capacity ({cfg.dram.capacity})")
        )
    if not 1 <= cfg.disk.compression_level <= 22:
        out.append(("disk.compression_level", cfg.disk.compression_level, "zstd levels are 1..22"))
    out.extend(watermark_problems(cfg.dram.high_watermark, cfg.dram.low_watermark))
    if cfg.vram.low_watermark > cfg.vram.high_watermark:
        out.append(
            (
                "vram.low_watermark",
                cfg.vram.low_watermark,
                f"above vram.high_watermark ({cfg.vram.high_watermark})",
            )
        )
    if cfg.vram.slab_bytes > cfg.vram.capacity:
        out.append(
            ("vram.slab_bytes", cfg.vram.slab_bytes, f"larger than vram.capacity ({cfg.vram.capacity})")
        )
    c = cfg.cluster
    if c.probe_timeout >= c.probe_interval:
        out.append(
            (
                "cluster.probe_timeout",
                c.probe_timeout,
                f"must be below cluster.probe_interval ({c.probe_interval})",
            )
        )
    if c.enabled:
        if not c.key_file and not c.insecure:
            out.append(
                (
                    "cluster.key_file",
                    "",
                    "a cluster needs a key pair (`polarkvd keygen --out FILE`), or insecure = true on a trusted network",
                )
            )
        for name in ("gossip_address", "data_address"):
            if getattr(c, name) == "off":
                out.append((f"cluster.{name}", "off", "a cluster member needs this socket"))
        if (
            c.gossip_address != "off"
            and c.gossip_address == c.data_address
            and not c.gossip_address.endswith(":0")
        ):
            out.append(("cluster.data_address", c.data_address, "same as cluster.gossip_address"))
    return out


def watermark_problems(high: float, low: float) -> list[tuple[str, object, str]]:
    if low > high:
        return [("dram.low_watermark", low, f"above dram.high_watermark ({high})")]
    return []


# ---------------------------------------------------------------- the tuning overlay


def tuning_path(raw: Mapping[str, object], env: Mapping[str, str], overrides: Mapping[str, object]) -> Path:
    """Where the overlay is, from the same sources (and precedence) as the options that name it."""

    def pick(name: str) -> str:
        var = "POLARKV_" + name.replace(".", "_").upper()
        for source in (overrides.get(name), env.get(var), raw.get(name)):
            if isinstance(source, str) and source:
                return source
        return ""

    explicit = pick("daemon.tuning_file")
    if explicit:
        return Path(explicit)
    return Path(pick("daemon.state_dir") or default_state_dir(env)) / "tuning.toml"


def read_tuning(path: str | Path) -> dict[str, object]:
    """The overlay's live knobs as {"section.key": value}; {} when the file does not exist.

    Anything but a live knob is refused (ConfigError naming the file): the overlay tunes, it does not
    move sockets or resize tiers.
    """
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError([(str(path), "", f"cannot read the tuning overlay: {e.strerror or e}")]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([(str(path), "", f"tuning overlay is not valid TOML: {e}")]) from None
    out: dict[str, object] = {}
    problems: list[tuple[str, object, str]] = []
    for section, table in doc.items():
        if not isinstance(table, dict):
            problems.append((f"{path}: {section}", table, "expected a [table]"))
            continue
        for key, value in table.items():
            name = f"{section}.{key}"
            if name not in LIVE_KNOBS:
                problems.append((f"{path}: {name}", value, "only live knobs belong in the tuning overlay"))
            else:
                out[name] = value
    if problems:
        raise ConfigError(problems)
    return out


def _toml_value(value: object) -> str:
    if isinstance(value, dict):  # an inline table (quotas.tenants)
        items = ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_tuning(path: str | Path, knobs: Mapping[str, object]) -> dict[str, object]:
    """Merge `knobs` (live knob -> parsed value) into the overlay at `path`, atomically.

    Knobs already in the file and not named here are kept. Returns everything the file now holds.
    """
    path = Path(path)
    merged = {**read_tuning(path), **knobs}
    sections: dict[str, list[str]] = {}
    for name in sorted(merged):
        section, key = name.split(".", 1)
        sections.setdefault(section, []).append(f"{key} = {_toml_value(merged[name])}")
    lines = [
        "# Live knobs saved from `polarkvd tui` (or the `save_tuning` control op).",
        "# `polarkvd serve` reads this right after its --config file; POLARKV_* variables and --set",
        "# still win. Delete this file to go back to the main configuration.",
    ]
    for section, entries in sections.items():
        lines += ["", f"[{section}]", *entries]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:  # whole or not at all, also across a power loss
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:  # e.g. a full disk: the old overlay stays, and no partial copy beside it
        tmp.unlink(missing_ok=True)
        raise
    return merged

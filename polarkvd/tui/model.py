"""What the dashboard shows, as plain data: the view of one moment, rate histories, knob checks.

Pure and Textual-free, so every number on screen is computed here (and tested here) from the daemon's
`stats` / `get_knobs` / `top` / `cluster` replies. Rates are computed client side, from deltas of the
daemon's monotonic counters between two polls; a counter that goes down means the daemon restarted,
and the history starts over.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from polarkvd.config import parse_option, watermark_problems
from polarkvd.config.values import format_size
from polarkvd.errors import ConfigError

#: Rate series kept for the sparklines: name -> how to read the counter total from a stats reply.
SERIES = ("lookups", "lookup_pages", "hit_pages", "stored_bytes", "loaded_bytes")
#: The cluster's traffic, from the counters a cluster member adds to `stats` (absent ones count as 0).
CLUSTER_SERIES = (
    "hit_pages_remote", "fetched_bytes_remote", "cluster_served_bytes", "demoted_bytes_dmp",
    "cluster_fetch_failures",
)  # fmt: skip
ALL_SERIES = SERIES + CLUSTER_SERIES
HISTORY_SECONDS = 300  # five minutes of samples at the default 1 s poll


def _counter(counters: Mapping[str, int], name: str) -> int:
    if name == "hit_pages":
        return (
            counters.get("hit_pages_dram", 0)
            + counters.get("hit_pages_disk", 0)
            + counters.get("hit_pages_remote", 0)
        )
    return counters.get(name, 0)


class RateHistory:
    """Per-second rates of the counters in ALL_SERIES, one sample per poll, the last `seconds` of them."""

    def __init__(self, seconds: float = HISTORY_SECONDS) -> None:
        self.seconds = seconds
        self.samples: collections.deque[tuple[float, dict[str, float]]] = collections.deque()
        self._last: tuple[float, dict[str, int]] | None = None

    def reset(self) -> None:
        self.samples.clear()
        self._last = None

    def add(self, t: float, counters: Mapping[str, int]) -> None:
        totals = {name: _counter(counters, name) for name in ALL_SERIES}
        last, self._last = self._last, (t, totals)
        if last is None:
            return
        dt = t - last[0]
        if dt <= 0:
            return
        if any(totals[n] < last[1][n] for n in ALL_SERIES):  # the daemon restarted: counters start over
            self.samples.clear()
            return
        self.samples.append((t, {n: (totals[n] - last[1][n]) / dt for n in ALL_SERIES}))
        while self.samples and self.samples[0][0] <= t - self.seconds:
            self.samples.popleft()

    def series(self) -> dict[str, tuple[float, ...]]:
        return {n: tuple(s[n] for _, s in self.samples) for n in ALL_SERIES}


@dataclasses.dataclass(frozen=True)
class View:
    """One moment of the daemon, as the screens render it."""

    socket: str
    connected: bool = False
    stats: Mapping[str, Any] | None = None  # the last stats reply (kept while disconnected)
    knobs: Mapping[str, Any] | None = None
    top: Mapping[str, Any] | None = None
    # the last `cluster` reply: {"enabled": False} on a single host (NO_CLUSTER_OP from a daemon that
    # predates the op), None until the first one arrives
    cluster: Mapping[str, Any] | None = None
    series: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    updated: float = 0.0  # wall-clock time of the last good poll
    error: str = ""  # why the daemon cannot be reached
    retry_in: float = 0.0


# ---------------------------------------------------------------------------------------- derived numbers


@dataclasses.dataclass(frozen=True)
class TierInfo:
    name: str  # "dram", "disk", later "vram", "dmp"
    level: int  # 1 VRAM, 2 DRAM, 3 DMP, 4 disk
    used: int
    capacity: int
    pages: int
    policy: str
    hits: int
    high: float | None = None
    low: float | None = None

    @property
    def label(self) -> str:
        return f"L{self.level} {TIER_NAMES.get(self.name, self.name)}"

    @property
    def fill(self) -> float:
        return self.used / self.capacity if self.capacity else 0.0


TIER_NAMES = {"vram": "VRAM", "dram": "DRAM", "dmp": "DMP", "disk": "disk"}
# lookups answer pages found on a peer as tier 3 (DMP): they are the L3 hits, as in `polarkvd status`
_HIT_COUNTERS = {"dmp": "hit_pages_remote"}


def tiers(stats: Mapping[str, Any]) -> list[TierInfo]:
    """Every tier the daemon reports, fastest first."""
    counters = stats.get("counters", {})
    out = []
    for name, t in stats.get("tiers", {}).items():
        out.append(
            TierInfo(
                name=name,
                level=int(t.get("tier", 0)),
                used=int(t.get("bytes", 0)),
                capacity=int(t.get("capacity_bytes", 0)),
                pages=int(t.get("pages", 0)),
                policy=str(t.get("policy", "")),
                hits=int(counters.get(_HIT_COUNTERS.get(name, f"hit_pages_{name}"), 0)),
                high=t.get("high_watermark"),
                low=t.get("low_watermark"),
            )
        )
    return sorted(out, key=lambda t: t.level)


def hit_rates(stats: Mapping[str, Any]) -> tuple[int, dict[str, float], float]:
    """(pages looked up, hit rate per tier, overall hit rate), over the daemon's lifetime."""
    counters = stats.get("counters", {})
    asked = counters.get("lookup_pages", 0)
    per = {t.name: (t.hits / asked if asked else 0.0) for t in tiers(stats)}
    overall = sum(per.values())
    if "dmp" not in per and asked:  # pages found on peers are hits too on a host that lends no pool
        overall += counters.get("hit_pages_remote", 0) / asked
    return asked, per, overall


def recent_hit_rate(series: Mapping[str, tuple[float, ...]], samples: int = 60) -> float | None:
    asked = sum(series.get("lookup_pages", ())[-samples:])
    if not asked:
        return None
    return sum(series.get("hit_pages", ())[-samples:]) / asked


def tokens_loaded(stats: Mapping[str, Any]) -> int:
    """Tokens whose KV the engines loaded from the cache instead of computing (all namespaces)."""
    return sum(ns["loaded_pages"] * ns["page_tokens"] for ns in stats.get("namespace_stats", ()))


# ---------------------------------------------------------------------------------------- cluster

#: What the dashboard records for a daemon from before the `cluster` op (it answers unknown_op).
NO_CLUSTER_OP: Mapping[str, Any] = {"enabled": False, "unsupported": True}
MEMBER_STATES = ("alive", "suspect", "dead", "left")


@dataclasses.dataclass(frozen=True)
class MemberInfo:
    """One member as this daemon sees it (a row of the peers screen)."""

    node: str
    state: str  # alive | suspect | dead | left
    incarnation: int
    for_s: float  # seconds in this state
    gossip: str  # its gossip address, tcp://host:port
    data: str  # its page (data) address from its metadata; "" when it published none
    dram: tuple[int, int] | None  # (used, capacity) bytes, as it last published them
    pool: tuple[int, int] | None  # (used, capacity) of the DRAM it lends; None when it lends none
    version: str
    is_self: bool


def _space(value: Any) -> tuple[int, int] | None:
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(x, (int, float)) for x in value)
    ):
        return int(value[0]), int(value[1])
    return None


def members(report: Mapping[str, Any] | None) -> list[MemberInfo]:
    """The members of a `cluster` reply: this daemon first, then by name."""
    out = []
    for m in (report or {}).get("members", ()):
        meta = m.get("meta") if isinstance(m.get("meta"), Mapping) else {}
        pool = _space(meta.get("dmp"))
        out.append(
            MemberInfo(
                node=str(m.get("node", "")),
                state=str(m.get("state", "")),
                incarnation=int(m.get("incarnation", 0)),
                for_s=float(m.get("for_s", 0.0)),
                gossip=str(m.get("addr") or ""),
                data=str(meta.get("data") or ""),
                dram=_space(meta.get("dram")),
                pool=pool if pool is not None and pool[1] > 0 else None,
                version=str(meta.get("v") or ""),
                is_self=bool(m.get("self")),
            )
        )
    return sorted(out, key=lambda m: (not m.is_self, m.node))


def state_counts(report: Mapping[str, Any] | None) -> dict[str, int]:
    """Members per state, every state present (0 when none)."""
    counts = dict.fromkeys(MEMBER_STATES, 0)
    for m in members(report):
        counts[m.state] = counts.get(m.state, 0) + 1
    return counts


@dataclasses.dataclass(frozen=True)
class TrafficRow:
    """One kind of cluster traffic: lifetime totals and the rate series it is drawn from."""

    label: str
    pages: int
    nbytes: int | None  # None: the daemon counts no bytes for it
    series: str  # a name in CLUSTER_SERIES
    unit: str  # "B" for a byte rate, "" for pages (or events) per second


def cluster_traffic(stats: Mapping[str, Any] | None) -> list[TrafficRow]:
    """Pages found on peers, fetched, served to peers, demoted to the pool, failed fetches."""
    c = (stats or {}).get("counters", {})
    rows = (  # label, pages counter, bytes counter (or None), rate series, unit of the rate
        ("found on peers", "hit_pages_remote", None, "hit_pages_remote", ""),
        ("fetched", "fetched_pages_remote", "fetched_bytes_remote", "fetched_bytes_remote", "B"),
        ("served to peers", "cluster_served_pages", "cluster_served_bytes", "cluster_served_bytes", "B"),
        ("demoted to pool", "demoted_pages_dmp", "demoted_bytes_dmp", "demoted_bytes_dmp", "B"),
        ("failed fetches", "cluster_fetch_failures", None, "cluster_fetch_failures", ""),
    )
    return [
        TrafficRow(label, c.get(pages, 0), None if nbytes is None else c.get(nbytes, 0), series, unit)
        for label, pages, nbytes, series, unit in rows
    ]


def address_text(addr: str, width: int) -> str:
    """`tcp://10.0.0.12:7946` as `10.0.0.12:7946`, cut inside the host (never the port) to `width`."""
    text = addr.split("://", 1)[-1]
    if len(text) <= width:
        return text
    host, sep, port = text.rpartition(":")
    if not sep or len(port) + 2 > width:
        return text[: max(0, width - 1)] + "…"
    return host[: width - len(port) - 2] + "…:" + port


def endpoints_text(gossip: str, data: str, width: int) -> str:
    """Both addresses of a member in one cell: `host:gossip_port/data_port` when the host is the same."""
    g, d = gossip.split("://", 1)[-1], data.split("://", 1)[-1]
    if not d:
        return address_text(g, width)
    g_host, _, g_port = g.rpartition(":")
    d_host, _, d_port = d.rpartition(":")
    if g_host == d_host and g_port and d_port:
        ports = f":{g_port}/{d_port}"
        if len(g_host) + len(ports) <= width:
            return g_host + ports
        return g_host[: max(0, width - len(ports) - 1)] + "…" + ports
    return address_text(f"{g} {d}", width)


def used_of(space: tuple[int, int] | None) -> str:
    """`48.0/64.0 GiB` (one unit when both share it), `512.0 MiB/2.0 GiB`, or `–`."""
    if space is None:
        return "–"
    used, cap = (human_bytes(x) for x in space)
    u_num, _, u_unit = used.partition(" ")
    c_unit = cap.partition(" ")[2]
    return f"{u_num}/{cap}" if u_unit == c_unit else f"{used}/{cap}"


def pool_free(space: tuple[int, int] | None) -> str:
    """Free / capacity of a member's lent pool, or `–` when it lends none."""
    if space is None:
        return "–"
    return used_of((max(0, space[1] - space[0]), space[1]))


# ---------------------------------------------------------------------------------------- formatting


human_bytes = format_size


def human_rate(n: float, unit: str = "") -> str:
    if unit == "B":
        return f"{n / 1e9:.2f} GB/s" if n >= 1e8 else f"{n / 1e6:.1f} MB/s"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M/s"
    if n >= 1e4:
        return f"{n / 1e3:.1f}k/s"
    return f"{n:.1f}/s" if n < 100 else f"{n:.0f}/s"


def human_count(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}G"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}k"
    return f"{int(n):,}"


def human_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def clock_text(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "--:--:--"


# ---------------------------------------------------------------------------------------- knob checks


def check_knob(name: str, text: object, knobs: Mapping[str, Any]) -> Any:
    """The parsed value of one knob as typed, checked as the daemon would check it.

    Raises ValueError with a message for the operator. Nothing that fails here is ever sent.
    """
    if isinstance(text, str) and not text.strip():
        raise ValueError(f"{name}: empty; type a value or press Escape")
    try:
        value = parse_option(name, text.strip() if isinstance(text, str) else text)
    except ConfigError as e:
        raise ValueError("; ".join(f"{k} = {v!r}: {why}" for k, v, why in e.problems)) from None
    if name in ("dram.high_watermark", "dram.low_watermark"):
        high = value if name == "dram.high_watermark" else knobs.get("dram.high_watermark", 1.0)
        low = value if name == "dram.low_watermark" else knobs.get("dram.low_watermark", 0.0)
        problems = watermark_problems(high, low)
        if problems:
            k, v, why = problems[0]
            raise ValueError(f"{k} = {v!r}: {why}")
    return value


def knob_text(value: Any) -> str:
    """How a knob value is shown in an input field."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):  # quotas.tenants: typed back as JSON
        import json

        return json.dumps(value)
    return str(value)


def changed_knobs(start: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> dict[str, Any]:
    """Knobs whose value differs from what they were when the dashboard started: name -> start value."""
    if not start or not now:
        return {}
    return {k: v for k, v in start.items() if k in now and now[k] != v}

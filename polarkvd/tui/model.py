"""What the dashboard shows, as plain data: the view of one moment, rate histories, knob checks.

Pure and Textual-free, so every number on screen is computed here (and tested here) from the daemon's
`stats` / `get_knobs` / `top` replies. Rates are computed client side, from deltas of the daemon's
monotonic counters between two polls; a counter that goes down means the daemon restarted, and the
history starts over.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from polarkvd.config import format_size, parse_option, watermark_problems
from polarkvd.errors import ConfigError

#: Rate series kept for the sparklines: name -> how to read the counter total from a stats reply.
SERIES = ("lookups", "lookup_pages", "hit_pages", "stored_bytes", "loaded_bytes")
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
    """Per-second rates of the counters in SERIES, one sample per poll, the last `seconds` of them."""

    def __init__(self, seconds: float = HISTORY_SECONDS) -> None:
        self.seconds = seconds
        self.samples: collections.deque[tuple[float, dict[str, float]]] = collections.deque()
        self._last: tuple[float, dict[str, int]] | None = None

    def reset(self) -> None:
        self.samples.clear()
        self._last = None

    def add(self, t: float, counters: Mapping[str, int]) -> None:
        totals = {name: _counter(counters, name) for name in SERIES}
        last, self._last = self._last, (t, totals)
        if last is None:
            return
        dt = t - last[0]
        if dt <= 0:
            return
        if any(totals[n] < last[1][n] for n in SERIES):  # the daemon restarted: counters start over
            self.samples.clear()
            return
        self.samples.append((t, {n: (totals[n] - last[1][n]) / dt for n in SERIES}))
        while self.samples and self.samples[0][0] <= t - self.seconds:
            self.samples.popleft()

    def series(self) -> dict[str, tuple[float, ...]]:
        return {n: tuple(s[n] for _, s in self.samples) for n in SERIES}


@dataclasses.dataclass(frozen=True)
class View:
    """One moment of the daemon, as the screens render it."""

    socket: str
    connected: bool = False
    stats: Mapping[str, Any] | None = None  # the last stats reply (kept while disconnected)
    knobs: Mapping[str, Any] | None = None
    top: Mapping[str, Any] | None = None
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
                hits=int(counters.get(f"hit_pages_{name}", 0)),
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
    return asked, per, sum(per.values())


def recent_hit_rate(series: Mapping[str, tuple[float, ...]], samples: int = 60) -> float | None:
    asked = sum(series.get("lookup_pages", ())[-samples:])
    if not asked:
        return None
    return sum(series.get("hit_pages", ())[-samples:]) / asked


def tokens_loaded(stats: Mapping[str, Any]) -> int:
    """Tokens whose KV the engines loaded from the cache instead of computing (all namespaces)."""
    return sum(ns["loaded_pages"] * ns["page_tokens"] for ns in stats.get("namespace_stats", ()))


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
    return str(value)


def changed_knobs(start: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> dict[str, Any]:
    """Knobs whose value differs from what they were when the dashboard started: name -> start value."""
    if not start or not now:
        return {}
    return {k: v for k, v in start.items() if k in now and now[k] != v}

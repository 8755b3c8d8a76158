"""Panels: pure functions from a `View` (and a width) to Rich renderables.

No I/O, no widget state, no clock reads: the same view renders the same screen, which is what the
snapshot tests rely on. Widgets call these on every new snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from polarkvd.tui import model as M

BAR_FULL, BAR_EMPTY = "█", "░"
TIER_STYLES = {"vram": "green", "dram": "cyan", "dmp": "magenta", "disk": "yellow"}


def status_line(view: M.View, title: str) -> Text:
    """The top line of every screen: where we are attached and whether the daemon answers."""
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(f" {title} ", style="bold reverse")
    if view.connected and view.stats is not None:
        st = view.stats
        t.append("  ● connected", style="bold green")
        t.append(f"  up {M.human_duration(st.get('uptime_s', 0))}")
        if st.get("draining"):
            t.append("  DRAINING", style="bold yellow")
        t.append(f"  {M.clock_text(view.updated)}", style="dim")
    elif view.updated:
        t.append("  ○ disconnected", style="bold red")
        t.append(f"  last data {M.clock_text(view.updated)}", style="dim")
    else:
        t.append("  ○ connecting", style="bold yellow")
    return t


def disconnected_banner(view: M.View) -> Text:
    """Why the daemon cannot be reached and when the next attempt is (empty while connected)."""
    if view.connected:
        return Text()
    t = Text(no_wrap=False)
    t.append("Daemon not reachable", style="bold")
    t.append(f" at {view.socket}. ")
    if view.error:
        t.append(view.error.split(": ", 1)[-1] if len(view.error) > 90 else view.error)
        t.append(". ")
    t.append(f"Retrying in {view.retry_in:.1f}s", style="bold")
    if view.stats is not None:
        t.append("; numbers below are the last ones received.", style="italic")
    return t


def tier_bar(tier: M.TierInfo, width: int) -> Text:
    """`L2 DRAM  ███████░░░│░  41.2 MiB / 64.0 MiB  64%  1,318 pg`, fitted to `width` cells.

    A `│` marks the high watermark and a `╎` the low one (when background demotion is on), so the
    effect of moving them shows on the bar.
    """
    label = f"{tier.label:<8} "
    right = f" {M.human_bytes(tier.used):>9} / {M.human_bytes(tier.capacity):<9} {tier.fill * 100:3.0f}% {M.human_count(tier.pages):>7} pg"
    bar_w = max(4, width - len(label) - len(right))
    cells = [BAR_EMPTY] * bar_w
    filled = min(bar_w, round(tier.fill * bar_w))
    for i in range(filled):
        cells[i] = BAR_FULL
    marks: dict[int, str] = {}
    if tier.high is not None and tier.high < 1.0:
        marks[min(bar_w - 1, int(tier.high * bar_w))] = "│"
        if tier.low is not None:
            marks.setdefault(min(bar_w - 1, int(tier.low * bar_w)), "╎")
    style = TIER_STYLES.get(tier.name, "white")
    t = Text(no_wrap=True, overflow="crop")
    t.append(label, style="bold")
    for i, cell in enumerate(cells):
        if i in marks:
            t.append(marks[i], style="bold red")
        else:
            t.append(cell, style=style if cell == BAR_FULL else "grey35")
    t.append(right)
    return t


def tier_bars(view: M.View, width: int) -> Text:
    if view.stats is None:
        return Text("no data yet", style="dim")
    lines = [tier_bar(t, width) for t in M.tiers(view.stats)]
    return Text("\n").join(lines)


def hit_rates(view: M.View) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    if view.stats is None:
        return t
    asked, per, overall = M.hit_rates(view.stats)
    t.append("hit rate ", style="bold")
    t.append(f"{overall * 100:.1f}%", style="bold green")
    for tier in M.tiers(view.stats):
        t.append(f"  {tier.label} ")
        t.append(f"{per[tier.name] * 100:.1f}%", style=TIER_STYLES.get(tier.name, ""))
    recent = M.recent_hit_rate(view.series)
    t.append("  last min ")
    t.append("–" if recent is None else f"{recent * 100:.1f}%", style="bold")
    t.append(f"  ({M.human_count(asked)} asked)", style="dim")
    return t


def rate_value(series: Sequence[float], unit: str = "") -> str:
    return M.human_rate(series[-1], unit) if series else "–"


def prefill_saved(view: M.View, ms_per_token: float) -> Text:
    """Estimated prefill time saved, with the assumption it rests on spelled out."""
    t = Text(no_wrap=False)
    if view.stats is None:
        return t
    tokens = M.tokens_loaded(view.stats)
    t.append("prefill saved ≈ ", style="bold")
    t.append(M.human_duration(tokens * ms_per_token / 1000.0), style="bold green")
    t.append(
        f"  ({M.human_count(tokens)} tokens loaded from cache × {ms_per_token:g} ms/token, an estimate: "
        "set --prefill-ms-per-token)",
        style="dim",
    )
    return t


def sessions_table(view: M.View) -> Table:
    table = Table(expand=True, box=None, padding=(0, 1), header_style="bold", show_edge=False)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("engine", no_wrap=True, overflow="ellipsis", ratio=2)
    table.add_column("namespace (model)", no_wrap=True, overflow="ellipsis", ratio=3)
    table.add_column("hit", justify="right", no_wrap=True)
    table.add_column("asked", justify="right", no_wrap=True)
    table.add_column("stored", justify="right", no_wrap=True)
    table.add_column("loaded", justify="right", no_wrap=True)
    sessions = (view.stats or {}).get("sessions", [])
    if not sessions:
        table.add_row("", Text("no engine attached", style="dim"), "", "", "", "", "")
    for s in sessions:
        rate = s["hit_pages"] / s["lookup_pages"] * 100 if s["lookup_pages"] else 0.0
        table.add_row(
            str(s["id"]),
            s["engine_id"],
            s["model"] + (" (salted)" if s.get("cache_salt") else ""),
            f"{rate:.1f}%",
            M.human_count(s["lookup_pages"]),
            M.human_count(s["stored_pages"]),
            M.human_count(s["loaded_pages"]),
        )
    return table


def tier_summary(view: M.View) -> Text:
    """One line per tier for the tuning screen: policy, watermarks, what eviction has done."""
    t = Text(no_wrap=True, overflow="ellipsis")
    if view.stats is None:
        return t
    c = view.stats.get("counters", {})
    evicted = sum(v for k, v in c.items() if k.startswith("evicted_pages_dram"))
    for label, n in (
        ("evicted ", evicted),
        (" (watermark ", c.get("evicted_pages_dram_watermark", 0)),
        (")  demoted ", c.get("demoted_pages", 0)),
        ("  written through ", c.get("written_through_pages", 0)),
        ("  not admitted ", c.get("not_admitted_pages", 0)),
    ):
        t.append(label)
        t.append(M.human_count(n), style="bold")
    return t


# ---------------------------------------------------------------------------------------- pages screen


NAMESPACE_COLUMNS = ("namespace (model)", "DRAM", "disk", "hit", "loaded", "engines")
PREFIX_COLUMNS = ("prefix", "namespace", "pages", "bytes", "hits", "pinned")


def namespace_rows(top: Mapping[str, Any] | None) -> list[tuple[str, tuple[str, ...]]]:
    """(row key, cells) of the namespaces table, largest first."""
    rows = []
    for i, ns in enumerate((top or {}).get("namespaces", [])):
        rate = ns["hit_pages"] / ns["lookup_pages"] * 100 if ns["lookup_pages"] else 0.0
        rows.append(
            (
                f"ns{i}",
                (
                    ns["model"] + (" (salted)" if ns.get("cache_salt") else ""),
                    M.human_bytes(ns["dram_bytes"]),
                    M.human_bytes(ns["disk_bytes"]),
                    f"{rate:.1f}%",
                    M.human_count(ns["loaded_pages"]),
                    str(ns["sessions"]),
                ),
            )
        )
    return rows


def prefix_rows(top: Mapping[str, Any] | None, sort: str) -> list[tuple[str, tuple[str, ...]]]:
    """(key hex, cells) of the prefixes table, sorted by "bytes" or "hits"."""
    prefixes = list((top or {}).get("prefixes", []))
    if sort == "hits":
        prefixes.sort(key=lambda p: (p["hits"], p["bytes"], p["key"]), reverse=True)
    else:
        prefixes.sort(key=lambda p: (p["bytes"], p["hits"], p["key"]), reverse=True)
    rows = []
    for p in prefixes:
        key = p["key"].hex() if isinstance(p["key"], (bytes, bytearray)) else str(p["key"])
        pinned = p.get("pinned_pages", 0)
        rows.append(
            (
                key,
                (
                    key[:12] + "…",
                    p["model"],
                    M.human_count(p["pages"]),
                    M.human_bytes(p["bytes"]),
                    M.human_count(p["hits"]),
                    f"{pinned}" if pinned else "–",
                ),
            )
        )
    return rows


def pages_caption(top: Mapping[str, Any] | None, sort: str) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    n = (top or {}).get("prefix_count", 0)
    t.append("Prefixes in DRAM", style="bold")
    t.append(f"  {n} in all, top by {sort} (hits: pages loaded from it)", style="dim")
    return t


# ---------------------------------------------------------------------------------------- peers


def peers_placeholder(view: M.View) -> Text:
    t = Text()
    t.append("Cluster: not configured\n\n", style="bold")
    t.append(
        "This daemon runs standalone: it serves the engines of this host from DRAM and disk. "
        "When the cluster is configured, this screen lists its members: state (alive, suspect, "
        "dead), incarnation, address, DMP capacity and free space, and transfer rates."
    )
    return t

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
    dropped, cut = c.get("dropped_pages_cheap", 0), c.get("recompute_instead_pages", 0)
    if dropped or cut:  # the `cost` policy's decisions (docs/DESIGN-NOTES.md, "Cost-aware retention")
        t.append("  cost: dropped ")
        t.append(M.human_count(dropped), style="bold")
        t.append(", recomputed not fetched ")
        t.append(M.human_count(cut), style="bold")
    table = view.stats.get("tiers", {}).get("dram", {}).get("lookup_table")
    if table:  # the shared table engines answer lookups from (dram.lookup_table_entries)
        t.append("  lookup table ")
        t.append(f"{M.human_count(table['used'])}/{M.human_count(table['entries'])}", style="bold")
        if table["full"]:
            t.append(" FULL: raise dram.lookup_table_entries", style="bold red")
    return t


# ---------------------------------------------------------------------------------------- pages screen


NAMESPACE_COLUMNS = ("namespace (model)", "DRAM", "disk", "hit", "loaded", "engines")
PREFIX_COLUMNS = ("prefix", "namespace", "pages", "bytes", "hits", "pinned")


def namespace_rows(top: Mapping[str, Any] | None) -> list[tuple[str, tuple[str, ...]]]:
    """(row key, cells) of the namespaces table, largest first."""
    rows: list[tuple[str, tuple[str, ...]]] = []
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
    rows: list[tuple[str, tuple[str, ...]]] = []
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


#: Tenants listed on the pages screen at most (the largest DRAM users first).
TENANT_ROWS = 4


def tenants_panel(stats: Mapping[str, Any] | None) -> Text | Table:
    """Per-tenant usage against its quotas ([quotas]); one line while no quota is set."""
    q = (stats or {}).get("quotas")
    tenants = (q or {}).get("tenants", [])
    if not q or not (q["default_dram"] or q["default_disk"] or any(t["listed"] for t in tenants)):
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append("Tenants", style="bold")
        t.append(
            "  no quota set (cache_salt quotas: [quotas] in the config, or the tuning screen)", style="dim"
        )
        return t

    def of(used: int | None, quota: int) -> str:
        return f"{'–' if used is None else M.human_bytes(used)} / {M.human_bytes(quota) if quota else '∞'}"

    table = Table(box=None, padding=(0, 1), header_style="bold", show_edge=False)
    table.add_column("tenant", no_wrap=True, overflow="ellipsis")
    table.add_column("DRAM / quota", justify="right", no_wrap=True)
    table.add_column("disk / quota", justify="right", no_wrap=True)
    table.add_column("evicted DRAM+disk", justify="right", no_wrap=True)
    for t in tenants[:TENANT_ROWS]:
        full = t["dram_quota"] and t["dram_bytes"] >= t["dram_quota"] * 0.99
        table.add_row(
            t["tenant"],
            Text(of(t["dram_bytes"], t["dram_quota"]), style="yellow" if full else ""),
            of(t["disk_bytes"], t["disk_quota"]),
            f"{M.human_count(t['evicted_pages_dram'])} + {M.human_count(t['evicted_pages_disk'])}",
        )
    more = len(tenants) - TENANT_ROWS + q.get("tenants_not_shown", 0)
    if more > 0:
        table.add_row(Text(f"… {more} more", style="dim"), "", "", "")
    return table


def pages_caption(top: Mapping[str, Any] | None, sort: str) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    n = (top or {}).get("prefix_count", 0)
    t.append("Prefixes in DRAM", style="bold")
    t.append(f"  {n} in all, top by {sort} (hits: pages loaded from it)", style="dim")
    return t


# ---------------------------------------------------------------------------------------- peers screen


STATE_STYLES = {"alive": "green", "suspect": "bold yellow", "dead": "bold red", "left": "dim"}
WARNING = "bold yellow"
#: From this many cells on, the members table shows gossip and data addresses apart, and the version.
WIDE_MEMBERS = 110
SPARK = "▁▂▃▄▅▆▇█"


def in_cluster(view: M.View) -> bool:
    return bool(view.cluster and view.cluster.get("enabled"))


def peers_standalone(view: M.View) -> Text:
    """Not in a cluster (or no report yet): say so, and how to make this daemon a member."""
    t = Text()
    rep = view.cluster
    if rep is None:
        t.append("Cluster: ", style="bold")
        t.append(
            "no report yet" if view.connected else "no data yet (the daemon has not answered)", style="dim"
        )
        return t
    t.append("Not in a cluster\n\n", style="bold")
    if rep.get("unsupported"):
        t.append("This daemon's version has no cluster (it does not know the `cluster` control op). ")
    t.append(
        "This daemon runs standalone: its engines find pages in this host's DRAM and disk only. "
        "To pool pages with other hosts, make one key pair and copy it to every host:\n\n"
    )
    t.append("    polarkvd keygen --out /etc/polarkv/cluster.key\n\n", style="bold")
    t.append("then give every host the same section in its config and restart the daemon:\n\n")
    for line in (
        "    [cluster]",
        "    enabled = true",
        '    key_file = "/etc/polarkv/cluster.key"',
        '    seeds = ["10.0.0.1:7946", "10.0.0.2:7946"]',
    ):
        t.append(line + "\n", style="bold")
    t.append(
        "\nOpen the gossip (7946) and data (7947) ports between the hosts. Members, their state "
        "and the traffic between them show here. Details: docs/CLUSTER.md."
    )
    return t


def cluster_header(view: M.View) -> Text:
    """This member: name, incarnation, authentication, version; then its gossip and data endpoints."""
    rep = view.cluster or {}
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append("member ", style="dim")
    t.append(str(rep.get("node_id", "?")), style="bold")
    t.append("  incarnation ", style="dim")
    t.append(str(rep.get("incarnation", 0)), style="bold")
    t.append("  ")
    if rep.get("authenticated"):
        t.append("CURVE-authenticated", style="green")
    else:
        t.append("INSECURE: no authentication", style=WARNING)
    me = next((m for m in M.members(rep) if m.is_self), None)
    if me is not None and me.version:
        t.append(f"  v{me.version}", style="dim")
    t.append("\n")
    t.append("gossip ", style="dim")
    t.append(str(rep.get("gossip_address") or "–"))
    t.append("  data ", style="dim")
    t.append(str(rep.get("data_address") or "–"))
    return t


def members_caption(view: M.View) -> Text:
    """`Members  2 of 3 alive (1 suspect), 1 dead  * this daemon`."""
    rep = view.cluster or {}
    counts = M.state_counts(rep)
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append("Members", style="bold")
    t.append(f"  {rep.get('alive', 0)} of {len(rep.get('members', ()))} alive")
    if counts["suspect"]:
        t.append(" (")
        t.append(f"{counts['suspect']} suspect", style=STATE_STYLES["suspect"])
        t.append(")")
    for state in ("dead", "left"):
        if counts[state]:
            t.append(", ")
            t.append(f"{counts[state]} {state}", style=STATE_STYLES[state])
    t.append("   * this daemon", style="dim")
    return t


MEMBER_COLUMNS = ("member", "state", "inc", "since", "gossip/data", "DRAM used", "pool free")
WIDE_MEMBER_COLUMNS = (
    "member",
    "state",
    "inc",
    "since",
    "gossip",
    "data",
    "DRAM used",
    "pool free",
    "version",
)
#: Address cells are cut to these widths (narrow: one cell for both endpoints; wide: one each).
NARROW_ADDRESS, WIDE_ADDRESS = 21, 24


def member_cells(m: M.MemberInfo, wide: bool = False) -> tuple[Text, ...]:
    """The cells of one member's row. A dead or departed member's figures are its last ones: dimmed."""
    stale = "dim" if m.state in ("dead", "left") else ""
    name = Text(m.node + (" *" if m.is_self else ""), style="bold" if m.is_self else stale)
    cells = [
        name,
        Text(m.state, style=STATE_STYLES.get(m.state, "")),
        Text(str(m.incarnation), style=stale),
        Text(M.human_duration(m.for_s), style=stale),
    ]
    if wide:
        cells += [
            Text(M.address_text(m.gossip, WIDE_ADDRESS), style=stale),
            Text(M.address_text(m.data, WIDE_ADDRESS) if m.data else "–", style=stale),
        ]
    else:
        cells.append(Text(M.endpoints_text(m.gossip, m.data, NARROW_ADDRESS), style=stale))
    cells += [Text(M.used_of(m.dram), style=stale), Text(M.pool_free(m.pool), style=stale)]
    if wide:
        cells.append(Text(m.version or "–", style=stale))
    return tuple(cells)


def members_table(view: M.View, width: int) -> Table:
    """Every member, this daemon first: state, incarnation, time in that state, endpoints, space."""
    wide = width >= WIDE_MEMBERS
    table = Table(
        box=None, padding=(0, 1), pad_edge=False, collapse_padding=not wide, header_style="bold",
        show_edge=False, expand=False,
    )  # fmt: skip
    for col in WIDE_MEMBER_COLUMNS if wide else MEMBER_COLUMNS:
        right = col in ("inc", "since", "DRAM used", "pool free")
        ellipsis = col in ("member", "gossip/data", "gossip", "data")
        table.add_column(
            col, justify="right" if right else "left", no_wrap=True,
            overflow="ellipsis" if ellipsis else "fold", min_width=6 if col == "member" else None,
        )  # fmt: skip
    rows = M.members(view.cluster)
    for m in rows:
        table.add_row(*member_cells(m, wide))
    if not rows:
        table.add_row(Text("no members known", style="dim"), *[""] * (len(table.columns) - 1))
    return table


def spark(series: Sequence[float], width: int) -> str:
    """A sparkline of `series` in `width` cells, newest at the right; several samples a cell: their max."""
    if width <= 0:
        return ""
    data = list(series)
    if len(data) > width:  # bucket, as Textual's Sparkline does, so the whole window shows
        step = len(data) / width
        data = [max(data[int(i * step) : max(int((i + 1) * step), int(i * step) + 1)]) for i in range(width)]
    top = max(data, default=0.0)
    cells = [
        SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))] if top > 0 else SPARK[0]
        for v in data
    ]
    return " " * (width - len(cells)) + "".join(cells)


def traffic_table(view: M.View, width: int) -> Table:
    """Cluster traffic since the daemon started, and its rate over the last minutes."""
    rows = M.cluster_traffic(view.stats)
    table = Table(
        box=None, padding=(0, 1), pad_edge=False, collapse_padding=True, header_style="bold",
        show_edge=False, expand=False,
    )  # fmt: skip
    table.add_column("", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    # what is left for the sparkline: the other columns take about 15 + 8 + 9 + 10 cells and 4 gaps
    spark_w = max(8, min(100, width - 48))
    table.add_column("last 5 minutes", no_wrap=True, width=spark_w)
    table.add_column("now", justify="right", no_wrap=True, min_width=10)
    for row in rows:
        series = view.series.get(row.series, ())
        table.add_row(
            Text(row.label, style="bold"),
            M.human_count(row.pages) + (" pg" if row.unit == "B" or row.series == "hit_pages_remote" else ""),
            "–" if row.nbytes is None else M.human_bytes(row.nbytes),
            Text(spark(series, spark_w), style="red" if row.series == "cluster_fetch_failures" else "cyan"),
            rate_value(series, row.unit),
        )
    return table


def lent_pool(view: M.View) -> Text:
    """The DRAM this host lends to the pool (L3 DMP), or that it lends none."""
    t = Text(no_wrap=True, overflow="ellipsis")
    dmp = (view.cluster or {}).get("dmp")
    t.append("lent pool ", style="bold")
    if not dmp:
        t.append("none: this host lends no DRAM to its peers (cluster.dmp_bytes = 0)", style="dim")
        return t
    used, cap = int(dmp.get("bytes", 0)), int(dmp.get("capacity_bytes", 0))
    t.append(f"{M.human_count(dmp.get('pages', 0))} pages  ")
    t.append(f"{M.human_bytes(used)} / {M.human_bytes(cap)}", style="bold")
    t.append(f" {used / cap * 100 if cap else 0:.0f}%")
    t.append(
        f"  stored {M.human_count(dmp.get('stored_pages', 0))}  served {M.human_count(dmp.get('served_pages', 0))}"
        f"  evicted {M.human_count(dmp.get('evicted_pages', 0))}  refused {M.human_count(dmp.get('refused_pages', 0))}",
        style="dim",
    )
    return t


def _figures(t: Text, items: Sequence[tuple[str, int | str, bool]]) -> None:
    """`label value` pairs; a value flagged bad and not zero in the warning colour."""
    for label, value, bad in items:
        shown = value if isinstance(value, str) else M.human_count(value)
        t.append(f"  {label} ", style="dim")
        t.append(shown, style=WARNING if bad and value else "")


def cluster_internals(view: M.View) -> Text:
    """Gossip, peer service (the requests peers sent this daemon) and meta map counters: a line each."""
    rep = view.cluster or {}
    g, tr, mm = rep.get("gossip", {}), rep.get("transport", {}), rep.get("metamap", {})
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(f"{'gossip':<12}", style="bold")
    _figures(t, [
        ("in", g.get("packets_in", 0), False), ("out", g.get("packets_out", 0), False),
        ("bad", g.get("bad_packets", 0), True), ("probes", g.get("probes", 0), False),
        ("indirect", g.get("indirect_probes", 0), False), ("suspicions", g.get("suspicions", 0), False),
        ("refutes", g.get("refutes", 0), False), ("push-pulls", g.get("push_pulls", 0), False),
    ])  # fmt: skip
    t.append(f"\n{'peer service':<12}", style="bold")
    _figures(t, [
        ("connections", tr.get("connections", 0), False), ("requests", tr.get("requests", 0), False),
        ("in", M.human_bytes(tr.get("bytes_in", 0)), False), ("out", M.human_bytes(tr.get("bytes_out", 0)), False),
        ("auth failures", tr.get("auth_failures", 0), True), ("bad", tr.get("bad_requests", 0), True),
        ("checksum", tr.get("checksum_failures", 0), True), ("refused", tr.get("refused", 0), True),
    ])  # fmt: skip
    t.append(f"\n{'meta map':<12}", style="bold")
    _figures(t, [
        ("records owned", mm.get("owned_records", 0), False), ("local pages", mm.get("local_pages", 0), False),
        ("announced", mm.get("announcements_sent", 0), False), ("received", mm.get("announcements_received", 0), False),
        ("pending", mm.get("pending", 0), False), ("bad", mm.get("bad_messages", 0), True),
    ])  # fmt: skip
    return t

"""Pictures of benchmark results: one function per benchmark's `--json` output, drawn with matplotlib.

    polarkvd bench datapath --plot datapath.png          run, print as usual, then draw
    polarkvd bench datapath --plot-from run.json --plot datapath.svg   redraw a recorded run, no run

| benchmark | function | what it shows |
|---|---|---|
| chat | `plot_chat` | TTFT per round per configuration (log scale); prompt tokens computed per request |
| cluster | `plot_cluster` | GB/s and CPU s/GB per method per page size |
| pipeline | `plot_pipeline` | TTFT of a hit per source, layer pipelining off and on (min-max whiskers) |
| datapath | `plot_datapath` | store/load GB/s against memcpy; lookup latency against the socket round trip |
| mixed | `plot_mixed` | the decoders' step times over the run per scenario, the hit's arrival and first token marked |

matplotlib is an optional extra (`pip install 'polarkvd[plot]'`), imported only when a plot is drawn:
this module's top level is the standard library only, so every benchmark can offer `--plot` without
it. The format follows the file name: `.png` or `.svg`. Figures are sized for the documentation
(docs/img/, about 1000 px wide) and drawn with `matplotlib.figure.Figure`, no pyplot: no GUI backend,
no global state.

A benchmark wires it with `add_plot_arguments(parser)` and, in its `main`:

    if args.plot_from:
        return plots.redraw("datapath", args)
    plots.check(args)           # before a long run: a bad --plot fails now, not after it
    res = run(args)
    print(...)
    plots.after_run("datapath", res, args)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from polarkvd.errors import PolarKVError

EXTRA = "polarkvd[plot]"
FORMATS = (".png", ".svg")
#: Figure width in inches at DPI: ~1000 px, the width docs/img's pictures are shown at.
WIDTH, DPI = 10.0, 100


class PlotError(PolarKVError):
    """A plot could not be drawn: matplotlib missing, a bad file name, a JSON of another benchmark."""


# ------------------------------------------------------------------------------------- the CLI side


def add_plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plot", metavar="FILE", default=None,
                   help=f"also draw the result into FILE (.png or .svg; needs matplotlib: pip install '{EXTRA}')")  # fmt: skip
    p.add_argument("--plot-from", metavar="JSON", default=None,
                   help="do not run: draw a recorded --json output into --plot FILE (default: JSON's name with .png)")  # fmt: skip


def check(args: argparse.Namespace) -> None:
    """Before a run: --plot's format is known and matplotlib is there (a long run is not wasted)."""
    if getattr(args, "plot", None):
        plot_format(args.plot)
        require_matplotlib()


def redraw(kind: str, args: argparse.Namespace) -> int:
    """`--plot-from JSON`: draw the recorded result of `kind` into `--plot` (or JSON's name .png)."""
    src = Path(args.plot_from)
    out = Path(args.plot) if args.plot else src.with_suffix(".png")
    plot_format(out)
    res = load_result(src)
    draw(kind, res, out)
    print(f"plot: {out}", file=sys.stderr)
    return 0


def after_run(kind: str, res: dict[str, Any], args: argparse.Namespace) -> None:
    """After a run (its result already printed): draw it if --plot was given."""
    if getattr(args, "plot", None):
        draw(kind, res, Path(args.plot))
        print(f"plot: {args.plot}", file=sys.stderr)


def plot_format(path: str | Path) -> str:
    """'png' or 'svg' from the file name; anything else is a PlotError."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise PlotError(f"--plot {path}: the file name must end in .png or .svg")
    return suffix[1:]


def require_matplotlib() -> Any:
    """The matplotlib package, or a PlotError naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError as e:
        raise PlotError(
            f"plots need matplotlib, which is not installed ({e}): pip install '{EXTRA}' "
            "(or pip install matplotlib)"
        ) from None
    return matplotlib


def load_result(path: str | Path) -> dict[str, Any]:
    """A benchmark's recorded `--json` output (the last JSON object in the file, so a file that also
    caught progress lines still reads)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise PlotError(f"--plot-from {p}: {e.strerror or e}") from None
    try:
        res = json.loads(text)
    except json.JSONDecodeError:
        start = text.find("{")
        try:
            res = json.loads(text[start:]) if start >= 0 else None
        except json.JSONDecodeError as e:
            raise PlotError(f"--plot-from {p}: not a benchmark's --json output ({e})") from None
    if not isinstance(res, dict):
        raise PlotError(f"--plot-from {p}: not a benchmark's --json output (no JSON object)")
    return res


def draw(kind: str, res: dict[str, Any], path: str | Path) -> None:
    """Draw `res` (the --json output of `polarkvd bench <kind>`) into `path` (.png or .svg)."""
    try:
        fn = PLOTTERS[kind]
    except KeyError:
        raise PlotError(f"no plot for benchmark {kind!r} (plots: {', '.join(PLOTTERS)})") from None
    fmt = plot_format(path)
    require_matplotlib()
    with _style():
        try:
            fig = fn(res)
        except (KeyError, TypeError, IndexError) as e:
            raise PlotError(
                f"this result is not a `polarkvd bench {kind} --json` output this version can draw "
                f"(missing or odd {e!s}); rerun the benchmark"
            ) from None
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format=fmt, dpi=DPI)


# ------------------------------------------------------------------------------------- drawing help

#: One color per series across every plot (matplotlib's tab10, polarkvd's own in blue).
COLORS = {
    "polarkvd": "#1f77b4",
    "fetch": "#1f77b4",
    "on": "#1f77b4",
    "store": "#1f77b4",
    "nocache": "#7f7f7f",
    "prefix_cache": "#ff7f0e",
    "example_connector": "#8c564b",
    "lmcache": "#2ca02c",
    "mooncake": "#d62728",
    "transport": "#17becf",
    "transport_stored_sums": "#9467bd",
    "raw_tcp": "#7f7f7f",
    "redis": "#e377c2",
    "off": "#ff7f0e",
    "load": "#17becf",
    "memcpy": "#7f7f7f",
}


@contextlib.contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(
        {
            "font.size": 11,
            "axes.titlesize": 12,
            "axes.labelsize": 11,
            "legend.fontsize": 10,
            "xtick.labelsize": 10,
            "ytick.labelsize": 10,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "svg.fonttype": "none",  # SVG text stays text
            "savefig.facecolor": "white",
        }
    ):
        yield


def _figure(ncols: int = 1, nrows: int = 1, height: float = 4.4, **kw: Any) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _grouped_bars(
    ax: Any,
    groups: Sequence[str],
    series: Sequence[tuple[str, str, Sequence[float | None]]],
    value_fmt: Callable[[float], str] | None = None,
    width: float = 0.8,
) -> None:
    """Bars of several series side by side in each group; None values leave a gap. `series`:
    (key for the color, label, one value per group)."""
    n = max(1, len(series))
    w = width / n
    for i, (key, label, values) in enumerate(series):
        xs = [g + (i - (n - 1) / 2) * w for g in range(len(groups))]
        pairs = [(x, v) for x, v in zip(xs, values) if v is not None]
        if not pairs:
            continue
        bars = ax.bar([x for x, _ in pairs], [v for _, v in pairs], w * 0.92, label=label,
                      color=COLORS.get(key))  # fmt: skip
        if value_fmt is not None:
            ax.bar_label(bars, labels=[value_fmt(v) for _, v in pairs], padding=2, fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(axis="x", visible=False)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _plain_log(ax: Any, axis: str = "y") -> None:
    """A log-scale axis whose labels read 0.4, 2, 10 (not 4x10^-1); between the powers of ten, 2, 3,
    4 and 6 are labelled too on a short axis, 2 and 5 on one of up to three decades."""
    from matplotlib.ticker import FuncFormatter

    a = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")

    def label(v: float, _pos: Any) -> str:
        if v <= 0:
            return ""
        lo, hi = sorted(a.get_view_interval())
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
        span = hi / max(lo, 1e-300)
        between = (2, 3, 4, 6) if span <= 20 else (2, 5) if span <= 1000 else ()
        return f"{v:g}" if mantissa == 1 or mantissa in between else ""

    a.set_major_formatter(FuncFormatter(label))
    a.set_minor_formatter(FuncFormatter(label))


def _headroom(ax: Any, factor: float = 1.15) -> None:
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * factor)


# ------------------------------------------------------------------------------------- the plots

#: configuration -> (marker, line style, hollow marker)
CHAT_STYLES = {
    "nocache": ("s", "-", False),
    "prefix_cache": ("o", "-", True),
    "example_connector": ("D", "--", False),
    "polarkvd": ("o", "-", False),
    "lmcache": ("^", "-.", False),
    "mooncake": ("v", ":", False),
}
CHAT_LABELS = {
    "nocache": "vLLM, no prefix cache",
    "prefix_cache": "vLLM prefix cache",
    "example_connector": "vLLM ExampleConnector",
    "polarkvd": "polarkvd",
    "lmcache": "LMCache",
    "mooncake": "Mooncake Store",
}


def plot_chat(res: dict[str, Any]) -> Any:
    """`bench chat`: TTFT per round per configuration (log scale) and prompt tokens computed per
    request (prompt minus the tokens a cache served), per round."""
    wl, configs = res["workload"], res["configs"]
    fig, axes = _figure(2, height=4.6)
    ttft_ax, comp_ax = axes[0]
    for name, c in configs.items():
        rounds = [r["round"] for r in c["rounds"]]
        ttft = [r["ttft_s"]["mean"] for r in c["rounds"]]
        computed = [max(1.0, r["prompt_tokens_mean"] - r["hit_tokens_mean"]) for r in c["rounds"]]
        ours = name == "polarkvd"
        # lines that run on top of each other (two configurations computing the same tokens) stay
        # apart by their marker and dash
        marker, dash, hollow = CHAT_STYLES.get(name, ("o", "-", False))
        style = {"color": COLORS.get(name), "marker": marker, "linestyle": dash, "markersize": 8 if hollow else 6,
                 "markerfacecolor": "none" if hollow else COLORS.get(name), "linewidth": 2.6 if ours else 1.6,
                 "zorder": 4 if ours else 3 if hollow else 2, "label": CHAT_LABELS.get(name, name)}  # fmt: skip
        ttft_ax.plot(rounds, ttft, **style)
        comp_ax.plot(rounds, computed, **style)
    for ax in (ttft_ax, comp_ax):
        _plain_log(ax)
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
    ttft_ax.set_ylabel("TTFT, mean over users (s, log scale)")
    ttft_ax.set_title("Time to first token per round")
    comp_ax.set_ylabel("prompt tokens computed, per request (log)")
    comp_ax.set_title("Prefill left to compute (prompt - cache hits)")
    handles, labels = ttft_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), frameon=False)
    na = res.get("not_available") or {}
    title = (
        f"bench chat: {wl['users']} users x {wl['rounds']} rounds, prompts {wl['first_prompt_tokens']}-"
        f"{wl['last_prompt_tokens']} tokens, {wl['model']} {wl['dtype']}, block {wl['block_tokens']}"
    )
    if na:
        title += f"\n(not available: {', '.join(na)})"
    fig.suptitle(title)
    return fig


CLUSTER_LABELS = {
    "fetch": "fetch (two daemons)",
    "transport": "peer transport",
    "transport_stored_sums": "transport, stored sums",
    "raw_tcp": "raw TCP",
    "redis": "Redis",
    "mooncake": "Mooncake Store",
}


def plot_cluster(res: dict[str, Any]) -> Any:
    """`bench cluster`: GB/s and CPU seconds per GB of every method, per page size."""
    rows = sorted(res["by_size"].values(), key=lambda r: r["page_bytes"])
    groups = [r["label"] for r in rows]
    fig, axes = _figure(2, height=4.6)
    gbps_ax, cpu_ax = axes[0]
    methods = [m for m in CLUSTER_LABELS if any(_num(r.get(f"{m}_gbps")) for r in rows)]
    _grouped_bars(gbps_ax, groups, [(m, CLUSTER_LABELS[m], [_num(r.get(f"{m}_gbps")) for r in rows])
                                    for m in methods], value_fmt=lambda v: f"{v:.1f}")  # fmt: skip
    gbps_ax.set_ylabel("GB/s (1e9 bytes/s), median of rounds")
    gbps_ax.set_xlabel("page size")
    gbps_ax.set_title("Throughput (higher is better)")
    _headroom(gbps_ax)
    cpu_methods = [m for m in methods if any(_num(r.get(f"{m}_cpu_s_per_gb")) for r in rows)]
    # every method keeps its slot (and color) of the left panel; an unmetered one leaves a gap
    _grouped_bars(cpu_ax, groups, [(m, CLUSTER_LABELS[m], [_num(r.get(f"{m}_cpu_s_per_gb")) for r in rows])
                                   for m in methods], value_fmt=lambda v: f"{v:.2f}")  # fmt: skip
    cpu_ax.set_ylabel("CPU seconds per GB, both sides")
    cpu_ax.set_xlabel("page size")
    cpu_ax.set_title("CPU cost (lower is better)")
    _headroom(cpu_ax)
    unmetered = [CLUSTER_LABELS[m] for m in methods if m not in cpu_methods]
    if unmetered:
        cpu_ax.text(0.01, 0.99, "not metered: " + ", ".join(unmetered), transform=cpu_ax.transAxes,
                    va="top", fontsize=9, color="#555555")  # fmt: skip
    handles, labels = gbps_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    title = (
        f"bench cluster: 127.0.0.1, {res['threads']} threads x {res['batch']} pages per call, "
        f"{res['rounds']} rounds of {res['seconds']:g} s"
    )
    na = res.get("not_available") or {}
    if na:
        title += f"\n(not available: {', '.join(na)})"
    fig.suptitle(title)
    return fig


PIPELINE_SOURCES = {
    "local": "local DRAM (L2)",
    "disk": "local disk (L4)",
    "remote": "peer's DRAM over TCP (L3)",
}


def plot_pipeline(res: dict[str, Any]) -> Any:
    """`bench pipeline`: a hit's TTFT per source with layer pipelining off and on; whiskers span the
    trials' min to max."""
    runs, wl = res["runs"], res["workload"]
    sources = [s for s in PIPELINE_SOURCES if s in runs]
    fig, axes = _figure(1, height=4.4)
    ax = axes[0][0]
    w = 0.38
    for i, mode in enumerate(("off", "on")):
        xs = [g + (i - 0.5) * w for g in range(len(sources))]
        cells = [runs[s][mode] for s in sources]
        med = [c["ttft_ms"] for c in cells]
        err = [[m - c["min_ms"] for m, c in zip(med, cells)], [c["max_ms"] - m for m, c in zip(med, cells)]]
        label = f"pipelining {mode} (load_mode={cells[0].get('load_mode', '')})"
        bars = ax.bar(xs, med, w * 0.92, yerr=err, capsize=4, label=label, color=COLORS[mode],
                      error_kw={"elinewidth": 1, "ecolor": "#333333"})  # fmt: skip
        ax.bar_label(bars, labels=[f"{m:.0f}" for m in med], padding=2, fontsize=9, label_type="center",
                     color="white")  # fmt: skip
    ax.set_xticks(range(len(sources)), [PIPELINE_SOURCES[s] for s in sources])
    ax.grid(axis="x", visible=False)
    ax.set_ylabel("TTFT of the hit (ms): median,\nwhiskers min-max of the trials")
    ax.set_xlabel("where the prefix was")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=2, frameon=False)
    _headroom(ax, 1.05)
    bars = res.get("bars", {})
    facts = []
    for key, label in (("remote_vs_local", "remote/local"), ("disk_vs_local", "disk/local"),
                       ("hidden_fraction", "hidden")):  # fmt: skip
        b = bars.get(key)
        if b and b.get("value") is not None:
            facts.append(f"{label} {b['value']:.2f} (bar {b['bar']})")
    ax.set_title("pipelining on: " + ", ".join(facts) if facts else "", fontsize=10)
    fig.suptitle(
        f"bench pipeline: a {wl['prefix_tokens']}-token prefix ({wl['prefix_pages']} pages, "
        f"{wl['prefix_bytes'] / 1e6:.0f} MB), {wl['trials']} trials per bar, {wl['model']} {wl['dtype']}, "
        f"disk {wl['disk_cache']}"
    )
    return fig


def plot_datapath(res: dict[str, Any]) -> Any:
    """`bench datapath`: store/load GB/s against single-thread memcpy of the same bytes (5.9 MB and
    64 KiB pages); lookup latency of 32 keys against the raw socket round trip (p50 bars, p99 marks)."""
    fig, axes = _figure(2, height=4.6)
    gb_ax, lat_ax = axes[0]
    big = f"{res['page_bytes'] / 1e6:.1f} MB pages"
    small = f"{res['small_page_bytes'] >> 10} KiB pages"
    mem = [res["memcpy_gbps"], res["memcpy_small_gbps"]]
    series = [
        ("store", "store (reserve, copy, commit)", [res["store_gbps"], res["store_small_gbps"]]),
        ("load", "load (load, copy, release)", [res["load_gbps"], res["load_small_gbps"]]),
        ("memcpy", "memcpy, 1 thread, same bytes", mem),
    ]
    _grouped_bars(gb_ax, [big, small], series, value_fmt=lambda v: f"{v:.1f}")
    for i, (_key, _label, vals) in enumerate(series[:2]):  # the ratio to memcpy, inside each bar
        for g, (v, m) in enumerate(zip(vals, mem)):
            x = g + (i - 1) * 0.8 / 3
            gb_ax.text(x, v / 2, f"{v / m:.2f}x", ha="center", va="center", rotation=90, color="white",
                       fontsize=9, fontweight="bold")  # fmt: skip
    gb_ax.set_ylabel("GB/s (1e9 bytes/s), median of rounds")
    gb_ax.set_title("Store and load vs memcpy (ratio in the bars)")
    gb_ax.legend(loc="upper right", fontsize=9)
    _headroom(gb_ax, 1.3)

    rows = [
        ("lookup 32 keys, shared table", "lookup_p50_us", "lookup_p99_us", COLORS["polarkvd"]),
        ("lookup 32 keys, over the socket", "lookup_socket_p50_us", "lookup_socket_p99_us", "#aec7e8"),
        ("DRAM+disk+miss, shared table", "lookup_partial_p50_us", "lookup_partial_p99_us", COLORS["polarkvd"]),
        ("DRAM+disk+miss, over the socket", "lookup_partial_socket_p50_us", "lookup_partial_socket_p99_us",
         "#aec7e8"),
        ("Unix socket round trip, 100 B", "socket_rtt_p50_us", "socket_rtt_p99_us", COLORS["memcpy"]),
        ("ZeroMQ ipc round trip, 100 B", "zmq_ipc_rtt_p50_us", "zmq_ipc_rtt_p99_us", "#c7c7c7"),
    ]  # fmt: skip
    rows = [r for r in rows if _num(res.get(r[1])) is not None]
    ys = list(range(len(rows)))[::-1]
    p50 = [res[r[1]] for r in rows]
    p99 = [_num(res.get(r[2])) for r in rows]
    lat_ax.barh(ys, p50, 0.7, color=[r[3] for r in rows])
    pts = [(y, v) for y, v in zip(ys, p99) if v is not None]
    lat_ax.plot([v for _, v in pts], [y for y, _ in pts], "k|", markersize=14, markeredgewidth=2,
                label="p99")  # fmt: skip
    for y, a, b, r in zip(ys, p50, p99, rows):
        dark = r[3] in (COLORS["polarkvd"], COLORS["memcpy"])
        lat_ax.text(a * 0.93, y, f"{a:.1f}", va="center", ha="right", fontsize=9,
                    color="white" if dark else "black", fontweight="bold")  # fmt: skip
        if b is not None:
            lat_ax.text(b * 1.2, y, f"{b:.0f}", va="center", fontsize=9)
    lat_ax.set_yticks(ys, [r[0] for r in rows])
    _plain_log(lat_ax, "x")
    lat_ax.set_xlabel("latency (µs, log scale): bars p50, marks p99")
    lat_ax.grid(axis="y", visible=False)
    rtt = res["socket_rtt_p50_us"]
    lat_ax.axvline(
        3 * rtt, color="#d62728", linestyle="--", linewidth=1.2, label="bar: 3x socket RTT p50", zorder=0.5
    )
    lo = min(p50) / 2
    hi = max([*p50, *(v for _, v in pts)]) * 4
    lat_ax.set_xlim(lo, hi)
    lat_ax.set_title("Lookup against the raw round trip")
    lat_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=3, fontsize=9, frameon=False)
    fig.suptitle(
        f"bench datapath: {res['pages_per_round']} pages per round through a private daemon; "
        f"lookups of 32 keys"
    )
    return fig


MIXED_LABELS = {
    "disk_async": "disk hit, async loads",
    "disk_sync": "disk hit, sync loads",
    "dram": "DRAM hit",
}


def plot_mixed(res: dict[str, Any]) -> Any:
    """`bench mixed`: per scenario, every engine step's wall time over the run (x: seconds from the
    hit's arrival), the steps in which every decoder got a token highlighted, the hit's arrival and
    first token marked, the decoders' usual inter-token latency and the bar (1.2x) dashed."""
    scenarios = [s for s in MIXED_LABELS if s in res["scenarios"]]
    if any("steps" not in res["scenarios"][s] for s in scenarios):
        raise KeyError("per-step times ('steps': recorded by bench mixed since plots were added)")
    decoders = res["shape"]["decoders"]
    fig, axes = _figure(1, nrows=len(scenarios), height=2.2 + 1.9 * len(scenarios), sharex=True,
                        sharey=True)  # fmt: skip
    bar = res.get("bar_itl_during_load", 1.2)
    for ax, name in zip((row[0] for row in axes), scenarios):
        sc = res["scenarios"][name]
        steps = sc["steps"]
        ends, t = [], 0.0
        for s in steps:
            t += s["s"]
            ends.append(t)
        before = [e for e, s in zip(ends, steps) if s["phase"] == "before"]
        arrival = before[-1] if before else 0.0
        first = next((e for e, s in zip(ends, steps) if s["phase"] == "hit_step"), None)
        edges = [0.0 - arrival, *(e - arrival for e in ends)]
        ms = [s["s"] * 1e3 for s in steps]
        ax.stairs(ms, edges, baseline=None, color=COLORS["polarkvd"], linewidth=1.3,
                  label="engine step: its wall time over its span")  # fmt: skip
        mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        full = [(x, y) for x, y, s in zip(mids, ms, steps) if s["decoders"] == decoders]
        rest = [(x, y) for x, y, s in zip(mids, ms, steps) if s["decoders"] != decoders]
        ax.plot([x for x, _ in full], [y for _, y in full], "o", color=COLORS["polarkvd"], markersize=4,
                label=f"every decoder ({decoders}) got a token")  # fmt: skip
        if rest:
            ax.plot([x for x, _ in rest], [y for _, y in rest], "x", color="#555555", markersize=6,
                    label="not every decoder got a token")  # fmt: skip
        usual = sc.get("usual_itl_s")
        if usual:
            ax.axhline(
                usual * 1e3, color="#2ca02c", linestyle=":", linewidth=1.2, label="usual ITL (median before)"
            )
            ax.axhline(
                usual * 1e3 * bar, color="#d62728", linestyle="--", linewidth=1, label=f"bar: {bar:g}x usual"
            )
        ax.axvline(0, color="#ff7f0e", linewidth=1.5, label="hit arrives")
        if first is not None:
            ax.axvline(first - arrival, color="#9467bd", linewidth=1.5, label="hit's first token")
            ax.axvspan(0, first - arrival, color="#ff7f0e", alpha=0.08)
        _plain_log(ax)
        ttft = sc.get("hit_ttft_s")
        ax.set_title(f"{MIXED_LABELS[name]}: hit TTFT {ttft:.2f} s" if ttft else MIXED_LABELS[name],
                     fontsize=11, loc="left")  # fmt: skip
        ax.set_ylabel("step (ms, log)")
    axes[-1][0].set_xlabel("time from the hit's arrival (s)")
    handles: dict[str, Any] = {}
    for row in axes:
        for h, lab in zip(*row[0].get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=3, frameon=False,
               fontsize=9)  # fmt: skip
    s = res["shape"]
    fig.suptitle(
        f"bench mixed: {s['decoders']} requests decoding, a {s['document']}-token document hit, "
        f"block {s['block_size']}"
    )
    return fig


PLOTTERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "chat": plot_chat,
    "cluster": plot_cluster,
    "pipeline": plot_pipeline,
    "datapath": plot_datapath,
    "mixed": plot_mixed,
}

"""`bench datapath`: store/load GB/s against memcpy of the same bytes; lookup latency against the
raw socket round trip."""

from __future__ import annotations

from typing import Any

from polarkvd.bench.plots import COLORS, figure, grouped_bars, headroom, num, plain_log


def plot(res: dict[str, Any]) -> Any:
    """`bench datapath`: store/load GB/s against single-thread memcpy of the same bytes (5.9 MB and
    64 KiB pages); lookup latency of 32 keys against the raw socket round trip (p50 bars, p99 marks)."""
    fig, axes = figure(2, height=4.6)
    gb_ax, lat_ax = axes[0]
    big = f"{res['page_bytes'] / 1e6:.1f} MB pages"
    small = f"{res['small_page_bytes'] >> 10} KiB pages"
    mem = [res["memcpy_gbps"], res["memcpy_small_gbps"]]
    series = [
        ("store", "store (reserve, copy, commit)", [res["store_gbps"], res["store_small_gbps"]]),
        ("load", "load (load, copy, release)", [res["load_gbps"], res["load_small_gbps"]]),
        ("memcpy", "memcpy, 1 thread, same bytes", mem),
    ]
    grouped_bars(gb_ax, [big, small], series, value_fmt=lambda v: f"{v:.1f}")
    for i, (_key, _label, vals) in enumerate(series[:2]):  # the ratio to memcpy, inside each bar
        for g, (v, m) in enumerate(zip(vals, mem)):
            x = g + (i - 1) * 0.8 / 3
            gb_ax.text(x, v / 2, f"{v / m:.2f}x", ha="center", va="center", rotation=90, color="white",
                       fontsize=9, fontweight="bold")  # fmt: skip
    gb_ax.set_ylabel("GB/s (1e9 bytes/s), median of rounds")
    gb_ax.set_title("Store and load vs memcpy (ratio in the bars)")
    gb_ax.legend(loc="upper right", fontsize=9)
    headroom(gb_ax, 1.3)

    rows = [
        ("lookup 32 keys, shared table", "lookup_p50_us", "lookup_p99_us", COLORS["polarkvd"]),
        ("... its Python probe", "lookup_python_p50_us", "lookup_python_p99_us", "#6baed6"),
        ("lookup 32 keys, over the socket", "lookup_socket_p50_us", "lookup_socket_p99_us", "#aec7e8"),
        ("DRAM+disk+miss, shared table", "lookup_partial_p50_us", "lookup_partial_p99_us", COLORS["polarkvd"]),
        ("... its Python probe", "lookup_partial_python_p50_us", "lookup_partial_python_p99_us", "#6baed6"),
        ("DRAM+disk+miss, over the socket", "lookup_partial_socket_p50_us", "lookup_partial_socket_p99_us",
         "#aec7e8"),
        ("Unix socket round trip, 100 B", "socket_rtt_p50_us", "socket_rtt_p99_us", COLORS["memcpy"]),
        ("ZeroMQ ipc round trip, 100 B", "zmq_ipc_rtt_p50_us", "zmq_ipc_rtt_p99_us", "#c7c7c7"),
    ]  # fmt: skip
    rows = [r for r in rows if num(res.get(r[1])) is not None]
    ys = list(range(len(rows)))[::-1]
    p50 = [res[r[1]] for r in rows]
    p99 = [num(res.get(r[2])) for r in rows]
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
    plain_log(lat_ax, "x")
    lat_ax.set_xlabel("latency (µs, log scale): bars p50, marks p99")
    lat_ax.grid(axis="y", visible=False)
    rtt = res["socket_rtt_p50_us"]
    lat_ax.axvline(  # the shared-table lookup's bar (issue 15)
        0.5 * rtt,
        color="#d62728",
        linestyle="--",
        linewidth=1.2,
        label="bar: 0.5x socket RTT p50",
        zorder=0.5,
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

"""`bench page-sizes`: B's reserve of a second page size in a full arena against its 50 ms bar; A's
pages it evicted and moved against one slab; the ping latency while A fills and around B's reserve
against the 10 ms bar."""

from __future__ import annotations

from typing import Any

from polarkvd.bench.plots import COLORS, PERCENTILES, figure, grouped_bars, headroom, plain_log

RESERVE_BAR_MS = 50.0  # the bar on B's first reserve
PING_BAR_MS = 10.0


def plot(res: dict[str, Any]) -> Any:
    fig, axes = figure(3, height=4.6, width_ratios=(1, 1, 1.5))
    res_ax, ev_ax, ping_ax = axes[0]

    reserve = [res["reserve_ms"], res["reserve_64_more_ms"]]
    bars = res_ax.bar([0, 1], reserve, 0.6, color=COLORS["polarkvd"])
    res_ax.bar_label(bars, labels=[f"{v:.1f}" for v in reserve], padding=2, fontsize=9)
    res_ax.axhline(RESERVE_BAR_MS, color="#d62728", linestyle="--", linewidth=1.2, label="bar: 50 ms")
    res_ax.set_xticks([0, 1], ["1st page\nof 8 KiB", "64 more\npages"])
    res_ax.set_ylabel("B's reserve (ms)")
    res_ax.set_title("B reserves the 2nd size")
    res_ax.set_ylim(0, max(*reserve, RESERVE_BAR_MS) * 1.25)
    res_ax.grid(axis="x", visible=False)
    res_ax.legend(loc="upper right", fontsize=9)

    slab = res["a_pages_per_slab"]
    moved = [res["evicted_pages"], res["moved_pages"]]
    bars = ev_ax.bar([0, 1], moved, 0.6, color=[COLORS["off"], COLORS["load"]])
    ev_ax.bar_label(bars, labels=[f"{v:,}" for v in moved], padding=2, fontsize=9)
    ev_ax.axhline(slab, color="#d62728", linestyle="--", linewidth=1.2, label=f"bar: one slab ({slab:,})")
    ev_ax.set_xticks([0, 1], ["evicted", "moved"])
    ev_ax.set_ylabel("A's 32 KiB pages (count)")
    ev_ax.set_title("What B's reserve took from A")
    ev_ax.set_ylim(0, max(*moved, slab) * 1.3)
    ev_ax.grid(axis="x", visible=False)
    ev_ax.legend(loc="upper right", fontsize=9)

    phases = [("ping_fill", "while A fills"), ("ping_reserve", "around B's reserve")]
    series = [(label, label, [max(res[p][key], 1e-3) for p, _ in phases]) for key, label in PERCENTILES]
    grouped_bars(ping_ax, [name for _, name in phases], series, value_fmt=lambda v: f"{v:.3g}")
    ping_ax.axhline(PING_BAR_MS, color="#d62728", linestyle="--", linewidth=1.2, label="bar: p99 10 ms")
    counts = [res[p]["pings"] for p, _ in phases]
    ping_ax.set_xticks(range(len(phases)), [f"{name}\n({n:,} pings)" for (_, name), n in zip(phases, counts)])
    plain_log(ping_ax)
    headroom(ping_ax, 3)
    ping_ax.set_ylabel("ping round trip (ms, log scale)")
    ping_ax.set_title("A third engine's ping, every ms")
    ping_ax.grid(axis="x", visible=False)
    ping_ax.legend(loc="upper left", ncols=4, fontsize=9)

    fig.suptitle(
        f"bench page-sizes: arena {_size(res['capacity'])} in slabs of {_size(res['slab_bytes'])}, "
        f"A stores {res['chains']:,} chains of 8 pages, disk tier {'on' if res['disk'] else 'off'}"
    )
    return fig


def _size(n: int) -> str:
    """1 GiB, 64 MiB, 1.5 GiB: a power-of-two size without a trailing .0."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} B"

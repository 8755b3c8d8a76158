"""`bench cluster`: GB/s and CPU seconds per GB of every method, per page size."""

from __future__ import annotations

from typing import Any

from polarkvd.bench.plots import figure, grouped_bars, headroom, num

CLUSTER_LABELS = {
    "fetch": "fetch (two daemons)",
    "transport": "peer transport",
    "transport_stored_sums": "transport, stored sums",
    "raw_tcp": "raw TCP",
    "redis": "Redis",
    "mooncake": "Mooncake Store",
}


def plot(res: dict[str, Any]) -> Any:
    """`bench cluster`: GB/s and CPU seconds per GB of every method, per page size."""
    rows = sorted(res["by_size"].values(), key=lambda r: r["page_bytes"])
    groups = [r["label"] for r in rows]
    fig, axes = figure(2, height=4.6)
    gbps_ax, cpu_ax = axes[0]
    methods = [m for m in CLUSTER_LABELS if any(num(r.get(f"{m}_gbps")) for r in rows)]
    grouped_bars(gbps_ax, groups, [(m, CLUSTER_LABELS[m], [num(r.get(f"{m}_gbps")) for r in rows])
                                    for m in methods], value_fmt=lambda v: f"{v:.1f}")  # fmt: skip
    gbps_ax.set_ylabel("GB/s (1e9 bytes/s), median of rounds")
    gbps_ax.set_xlabel("page size")
    gbps_ax.set_title("Throughput (higher is better)")
    headroom(gbps_ax)
    cpu_methods = [m for m in methods if any(num(r.get(f"{m}_cpu_s_per_gb")) for r in rows)]
    # every method keeps its slot (and color) of the left panel; an unmetered one leaves a gap
    grouped_bars(cpu_ax, groups, [(m, CLUSTER_LABELS[m], [num(r.get(f"{m}_cpu_s_per_gb")) for r in rows])
                                   for m in methods], value_fmt=lambda v: f"{v:.2f}")  # fmt: skip
    cpu_ax.set_ylabel("CPU seconds per GB, both sides")
    cpu_ax.set_xlabel("page size")
    cpu_ax.set_title("CPU cost (lower is better)")
    headroom(cpu_ax)
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

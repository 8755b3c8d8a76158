"""`bench pipeline`: a hit's TTFT per source (local DRAM, local disk, a peer's DRAM), layer
pipelining off and on, whiskers from the trials' min to max."""

from __future__ import annotations

from typing import Any

from polarkvd.bench.plots import COLORS, figure, headroom

PIPELINE_SOURCES = {
    "local": "local DRAM (L2)",
    "disk": "local disk (L4)",
    "remote": "peer's DRAM over TCP (L3)",
}


def plot(res: dict[str, Any]) -> Any:
    """`bench pipeline`: a hit's TTFT per source with layer pipelining off and on; whiskers span the
    trials' min to max."""
    runs, wl = res["runs"], res["workload"]
    sources = [s for s in PIPELINE_SOURCES if s in runs]
    fig, axes = figure(1, height=4.4)
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
    headroom(ax, 1.05)
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

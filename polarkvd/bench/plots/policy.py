"""`bench policy`: each trace's prefill seconds (recompute plus loading the hit, in the modelled
engine's time) under each eviction policy, the recompute part hatched; `cost` always demoting on
the mixed trace beside them when it was run."""

from __future__ import annotations

from typing import Any

from polarkvd.bench.plots import figure, headroom

#: (key in a trace's results, label, color)
_POLICIES = (
    ("lru", "lru", "#7f7f7f"),
    ("s3fifo", "s3fifo", "#ff7f0e"),
    ("cost", "cost", "#1f77b4"),
    ("cost_demote_always", "cost, always demoting", "#aec7e8"),
)


def plot(res: dict[str, Any]) -> Any:
    """`bench policy`: prefill seconds per policy per trace (bars), recompute hatched within."""
    traces = list(res["traces"])
    shown = [p for p in _POLICIES if any(p[0] in res["traces"][t] for t in traces)]
    fig, axes = figure(1, height=4.6)
    ax = axes[0][0]
    n = max(1, len(shown))
    w = 0.8 / n
    for i, (key, label, color) in enumerate(shown):
        cells = [(g, res["traces"][t][key]) for g, t in enumerate(traces) if key in res["traces"][t]]
        xs = [g + (i - (n - 1) / 2) * w for g, _ in cells]
        total = [c["prefill_s"] for _, c in cells]
        recompute = [c["recompute_s"] for _, c in cells]
        bars = ax.bar(xs, total, w * 0.92, label=label, color=color)
        ax.bar(xs, recompute, w * 0.92, color="none", edgecolor="white", hatch="//", linewidth=0)
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in total], padding=2, fontsize=8)
    ax.bar([0], [0], color="#bbbbbb", hatch="//", edgecolor="white", label="of which recompute")
    ax.set_xticks(range(len(traces)), traces)
    ax.grid(axis="x", visible=False)
    ax.set_ylabel("prefill seconds (modelled engine):\nrecompute + loading the hit")
    ax.set_xlabel(f"trace (working set / tiers = {res['pressure']})")
    fig.legend(
        *ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(shown) + 1, frameon=False
    )
    headroom(ax, 1.1)
    facts = []
    for key, label in (("mixed_cost_vs_lru", "mixed cost/lru"), ("mixed_cost_vs_s3fifo", "cost/s3fifo"),
                       ("worst_cost_vs_best_other", "worst a-c cost/best other"),
                       ("mixed_bound_vs_lru", "offline bound/lru")):  # fmt: skip
        v = res.get(key)
        if v is not None:
            facts.append(f"{label} {v:.2f}")
    ax.set_title(", ".join(facts), fontsize=10)
    fig.suptitle(f"bench policy: {res['engine_label']}")
    return fig

"""`bench mixed`: per scenario, the decoders' engine step times over the run, the hit's arrival and
first token marked."""

from __future__ import annotations

from typing import Any

from polarkvd.bench.plots import COLORS, figure, plain_log

MIXED_LABELS = {
    "disk_async": "disk hit, async loads",
    "disk_sync": "disk hit, sync loads",
    "dram": "DRAM hit",
}


def plot(res: dict[str, Any]) -> Any:
    """`bench mixed`: per scenario, every engine step's wall time over the run (x: seconds from the
    hit's arrival), the steps in which every decoder got a token highlighted, the hit's arrival and
    first token marked, the decoders' usual inter-token latency and the bar (1.2x) dashed."""
    scenarios = [s for s in MIXED_LABELS if s in res["scenarios"]]
    if any("steps" not in res["scenarios"][s] for s in scenarios):
        raise KeyError("per-step times ('steps': recorded by bench mixed since plots were added)")
    decoders = res["shape"]["decoders"]
    fig, axes = figure(1, nrows=len(scenarios), height=2.2 + 1.9 * len(scenarios), sharex=True,
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
        plain_log(ax)
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

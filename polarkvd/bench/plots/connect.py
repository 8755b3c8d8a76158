"""`bench connect`: per phase of the connect flood, the constructions that succeeded within the
client timeout, were late or failed; their latency (p50, p99, max); the daemon's peak thread count
against its idle count and its bound."""

from __future__ import annotations

from typing import Any

from polarkvd.bench.plots import COLORS, PERCENTILES, figure, grouped_bars, num, plain_log

OUTCOMES = (
    ("ok", "ok within the timeout", COLORS["polarkvd"]),
    ("late", "constructed, but late", COLORS["off"]),
    ("failed", "failed", "#d62728"),
)


def plot(res: dict[str, Any]) -> Any:
    phases = list(res["phases"].items())
    names = [name for name, _ in phases]
    fig, axes = figure(3, height=4.6, width_ratios=(1.2, 1.2, 1))
    n_ax, lat_ax, thr_ax = axes[0]
    xs = list(range(len(phases)))

    per_s = [[r[key] / res["seconds"] for _, r in phases] for key, _, _ in OUTCOMES]
    bottom = [0.0] * len(phases)
    for (_key, label, color), vals in zip(OUTCOMES, per_s):
        n_ax.bar(xs, vals, 0.6, bottom=bottom, color=color, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, (_, r) in zip(xs, phases):
        share = 100 * r["ok"] / max(1, r["tried"])
        n_ax.text(x, r["tried"] / res["seconds"], f"{share:.2f}% ok\nof {r['tried']:,}", ha="center", va="bottom",
                  fontsize=9)  # fmt: skip
    n_ax.set_xticks(xs, names)
    n_ax.set_ylabel("EngineClient constructions per second")
    n_ax.set_title(f"Constructions (timeout {res['timeout_s']:g} s)")
    n_ax.set_ylim(0, max(bottom, default=1) * 1.3 or 1)
    n_ax.grid(axis="x", visible=False)

    series = [(label, label, [num(r[key]) for _, r in phases]) for key, label in PERCENTILES]
    grouped_bars(lat_ax, names, series, value_fmt=lambda v: f"{v:.3g}")
    lat_ax.axhline(res["timeout_s"] * 1e3, color="#d62728", linestyle="--", linewidth=1.2,
                   label=f"client timeout ({res['timeout_s']:g} s)")  # fmt: skip
    plain_log(lat_ax)
    lo, _hi = lat_ax.get_ylim()
    lat_ax.set_ylim(lo, res["timeout_s"] * 1e3 * 8)  # room for the legend above the timeout
    lat_ax.set_xticks(xs, names)
    lat_ax.set_ylabel("connect + hello + close (ms, log scale)")
    lat_ax.set_title("Construction latency")
    lat_ax.grid(axis="x", visible=False)
    lat_ax.legend(loc="upper left", ncols=2, fontsize=9)

    peaks = [r["peak_threads"] for _, r in phases]
    bars = thr_ax.bar(xs, peaks, 0.6, color=COLORS["polarkvd"], label="peak during the phase")
    thr_ax.bar_label(bars, labels=[str(v) for v in peaks], padding=2, fontsize=9)
    thr_ax.axhline(res["idle_threads"], color="#2ca02c", linestyle=":", linewidth=1.2,
                   label=f"idle daemon ({res['idle_threads']})")  # fmt: skip
    thr_ax.axhline(res["thread_bound"], color="#d62728", linestyle="--", linewidth=1.2,
                   label=f"bound ({res['thread_bound']:,})")  # fmt: skip
    plain_log(thr_ax)
    thr_ax.set_ylim(max(1, min(peaks + [res["idle_threads"]]) / 2), res["thread_bound"] * 30)
    thr_ax.set_xticks(xs, names)
    thr_ax.set_ylabel("daemon threads (count, log scale)")
    thr_ax.set_title("Daemon threads")
    thr_ax.grid(axis="x", visible=False)
    thr_ax.legend(loc="upper left", fontsize=9)

    handles, labels = n_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    fig.suptitle(
        f"bench connect: {res['procs']} processes construct and close EngineClients for {res['seconds']:g} s "
        f"a phase\nidle connections closed: {res['connections_dropped_unattached']:,} for newer ones, "
        f"{res['connections_hello_timeout']:,} without hello"
    )
    return fig

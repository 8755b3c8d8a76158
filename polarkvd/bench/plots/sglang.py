"""`bench sglang`: per SGLang HiCache storage backend, set and get GB/s (median bars, every round a
dot) and CPU seconds per GB; each one's `batch_exists` of 64 stored keys against polarkvd's socket
round trip."""

from __future__ import annotations

from typing import Any

from polarkvd.bench.plots import COLORS, figure, grouped_bars, headroom, num, plain_log

BACKENDS = {"polarkv": "polarkvd", "file": "HiCacheFile (tmpfs)", "mooncake": "Mooncake Store"}
SHORT = {"polarkv": "polarkvd", "file": "HiCache\nFile", "mooncake": "Mooncake\nStore"}
COLOR_KEYS = {"polarkv": "polarkvd", "file": "hicache_file", "mooncake": "mooncake"}
MOONCAKE_MODES = {"client": "pages in a client process", "embedded": "pages in SGLang's process"}


def plot(res: dict[str, Any]) -> Any:
    g, bk = res["geometry"], res["backends"]
    ran = [b for b in BACKENDS if b in bk and "not_available" not in bk[b]]
    if not ran:
        raise KeyError("the backends' results (no backend ran)")
    labels = dict(BACKENDS)
    if "mooncake" in ran and res.get("mooncake_mode") in MOONCAKE_MODES:
        labels["mooncake"] += f",\n{MOONCAKE_MODES[res['mooncake_mode']]}"
    fig, axes = figure(3, height=4.8, width_ratios=(1.3, 1.1, 1))
    gb_ax, cpu_ax, ex_ax = axes[0]
    groups = ["set (write_storage)", "get (prefetch)"]

    series = [(COLOR_KEYS[b], labels[b], [bk[b]["set_gbps"], bk[b]["get_gbps"]]) for b in ran]
    grouped_bars(gb_ax, groups, series)
    gb = res["pages"] * g["page_bytes"] / 1e9
    w = 0.8 / len(ran)
    for i, b in enumerate(ran):  # every round's throughput a dot on its median bar, the median above all
        for j, key in enumerate(("set", "get")):
            x = j + (i - (len(ran) - 1) / 2) * w
            rounds = [gb / s for s in bk[b].get(f"{key}_s", []) if num(s)]
            gb_ax.plot([x] * len(rounds), rounds, "o", color="black", markersize=3, alpha=0.6, zorder=5,
                       label="one round" if (i, j) == (0, 0) else None)  # fmt: skip
            median = bk[b][f"{key}_gbps"]
            gb_ax.text(
                x, max([median, *rounds]) * 1.08, f"{median:.2f}", ha="center", va="bottom", fontsize=8
            )
    plain_log(gb_ax)
    gb_ax.set_ylabel("GB/s (1e9 bytes/s, log): median bar,\na dot per round")
    gb_ax.set_title("Throughput (higher is better)")
    headroom(gb_ax, 2.5)
    ratios = [f"get vs {name} {v:.2f}x" for name, key in (("file", "get_vs_file"), ("Mooncake", "get_vs_mooncake"))
              if (v := num(res.get(key))) is not None]  # fmt: skip
    if ratios:
        gb_ax.text(0.01, 0.99, "; ".join(ratios), transform=gb_ax.transAxes, va="top", fontsize=9)

    cpu = [(COLOR_KEYS[b], labels[b], [num(bk[b]["cpu_s_per_gb_set"]), num(bk[b]["cpu_s_per_gb_get"])])
           for b in ran]  # fmt: skip
    grouped_bars(cpu_ax, ["set", "get"], cpu, value_fmt=lambda v: f"{v:.2f}")
    cpu_ax.set_ylabel("CPU seconds per GB (SGLang + servers)")
    cpu_ax.set_title("CPU cost (lower is better)")
    headroom(cpu_ax)

    rtt = num(bk.get("polarkv", {}).get("rtt_p50_us"))
    rows = [(num(bk[b]["exists64_p50_us"]), SHORT[b], COLORS[COLOR_KEYS[b]]) for b in ran]
    rows += [(rtt, "socket\nRTT", COLORS["memcpy"])]
    rows = [r for r in rows if r[0] is not None]
    bars = ex_ax.bar(range(len(rows)), [v for v, _, _ in rows], 0.6, color=[c for _, _, c in rows])
    ex_ax.bar_label(bars, labels=[f"{v:.0f}" for v, _, _ in rows], padding=2, fontsize=9)
    if rtt is not None:
        ex_ax.axhline(
            1.5 * rtt, color="#d62728", linestyle="--", linewidth=1.2, label="bar: 1.5x RTT (polarkvd)"
        )
        ex_ax.legend(loc="upper left", fontsize=9)
    ex_ax.set_xticks(range(len(rows)), [label for _, label, _ in rows], fontsize=9)
    ex_ax.set_ylabel("p50 latency (µs)")
    ex_ax.set_title("batch_exists(64 stored keys)")
    ex_ax.grid(axis="x", visible=False)
    headroom(ex_ax, 1.35)

    handles, names = gb_ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=len(names), frameon=False)
    title = (
        f"bench sglang: SGLang HiCache storage backends, {res['pages']} pages per round, {res['rounds']} rounds\n"
        f"pages of {g['page_tokens']} tokens ({g['page_bytes'] / 1e6:.2f} MB, {g['layers']} layers, {g['kv_heads']} KV heads of {g['head_dim']}, {g['dtype']})"
    )
    missing = [BACKENDS.get(b, b) for b, v in bk.items() if "not_available" in v]
    if missing:
        title += f"; not available: {', '.join(missing)}"
    fig.suptitle(title)
    return fig

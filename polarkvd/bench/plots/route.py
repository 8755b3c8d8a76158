"""`bench route`: per run (pool setting / policy), mean and p99 TTFT (left) and the prompt tokens the
engines computed (right), the policies side by side within each pool setting."""

from __future__ import annotations

from typing import Any

from polarkvd.bench.plots import figure, grouped_bars, headroom

_POLICIES = (
    ("round-robin", "round-robin"),
    ("least-loaded", "least-loaded"),
    ("affinity", "affinity"),
    ("pd", "prefill/decode split (tokens: the decode engine's)"),
)


def plot(res: dict[str, Any]) -> Any:
    """`bench route`: TTFT mean / p99 and prompt tokens computed, per policy and pool setting."""
    runs = res["runs"]
    settings = sorted({name.split("/")[0] for name in runs}, key=lambda s: (s != "nopool", s))
    fig, axes = figure(2, height=4.4)
    ttft, tokens = axes[0][0], axes[0][1]
    groups = [f"{s} mean" for s in settings] + [f"{s} p99" for s in settings]
    series = []
    for key, label in _POLICIES:
        got = [runs.get(f"{s}/{key}") for s in settings]
        if all(g is None for g in got):
            continue
        values = [g["ttft_mean_s"] if g else None for g in got] + [
            g["ttft_p99_s"] if g else None for g in got
        ]
        series.append((key, label, values))
    grouped_bars(ttft, groups, series, value_fmt=lambda v: f"{v:.2f}")
    ttft.set_ylabel("time to first token, s")
    ttft.set_title("TTFT")
    headroom(ttft)
    ttft.legend(loc="upper left")
    tok_series = [
        (
            key,
            label,
            [runs[f"{s}/{key}"]["computed_tokens"] if f"{s}/{key}" in runs else None for s in settings],
        )
        for key, label in _POLICIES
        if any(f"{s}/{key}" in runs for s in settings)
    ]
    grouped_bars(tokens, settings, tok_series, value_fmt=lambda v: f"{v:.0f}")
    tokens.set_ylabel("prompt tokens computed (not cached)")
    tokens.set_title("prefill work")
    headroom(tokens)
    w = res["workload"]
    fig.suptitle(
        f"bench route: {w['users']} users x {w['turns']} turns, {w['in_flight']} in flight, "
        f"2 vLLM servers (1 core each)"
    )
    return fig

"""`bench blend`: TTFT against quality per setting (full prefill, prefix caching, naive chunk reuse,
CacheBlend at each r): first-token agreement with the full prefill on the left, the continuation's
log-likelihood difference from it on the right, the issue's bars dashed."""

from __future__ import annotations

from typing import Any

from polarkvd.bench.plots import figure

ORDER = ("full", "prefix", "r0", "r05", "r15", "r30")
MARKERS = {"full": "s", "prefix": "D", "r0": "X", "r05": "o", "r15": "o", "r30": "o"}
SHADES = {"full": "#7f7f7f", "prefix": "#ff7f0e", "r0": "#d62728", "r05": "#aec7e8", "r15": "#1f77b4",
          "r30": "#08306b"}  # fmt: skip


def plot(res: dict[str, Any]) -> Any:
    """One point per setting: x the mean TTFT as a fraction of the full prefill's, y its quality."""
    settings = res["settings"]
    names = [s for s in ORDER if s in settings]
    fig, axes = figure(2, height=4.6)
    left, right = axes[0]
    for s in names:
        r = settings[s]
        x = r["ttft_ratio"]
        kw = dict(marker=MARKERS[s], color=SHADES[s], markersize=9, linestyle="none")
        left.plot([x], [r["first_token_agreement"]], label=r["label"], **kw)
        right.plot([x], [r["loglik_rel_diff"] * 100], label=r["label"], **kw)
    bars = res["bars"]
    for ax in (left, right):
        ax.axvline(bars["ttft_ratio_r15_at_most"], color="#d62728", linestyle="--", linewidth=1,
                   label="bar: TTFT <= 1/2.2 of full")  # fmt: skip
        ax.set_xlabel("TTFT / full prefill's TTFT (mean)")
        ax.set_xlim(0, 1.08)
    left.axhline(bars["first_token_agreement_r15_at_least"], color="#2ca02c", linestyle="--", linewidth=1,
                 label="bar: agreement >= 0.9")  # fmt: skip
    left.set_ylabel("first-token agreement with full prefill (fraction)")
    left.set_ylim(0, 1.05)
    right.axhline(bars["loglik_rel_diff_r15_at_most"] * 100, color="#2ca02c", linestyle="--", linewidth=1,
                  label="bar: within 3%")  # fmt: skip
    right.set_ylabel("continuation log-likelihood: |difference| from full (%)")
    right.set_ylim(bottom=0)
    left.legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"bench blend: {res['prompts']} prompts of {res['chunks_per_prompt'][0]}-{res['chunks_per_prompt'][1]} "
        f"chunks ({res['chunk_tokens'][0]}-{res['chunk_tokens'][1]} tokens), {res['model']} {res['dtype']}, "
        f"{res['engine']}"
    )
    return fig

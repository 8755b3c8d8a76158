"""`bench chat`: TTFT per round per configuration (log scale) and the prompt tokens computed per
request (prompt minus the tokens a cache served), per round."""

from __future__ import annotations

from typing import Any

from polarkvd.bench.plots import COLORS, figure, plain_log

CHAT_STYLES = {
    "nocache": ("s", "-", False),
    "prefix_cache": ("o", "-", True),
    "example_connector": ("D", "--", False),
    "polarkvd": ("o", "-", False),
    "lmcache": ("^", "-.", False),
    "mooncake": ("v", ":", False),
}
CHAT_LABELS = {
    "nocache": "vLLM, no prefix cache",
    "prefix_cache": "vLLM prefix cache",
    "example_connector": "vLLM ExampleConnector",
    "polarkvd": "polarkvd",
    "lmcache": "LMCache",
    "mooncake": "Mooncake Store",
}


def plot(res: dict[str, Any]) -> Any:
    """`bench chat`: TTFT per round per configuration (log scale) and prompt tokens computed per
    request (prompt minus the tokens a cache served), per round."""
    wl, configs = res["workload"], res["configs"]
    fig, axes = figure(2, height=4.6)
    ttft_ax, comp_ax = axes[0]
    for name, c in configs.items():
        rounds = [r["round"] for r in c["rounds"]]
        ttft = [r["ttft_s"]["mean"] for r in c["rounds"]]
        computed = [max(1.0, r["prompt_tokens_mean"] - r["hit_tokens_mean"]) for r in c["rounds"]]
        ours = name == "polarkvd"
        # lines that run on top of each other (two configurations computing the same tokens) stay
        # apart by their marker and dash
        marker, dash, hollow = CHAT_STYLES.get(name, ("o", "-", False))
        style = {"color": COLORS.get(name), "marker": marker, "linestyle": dash, "markersize": 8 if hollow else 6,
                 "markerfacecolor": "none" if hollow else COLORS.get(name), "linewidth": 2.6 if ours else 1.6,
                 "zorder": 4 if ours else 3 if hollow else 2, "label": CHAT_LABELS.get(name, name)}  # fmt: skip
        ttft_ax.plot(rounds, ttft, **style)
        comp_ax.plot(rounds, computed, **style)
    for ax in (ttft_ax, comp_ax):
        plain_log(ax)
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
    ttft_ax.set_ylabel("TTFT, mean over users (s, log scale)")
    ttft_ax.set_title("Time to first token per round")
    comp_ax.set_ylabel("prompt tokens computed, per request (log)")
    comp_ax.set_title("Prefill left to compute (prompt - cache hits)")
    handles, labels = ttft_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), frameon=False)
    na = res.get("not_available") or {}
    title = (
        f"bench chat: {wl['users']} users x {wl['rounds']} rounds, prompts {wl['first_prompt_tokens']}-"
        f"{wl['last_prompt_tokens']} tokens, {wl['model']} {wl['dtype']}, block {wl['block_tokens']}"
    )
    if na:
        title += f"\n(not available: {', '.join(na)})"
    fig.suptitle(title)
    return fig

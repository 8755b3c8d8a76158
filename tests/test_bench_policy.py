"""`polarkvd bench policy` (polarkvd/bench/policy.py): its traces are sized as documented, its
modelled engines make deep pages dear, and a tiny replay of every policy gives the JSON keys the
issue names. The policy modules never import numba (it breaks vLLM's engine start in-process)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from polarkvd.bench import policy as bench


def args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p.parse_args(list(argv))


def test_traces_are_sized_to_the_pressure_and_dram_holds_the_longest_prompt() -> None:
    traces = bench.build_traces(list(bench.TRACES), 60, seed=0)
    assert traces == bench.build_traces(list(bench.TRACES), 60, seed=0)  # deterministic
    for name, prompts in traces.items():
        ws, dram, disk = bench.tier_sizes(prompts, args("--pressure", "2"))
        longest = max(len(p) for p in prompts) // bench.PAGE_TOKENS
        assert dram >= 1.25 * longest, name  # a load pins its whole hit in DRAM
        if dram + disk > math.ceil(ws / 2):  # only when the longest prompt forced DRAM up
            assert dram == math.ceil(1.25 * longest), name
        else:
            assert dram + disk == math.ceil(ws / 2), name


@pytest.mark.parametrize("engine", sorted(bench.ENGINES))
def test_modelled_engines_make_deep_pages_dear(engine: str) -> None:
    """Attention makes a page at a depth of 50K tokens cost more than twice one at the start."""
    e = bench.ENGINES[engine]
    page = bench.PAGE_TOKENS
    shallow = e.seconds(page, 0) - e.fixed
    deep = e.seconds(page, 50_000) - e.fixed
    assert deep > 2 * shallow


@pytest.mark.slow
def test_a_tiny_replay_of_every_policy_reports_the_issues_keys() -> None:
    res = bench.run(args("--requests", "9", "--traces", "chat", "mixed"))
    json.dumps(res)  # JSON-able
    assert set(res["traces"]["mixed"]) == {"lru", "s3fifo", "cost", "cost_demote_always"}
    for key in ("mixed_cost_vs_lru", "mixed_cost_vs_s3fifo", "worst_cost_vs_best_other",
                "disk_bytes_drop_vs_demote", "recompute_drop_vs_demote", "score_10k_ms"):  # fmt: skip
        assert key in res
    for r in res["traces"]["chat"].values():
        assert r["prefill_s"] == pytest.approx(r["recompute_s"] + r["load_s"])
        assert 0 < r["recomputed_tokens"] <= r["prompt_tokens"]
    assert "bench policy" in bench.render(res)


@pytest.mark.slow
def test_the_measured_disk_rate_still_replays() -> None:
    """--disk-rate measured: the daemon decides by its own reads (a calibration first)."""
    res = bench.run(
        args("--requests", "9", "--traces", "chat", "--policies", "cost", "--disk-rate", "measured")
    )
    assert res["disk_rate"] == "measured" and res["sizes"]["chat"]["bench_disk_page_us"] > 0


def test_a_replay_under_cost_is_the_same_every_run(tmp_path: Path) -> None:
    """Run-to-run spread: the disk writes land in the order the manager queues them and the keys
    (and so the sketch's counters) are the same every run, so two replays of one trace agree in
    everything drop-or-demote and admission decide: a ratio measured once is the ratio."""
    prompts = bench.build_traces(["mixed"], 12, seed=3)["mixed"]
    ws, dram, disk = bench.tier_sizes(prompts, args("--pressure", "4"))
    engine = bench.ENGINES["smollm2"]
    runs = [
        asyncio.run(bench.replay(prompts, "cost", (dram, disk), engine, 1.0, tmp_path / str(i), pinned=True))
        for i in range(2)
    ]
    decided = ["recomputed_tokens", "prefill_s", "demoted_bytes", "dropped_pages", "dropped_rare"]
    decided.append("admitted_low")
    first, second = ([r[key] for key in decided] for r in runs)
    assert first == second
    assert runs[0]["demoted_bytes"] > 0 and runs[0]["recomputed_tokens"] < runs[0]["prompt_tokens"]


def test_the_real_check_replays_a_small_mix_in_half_its_reused_pages() -> None:
    """bench policy --real: its trace interleaves chat, RAG and long-document requests within
    SmolLM2's vocabulary, deterministically, and its tiers hold about half of what it reuses."""
    from polarkvd.bench import policy_real

    prompts = policy_real.small_mixed(0, 10)
    assert prompts == policy_real.small_mixed(0, 10) and len(prompts) == 30
    assert all(0 < t < 49_152 for p in prompts for t in p)
    assert all(len(p) <= 2048 for p in prompts)  # one prefill step each (max_num_batched_tokens)
    reused, dram, disk = policy_real.tier_pages(prompts)
    longest = max(len(p) for p in prompts) // policy_real.PAGE_TOKENS
    assert dram >= 1.25 * longest and dram + disk <= reused


def test_the_policies_never_import_numba() -> None:
    code = "import sys, polarkvd.policy, polarkvd.manager.worth, polarkvd.cost_model; print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

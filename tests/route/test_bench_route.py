"""`polarkvd bench route`'s summary and workload, without engines (the run itself is a benchmark)."""

from __future__ import annotations

import argparse

import pytest

from polarkvd.bench.route import conversations, summarise
from polarkvd.cli import main as cli_main


def _run(ttft: float, p99: float, computed: int) -> dict[str, object]:
    return {"ttft_mean_s": ttft, "ttft_p99_s": p99, "computed_tokens": computed, "prompt_tokens": 10000}


def test_the_summary_names_the_issues_ratios() -> None:
    runs = {
        "nopool/round-robin": _run(2.0, 4.0, 10000),
        "nopool/affinity": _run(1.5, 3.0, 5000),
        "pool/round-robin": _run(1.0, 2.0, 3000),
        "pool/least-loaded": _run(1.1, 1.8, 3000),
        "pool/affinity": _run(0.9, 1.9, 2500),
    }
    args = argparse.Namespace(users=5, turns=4, first=12, answer=16, in_flight=3, kv_blocks=28, arrival=1.0)
    res = summarise(runs, args)
    assert res["nopool_affinity_vs_rr_tokens"] == 0.5
    assert res["nopool_affinity_vs_rr_ttft"] == 0.75
    assert res["pool_affinity_vs_rr_ttft"] == 0.9
    assert res["pool_affinity_p99_lowest"] is False  # least-loaded's 1.8 beat it
    assert res["runs"] is runs and res["pd_outputs_identical"] is None
    # the split's greedy answers against the same conversations answered whole
    same = {"0/0": "Salt.", "0/1": "Wool."}
    runs2 = {
        "pool/round-robin": {**_run(1, 2, 3), "outputs": dict(same)},
        "pool/pd": {**_run(1, 2, 3), "outputs": same},
    }
    assert summarise(runs2, args)["pd_outputs_identical"] is True
    assert "outputs" not in runs2["pool/pd"]  # not recorded: only the verdict
    runs2 = {
        "pool/round-robin": {**_run(1, 2, 3), "outputs": {"0/0": "Salt."}},
        "pool/pd": {**_run(1, 2, 3), "outputs": {"0/0": "Gold."}},
    }
    assert summarise(runs2, args)["pd_outputs_identical"] is False
    # a run that was not made is null, never a made-up number
    res = summarise({k: v for k, v in runs.items() if k.startswith("nopool")}, args)
    assert res["pool_affinity_vs_rr_ttft"] is None and res["pool_affinity_p99_lowest"] is None


def test_repetitions_are_judged_each_on_its_own() -> None:
    runs = {
        "nopool/round-robin": _run(2.0, 4.0, 10000),
        "nopool/affinity": _run(1.5, 3.0, 5000),
        "nopool/round-robin/2": _run(2.0, 4.0, 8000),
        "nopool/affinity/2": _run(1.0, 3.0, 6000),
    }
    args = argparse.Namespace(users=5, turns=4, first=12, answer=16, in_flight=3, arrival=1.0, repeat=2)
    res = summarise(runs, args)
    assert res["nopool_affinity_vs_rr_tokens"] == 0.5  # the first repetition, as without --repeat
    assert res["by_repeat"]["nopool_affinity_vs_rr_tokens"] == [0.5, 0.75]
    assert res["by_repeat"]["nopool_affinity_vs_rr_ttft"] == [0.75, 0.5]
    assert res["by_repeat"]["pool_affinity_p99_lowest"] == [None, None]  # not run
    assert "by_repeat" not in summarise(runs, argparse.Namespace(**{**vars(args), "repeat": 1}))


def test_every_user_opens_with_a_long_private_message() -> None:
    convs = conversations(5, 12)
    texts = [c[0]["content"] for c in convs]
    assert len(set(texts)) == 5 and min(map(len, texts)) > 1500
    assert conversations(5, 12) == convs  # deterministic


def test_bad_options_are_refused_before_anything_starts() -> None:
    with pytest.raises(SystemExit, match="--policies"):
        cli_main(["bench", "route", "--policies", "random"])
    with pytest.raises(SystemExit, match="positive"):
        cli_main(["bench", "route", "--users", "0"])
    with pytest.raises(SystemExit, match="positive"):
        cli_main(["bench", "route", "--repeat", "0"])

"""`polarkvd bench chat` end to end on a tiny workload: four real vLLM processes and a private daemon.

Two users, two rounds, ~600-token prompts, vLLM's KV cache shrunk to one conversation (7 blocks), so
user 0's second round must come from polarkvd. Checks the JSON's documented keys, that greedy outputs
are identical in all four configurations, and that polarkvd delivered hits in round 2.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, clean_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

TOP_KEYS = {
    "ttft_ratio_vs_nocache",
    "ttft_ratio_vs_prefix_cache",
    "ttft_ratio_vs_example_connector",
    "throughput_ratio_vs_prefix_cache",
    "outputs_identical",
    "hit_ttft_ratio_vs_prefix_cache_hot",
    "hit_ttft_ratio_vs_example_connector",
    "bars",
    "workload",
    "configs",
}
CONFIG_KEYS = {
    "rounds",
    "ttft_rounds2plus_s",
    "hit_ttft_s",
    "hot_hit_ttft_s",
    "tokens_per_s",
    "requests_per_s",
    "output_tokens_per_s",
    "hit_tokens",
    "wall_s",
    "per_request",
}


def test_bench_chat_tiny(model_dir: str) -> None:
    cmd = [
        sys.executable, "-m", "polarkvd", "bench", "chat", "--json",
        "--users", "2", "--rounds", "2", "--history", "300", "--system", "200",
        "--answer", "16", "--hot-users", "0", "--kv-blocks", "7", "--model", model_dir,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout)
    assert TOP_KEYS <= set(res), TOP_KEYS - set(res)
    assert list(res["configs"]) == ["nocache", "prefix_cache", "example_connector", "polarkvd"]
    for name, cfg in res["configs"].items():
        assert CONFIG_KEYS <= set(cfg), (name, CONFIG_KEYS - set(cfg))
        assert [r["round"] for r in cfg["rounds"]] == [1, 2]
        assert cfg["requests"] == 4 and cfg["requests_per_s"] > 0
    for key in ("ttft_ratio_vs_nocache", "ttft_ratio_vs_prefix_cache", "ttft_ratio_vs_example_connector",
                "throughput_ratio_vs_prefix_cache"):  # fmt: skip
        assert isinstance(res[key], float) and res[key] > 0, (key, res[key])
    assert res["outputs_identical"] is True, res["outputs_compared"]
    assert res["outputs_compared"]["requests"] == 4
    nocache = res["configs"]["nocache"]["rounds"][1]
    assert nocache["hit_tokens_total"] == 0
    pk = res["configs"]["polarkvd"]["rounds"][1]
    assert pk["hit_tokens_total"] > 0
    assert pk["external_tokens_total"] > 0 and pk["loaded_tokens_total"] > 0, pk  # from the daemon
    assert "round" in proc.stderr and "polarkvd" in proc.stderr  # progress lines

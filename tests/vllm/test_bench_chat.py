"""`polarkvd bench chat` end to end on a tiny workload: real vLLM processes, a private daemon and, where
scripts/setup-bench-peers.sh installed them, the real peers (LMCache, Mooncake Store).

Two users, two rounds, ~600-token prompts, vLLM's KV cache shrunk to about one conversation (7 blocks
of 128, 30 of 32), so user 0's second round must come from the connector's store. Checks the JSON's
documented keys, that greedy outputs are identical in every configuration, and that the stores
delivered hits in round 2 and in the hot phase.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from polarkvd.bench.harness import PEERS_ENV, PeerUnavailable, check_peer_import, peers_dir
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
        "--configs", "nocache", "prefix_cache", "example_connector", "polarkvd",
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


def peers_installed() -> tuple[list[str], list[str]]:
    """(peers that import here, why each other one does not)."""
    env = clean_env(**({PEERS_ENV: str(peers_dir())}))
    have, why = [], []
    for name, module in (("lmcache", "lmcache.v1.multiprocess.server"), ("mooncake", "mooncake.store")):
        try:
            check_peer_import(module, env, name)
            have.append(name)
        except PeerUnavailable as e:
            why.append(str(e))
    return have, why


def test_bench_chat_peers_tiny(model_dir: str) -> None:
    """The real peers as a user runs them (`--configs polarkvd lmcache mooncake --block-size 32`): each
    starts its own server, serves hits from it in round 2 and in the hot phase, and answers exactly as
    polarkvd does. Skips (with the reason) where scripts/setup-bench-peers.sh has not been run."""
    peers, why = peers_installed()
    if not peers:
        pytest.skip("no real peer installed: " + "; ".join(why))
    cmd = [
        sys.executable, "-m", "polarkvd", "bench", "chat", "--json", "--block-size", "32",
        "--users", "2", "--rounds", "2", "--history", "300", "--system", "200", "--answer", "16",
        "--hot-users", "1", "--kv-blocks", "30", "--model", model_dir, "--configs", "polarkvd", *peers,
    ]  # fmt: skip
    env = clean_env(**{PEERS_ENV: str(peers_dir())})
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout)
    assert res["not_available"] == {}, res["not_available"]  # installed, so they must run
    assert list(res["configs"]) == ["polarkvd", *peers]
    assert res["workload"]["block_tokens"] == 32 and res["workload"]["lmcache_chunk_tokens"] == 32
    assert res["outputs_identical"] is True, res["outputs_compared"]
    assert res["outputs_compared"]["requests"] == 6  # 4 round requests + 2 hot ones, in every config
    for name in peers:
        cfg = res["configs"][name]
        r2 = cfg["rounds"][1]
        assert r2["hit_tokens_total"] > 0 and r2["external_tokens_total"] > 0, (name, r2)
        assert cfg["hot_hit_tokens_mean"] > 0, name  # vLLM reset: the hit comes from the peer's store
        assert cfg["hit_requests"] >= 1, name
        assert isinstance(res[f"ttft_ratio_vs_{name}"], float), name
        assert isinstance(res[f"throughput_ratio_vs_{name}"], float), name
        assert res["bars"][f"ttft_ratio_vs_{name}"]["pass"] in (True, False)
        assert f"{name}: round 2" in proc.stderr  # progress lines
    for name in ("lmcache", "mooncake"):
        if name not in peers:
            assert f"ttft_ratio_vs_{name}" in res and res[f"ttft_ratio_vs_{name}"] is None

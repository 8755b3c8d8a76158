"""`polarkvd bench pipeline` end to end on a tiny prefix: two daemons in a cluster, two vLLM processes.

A 640-token prefix (5 pages), one trial per cell: each of local DRAM, disk and a peer's DRAM served the
whole prefix with pipelining off and on (the bench itself refuses a hit from the wrong source). Checks
the JSON's documented shape, that every cell has a TTFT, and that greedy outputs are identical to the
no-cache reference in all six configurations.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, clean_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(600)]

TOP_KEYS = {
    "runs",
    "remote_vs_local",
    "disk_vs_local",
    "hidden_fraction",
    "hidden_fraction_raw",
    "bars",
    "outputs_identical",
    "outputs_compared",
    "workload",
    "notes",
}


def test_bench_pipeline_tiny(model_dir: str) -> None:
    cmd = [
        sys.executable, "-m", "polarkvd", "bench", "pipeline", "--json",
        "--prefix", "600", "--trials", "1", "--answer", "8", "--model", model_dir,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout)
    assert TOP_KEYS <= set(res), TOP_KEYS - set(res)
    assert res["workload"]["prefix_tokens"] == 640 and res["workload"]["prefix_pages"] == 5
    assert set(res["runs"]) == {"local", "disk", "remote"}
    for source, by_mode in res["runs"].items():
        assert set(by_mode) == {"on", "off"}, source
        for mode, run in by_mode.items():
            assert isinstance(run["ttft_ms"], float) and run["ttft_ms"] > 0, (source, mode, run)
            assert len(run["trials_ms"]) == 1
            assert run["loaded_tokens"] == 640, (source, mode, run)  # the whole prefix came from polarkvd
            assert run["load_mode"] == {"on": "layer", "off": "step"}[mode]
            c = run["daemon_counters"]
            assert c["loaded_pages_disk"] == (5 if source == "disk" else 0), (source, mode, c)
            assert c["fetched_pages_remote"] == (5 if source == "remote" else 0), (source, mode, c)
    for key in ("remote_vs_local", "disk_vs_local"):
        assert isinstance(res[key], float) and res[key] > 0, (key, res[key])
    h = res["hidden_fraction"]
    assert h is None or 0.0 <= h <= 1.0
    assert set(res["bars"]) == {"remote_vs_local", "disk_vs_local", "hidden_fraction"}
    assert res["outputs_identical"] is True, res["outputs_compared"]
    # 2 modes x 3 sources x (1 warm-up + 1 trial), each against the no-cache reference
    assert res["outputs_compared"]["requests"] == 12
    assert "remote trial 0" in proc.stderr and "pipelining on" in proc.stderr  # progress lines

"""`polarkvd bench cluster` end to end, tiny: two real daemons (fetch), the transport alone and raw TCP,
through the CLI, as JSON."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_cluster_json_shape_and_fetch_moves_bytes() -> None:
    cmd = [sys.executable, "-m", "polarkvd", "bench", "cluster", "--json", "--sizes", "64KiB", "1MiB",
           "--seconds", "0.05", "--rounds", "2", "--data", "2MiB", "--batch", "2",
           "--skip", "redis", "mooncake"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["sizes"] == [64 << 10, 1 << 20]
    assert res["headline_page_bytes"] == 1 << 20  # no 4 MiB in this run: the largest size
    for key in ("fetch_gbps", "transport_gbps", "raw_tcp_gbps", "fetch_vs_raw_tcp"):
        assert res[key] > 0
    assert res["redis_gbps"] is None and res["mooncake_gbps"] is None and res["fetch_vs_mooncake"] is None
    assert res["not_available"] == {}  # skipped is not "not available"
    assert set(res["by_size"]) == {str(64 << 10), str(1 << 20)}
    for row in res["by_size"].values():
        assert len(row["fetch_rounds_gbps"]) == 2 and all(v > 0 for v in row["fetch_rounds_gbps"])
        assert row["fetch_gbps"] > 0 and row["raw_tcp_gbps"] > 0
        assert row["transport_gbps"] > 0 and row["transport_stored_sums_gbps"] > 0
        assert row["redis_gbps"] is None and row["mooncake_gbps"] is None

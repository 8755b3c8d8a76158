"""`bench mixed`'s CPU accounting: the kernel's per-thread times turned into what the load cost a step."""

from __future__ import annotations

import os

import pytest

from polarkvd import cli
from polarkvd.bench.mixed import CpuWatch, load_cpu, render, summarize
from tests.test_plots import mixed_result


def test_the_watch_reads_real_threads_and_splits_the_run_into_windows() -> None:
    watch = CpuWatch(os.getpid())  # this process stands in for the daemon
    watch.mark("from", 2)
    sum(i * i for i in range(300_000))  # CPU on this (the main) thread
    watch.mark("arrival", 10)
    sum(i * i for i in range(300_000))
    watch.mark("loaded", 14)
    w = watch.windows()
    assert w["before"]["steps"] == 8 and w["loading"]["steps"] == 4
    assert w["before"]["main_cpu_ms"] > 0 and w["loading"]["main_cpu_ms"] > 0
    assert w["loading"]["daemon_cpu_ms"] >= w["loading"]["main_cpu_ms"]  # (the "daemon" is this process)
    assert watch.loader is None and w["loading"]["loader_cpu_ms"] == 0.0  # no loading thread here
    only = CpuWatch(os.getpid())
    only.mark("from", 2)
    only.mark("arrival", 10)
    assert set(only.windows()) == {"before"}  # a synchronous hit has no steps during its load


def test_the_load_cpu_is_what_the_daemon_and_the_loader_took_over_their_usual() -> None:
    def window(daemon: float, loader: float, wait: float) -> dict[str, float]:
        return {"steps": 10, "daemon_cpu_ms": daemon, "loader_cpu_ms": loader, "main_cpu_ms": 20.0,
                "main_wait_ms": wait}  # fmt: skip

    got = load_cpu({"before": window(0.3, 0.0, 0.4), "loading": window(2.0, 0.8, 2.6)})
    assert abs(got["load_cpu_ms_per_step"] - 2.5) < 1e-9
    assert got["main_wait_ms_per_step_before"] == 0.4 and got["main_wait_ms_per_step"] == 2.6
    assert load_cpu({"before": window(0.3, 0.0, 0.4)})["load_cpu_ms_per_step"] is None
    res = mixed_result()
    res["outputs_identical"] = True
    for sc in res["scenarios"].values():
        sc.update({"steps_during_load": 0, "itl_during_load_mean_s": None, "itl_during_load_max_s": None,
                   "itl_during_load_ratio": None, "hit_step_s": 0.4, "hit_step_ratio": 13.0})  # fmt: skip
    assert "ms of CPU a step" not in render(res)  # recorded before the accounting: no line
    res["scenarios"]["disk_async"].update(got)
    assert "the load took 2.50 ms of CPU a step" in render(res)
    assert "waited for a CPU 2.60 ms a step during it, 0.40 before" in render(res)


def test_a_negative_step_bytes_is_refused_before_anything_starts() -> None:
    with pytest.raises(SystemExit, match="--step-bytes must be 0"):
        cli.main(["bench", "mixed", "--step-bytes", "-1"])


def test_the_usual_step_is_the_steady_half_before_the_hit() -> None:
    """The decoders' first steps can be many times longer (1.4 s once on a busy machine): they must
    not move the usual step the load is measured against."""
    before = (0.2, 0.05, 1.4, 0.36, 0.04, 0.03, 0.02, 0.02, 0.02, 0.02, 0.02)
    steps = [{"s": 0.5, "decoders": 3, "phase": "before"}]  # their prefill
    steps += [{"s": s, "decoders": 3, "phase": "before"} for s in before]
    steps += [
        {"s": 0.024, "decoders": 3, "phase": "loading"},
        {"s": 0.15, "decoders": 3, "phase": "hit_step"},
    ]
    got = summarize(steps, 3)
    assert got["usual_itl_s"] == 0.02 and abs(got["itl_during_load_ratio"] - 1.2) < 1e-9

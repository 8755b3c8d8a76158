"""The fuzz target of fuzz_frames.py, run for a bounded number of inputs in the default suite.

With atheris installed the real fuzzer runs as a subprocess for a fixed number of inputs from a
fixed seed (so CI draws the same inputs each time); without it, hypothesis feeds the same target
random bytes. Either way an input that breaks the server side's rules fails the test with the
input's bytes (atheris writes them to a crash-* file under the test's tmp dir; replay it with
`python tests/fuzz/fuzz_frames.py crash-...`). Longer runs: README.md, "Tests".
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import fuzz_frames

TARGET = Path(fuzz_frames.__file__)
ROOT = TARGET.parents[2]
#: ~20-40 s on one loaded core; -max_total_time caps it on a slower machine
ATHERIS_RUNS = 6_000


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_atheris_finds_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(TARGET), f"-runs={ATHERIS_RUNS}", "-seed=1", "-max_total_time=60", "-timeout=30",
         f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    crashes = sorted(tmp_path.glob("crash-*"))
    assert proc.returncode == 0 and not crashes, f"{crashes}\n{out[-6000:]}"
    assert "Done" in out, out[-2000:]


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_random_bytes_find_nothing(data: bytes) -> None:
    fuzz_frames.test_one_input(data)

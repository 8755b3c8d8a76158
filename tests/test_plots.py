"""polarkvd/bench/plots/: every benchmark's result draws to PNG and SVG; `--plot-from` redraws a
recorded `--json` output through the CLI without running anything; a missing matplotlib, a bad file
name or another benchmark's JSON is a clear error, before a run and not after it."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from polarkvd import cli
from polarkvd.bench import plots
from tests.conftest import REPO_ROOT, clean_env

pytest.importorskip("matplotlib")  # [plot]; ./scripts/bootstrap.sh installs it with the test extras


def datapath_result() -> dict[str, Any]:
    res: dict[str, Any] = {"page_bytes": 5898240, "small_page_bytes": 65536, "pages_per_round": 32}
    res.update(memcpy_gbps=10.5, store_gbps=9.1, load_gbps=8.7, memcpy_small_gbps=12.0, store_small_gbps=6.3,
               load_small_gbps=7.0, socket_rtt_p50_us=11.0, socket_rtt_p99_us=30.0, zmq_ipc_rtt_p50_us=44.0,
               zmq_ipc_rtt_p99_us=90.0, lookup_p50_us=11.2, lookup_p99_us=20.0, lookup_socket_p50_us=65.0,
               lookup_socket_p99_us=140.0, lookup_partial_p50_us=14.0, lookup_partial_p99_us=28.0,
               lookup_partial_socket_p50_us=92.0, lookup_partial_socket_p99_us=200.0)  # fmt: skip
    return res


def cluster_result() -> dict[str, Any]:
    by_size = {}
    for size, label in ((1 << 20, "1 MiB"), (4 << 20, "4 MiB")):
        row: dict[str, Any] = {"page_bytes": size, "label": label}
        for i, m in enumerate(
            ("fetch", "transport", "transport_stored_sums", "raw_tcp", "redis", "mooncake")
        ):
            row[f"{m}_gbps"] = None if m == "mooncake" else 2.0 + i * 0.5
            row[f"{m}_cpu_s_per_gb"] = None if m in ("fetch", "mooncake") else 0.2 + i * 0.05
        by_size[str(size)] = row
    return {"by_size": by_size, "threads": 2, "batch": 8, "rounds": 3, "seconds": 0.2,
            "not_available": {"mooncake": "RuntimeError: no Mooncake venv"}}  # fmt: skip


def pipeline_result() -> dict[str, Any]:
    runs = {
        s: {
            m: {"ttft_ms": base * f, "min_ms": base * f * 0.9, "max_ms": base * f * 1.2, "load_mode": lm}
            for m, f, lm in (("off", 1.0, "step"), ("on", 0.85, "layer"))
        }
        for s, base in (("local", 200.0), ("disk", 300.0), ("remote", 260.0))
    }
    wl = {"prefix_tokens": 2944, "prefix_pages": 23, "prefix_bytes": 135659520, "trials": 5,
          "model": "smollm2-135m", "dtype": "float32", "disk_cache": "cold"}  # fmt: skip
    bars = {"remote_vs_local": {"value": 1.1, "bar": "<= 1.2", "pass": True}}
    return {"runs": runs, "workload": wl, "bars": bars}


def mixed_result() -> dict[str, Any]:
    def steps(hit_step: float, loading: int) -> list[dict[str, Any]]:
        out = [{"s": 0.5, "decoders": 3, "phase": "before"}]  # the decoders' prefill
        out += [{"s": 0.03, "decoders": 3, "phase": "before"} for _ in range(12)]
        out += [{"s": 0.032, "decoders": 3, "phase": "loading"} for _ in range(loading)]
        out += [{"s": hit_step, "decoders": 3, "phase": "hit_step"}]
        out += [{"s": 0.03, "decoders": 3, "phase": "after"} for _ in range(3)]
        return out

    scenarios = {
        name: {"steps": steps(hit, loading), "usual_itl_s": 0.03, "hit_ttft_s": hit + 0.032 * loading}
        for name, hit, loading in (("disk_async", 0.4, 10), ("disk_sync", 0.9, 0), ("dram", 0.4, 0))
    }
    return {"shape": {"document": 3000, "decoders": 3, "block_size": 128, "cpus": "0-1"},
            "scenarios": scenarios, "bar_itl_during_load": 1.2}  # fmt: skip


def chat_result() -> dict[str, Any]:
    configs = {}
    for name, hit in (("nocache", 0), ("prefix_cache", 500), ("polarkvd", 1500)):
        rounds = [
            {"round": r, "ttft_s": {"mean": 2.0 if r == 1 or not hit else 2.0 * (1 - hit / 1700)},
             "prompt_tokens_mean": 1500.0 + 100 * r, "hit_tokens_mean": 0.0 if r == 1 else float(hit)}
            for r in (1, 2, 3)
        ]  # fmt: skip
        configs[name] = {"rounds": rounds}
    wl = {"users": 4, "rounds": 3, "first_prompt_tokens": 1579, "last_prompt_tokens": 1794,
          "model": "smollm2-135m", "dtype": "float32", "block_tokens": 128}  # fmt: skip
    return {"workload": wl, "configs": configs, "not_available": {"lmcache": "not installed"}}


def page_sizes_result() -> dict[str, Any]:
    def ping(p50: float, p99: float, mx: float, n: int) -> dict[str, Any]:
        return {"pings": n, "p50_ms": p50, "p99_ms": p99, "max_ms": mx}

    return {"capacity": 1 << 30, "slab_bytes": 64 << 20, "a_pages_per_slab": 2048, "chains": 8192, "disk": False,
            "reserve_ms": 19.6, "reserve_64_more_ms": 0.4, "evicted_pages": 2048, "moved_pages": 0,
            "a_pages_before": 32768, "pages_after": 30721, "ping_fill": ping(0.1, 2.96, 14.7, 5000),
            "ping_reserve": ping(0.05, 5.86, 8.8, 300)}  # fmt: skip


def connect_result() -> dict[str, Any]:
    def phase(tried: int, late: int, failed: int, p50: float, peak: int) -> dict[str, Any]:
        return {"tried": tried, "ok": tried - late - failed, "late": late, "failed": failed,
                "errors": {"PolarKVError: timed out": failed} if failed else {}, "p50_ms": p50,
                "p99_ms": p50 * 6, "max_ms": p50 * 20, "peak_threads": peak}  # fmt: skip

    return {"procs": 4, "seconds": 10.0, "timeout_s": 2.0, "idle_threads": 2, "thread_bound": 1090,
            "phases": {"flood": phase(24184, 0, 0, 1.36, 10), "flood + 200 idle": phase(16597, 3, 12, 1.49, 70)},
            "connections_refused": 0, "connections_hello_timeout": 56,
            "connections_dropped_unattached": 144}  # fmt: skip


def sglang_result() -> dict[str, Any]:
    def backend(set_gbps: float, get_gbps: float, cpu: float) -> dict[str, Any]:
        gb = 128 * 1474560 / 1e9
        return {"rounds_all_pages": True, "bytes_identical": True, "set_gbps": set_gbps, "get_gbps": get_gbps,
                "set_pages_s": 128 / (gb / set_gbps), "get_pages_s": 128 / (gb / get_gbps), "hit_query_ms": 1.3,
                "exists64_p50_us": 19.0, "exists64_hits": 64, "rtt_p50_us": 80.0, "cpu_s_per_gb_set": cpu,
                "cpu_s_per_gb_get": cpu / 2, "set_s": [gb / set_gbps * f for f in (0.9, 1.0, 1.2)],
                "get_s": [gb / get_gbps * f for f in (0.8, 1.0, 1.1)]}  # fmt: skip

    geometry = {"layers": 30, "kv_heads": 3, "head_dim": 64, "dtype": "bfloat16", "page_tokens": 64,
                "page_bytes": 1474560, "layout": "page_first"}  # fmt: skip
    return {"geometry": geometry, "pages": 128, "rounds": 3, "mooncake_mode": "client",
            "backends": {"polarkv": backend(8.4, 7.5, 0.08), "file": backend(0.41, 0.41, 1.2),
                         "mooncake": {"not_available": "no Mooncake venv"}},
            "get_vs_file": 18.2, "get_vs_mooncake": None, "rtt_p50_us": 80.0, "exists_p50_vs_rtt": 0.24}  # fmt: skip


#: More small results, one `<kind>.json` each: a new benchmark's plot adds its file here (and nothing else)
MORE_RESULTS = Path(__file__).parent / "plot_results"
#: the recorded runs the documentation shows (docs/img/<kind>.json beside <kind>.png)
DOCS_IMG = REPO_ROOT / "docs" / "img"

RESULTS = {
    "datapath": datapath_result,
    "cluster": cluster_result,
    "pipeline": pipeline_result,
    "mixed": mixed_result,
    "chat": chat_result,
    "page-sizes": page_sizes_result,
    "connect": connect_result,
    "sglang": sglang_result,
}
RESULTS.update({p.stem: (lambda p=p: json.loads(p.read_text())) for p in sorted(MORE_RESULTS.glob("*.json"))})


def test_every_plot_module_has_a_result_these_tests_draw() -> None:
    missing = [k for k in plots.kinds() if k not in RESULTS and k.replace("_", "-") not in RESULTS]
    assert not missing, f"add tests/plot_results/<kind>.json, a small --json output, for {missing}"


@pytest.mark.parametrize("recorded", sorted(p.name for p in DOCS_IMG.glob("*.json")))
def test_the_recorded_runs_the_docs_show_still_draw(recorded: str, tmp_path: Path) -> None:
    kind = recorded.removesuffix(".json")
    plots.draw(kind, plots.load_result(DOCS_IMG / recorded), tmp_path / f"{kind}.svg")
    assert "bench " + kind in (tmp_path / f"{kind}.svg").read_text()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("kind", sorted(RESULTS))
def test_every_benchmark_draws_png_and_svg(kind: str, tmp_path: Path) -> None:
    res = RESULTS[kind]()
    plots.draw(kind, res, tmp_path / f"{kind}.png")
    width, height = png_size(tmp_path / f"{kind}.png")
    assert width == plots.WIDTH * plots.DPI and 300 < height < 1000, (width, height)  # docs size
    plots.draw(kind, res, tmp_path / "sub" / f"{kind}.svg")  # folders are made
    svg = (tmp_path / "sub" / f"{kind}.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "bench " + kind in svg  # the title is text (svg.fonttype none), readable and searchable


@pytest.mark.parametrize(
    "kind", ["datapath", "cluster", "pipeline", "mixed", "page-sizes", "connect", "sglang"]
)
def test_plot_from_redraws_a_recorded_run_through_the_cli(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recorded = tmp_path / f"{kind}.json"
    recorded.write_text(
        "[1/8    0.0s] a progress line caught with the output ...\n" + json.dumps(RESULTS[kind]())
    )
    assert cli.main(["bench", kind, "--plot-from", str(recorded), "--plot", str(tmp_path / "out.svg")]) == 0
    assert (tmp_path / "out.svg").stat().st_size > 1000
    assert cli.main(["bench", kind, "--plot-from", str(recorded)]) == 0  # default: the JSON's name, .png
    png_size(tmp_path / f"{kind}.png")
    assert f"plot: {tmp_path / f'{kind}.png'}" in capsys.readouterr().err


def test_bad_requests_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recorded = tmp_path / "datapath.json"
    recorded.write_text(json.dumps(datapath_result()))
    assert cli.main(["bench", "datapath", "--plot", str(tmp_path / "x.pdf")]) == 1  # before any run
    assert "must end in .png or .svg" in capsys.readouterr().err
    assert cli.main(["bench", "cluster", "--plot-from", str(recorded)]) == 1
    assert "not a `polarkvd bench cluster --json` output" in capsys.readouterr().err
    assert cli.main(["bench", "mixed", "--plot-from", str(tmp_path / "missing.json")]) == 1
    assert "missing.json" in capsys.readouterr().err
    old = mixed_result()
    for sc in old["scenarios"].values():
        del sc["steps"]  # recorded before the steps were kept
    recorded.write_text(json.dumps(old))
    assert cli.main(["bench", "mixed", "--plot-from", str(recorded)]) == 1
    assert "per-step times" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kind, key",
    [("page-sizes", "ping_fill"), ("page-sizes", "reserve_ms"), ("connect", "phases"), ("connect", "thread_bound"),
     ("sglang", "geometry"), ("sglang", "backends")],
)  # fmt: skip
def test_a_result_missing_a_key_is_a_plot_error_naming_the_benchmark(
    kind: str, key: str, tmp_path: Path
) -> None:
    res = RESULTS[kind]()
    del res[key]
    with pytest.raises(plots.PlotError, match=f"not a `polarkvd bench {kind} --json` output .*{key}"):
        plots.draw(kind, res, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_sglang_without_any_backend_result_is_a_plot_error(tmp_path: Path) -> None:
    res = sglang_result()
    res["backends"] = {"polarkv": {"not_available": "SGLang is not installed"}}
    with pytest.raises(plots.PlotError, match="no backend ran"):
        plots.draw("sglang", res, tmp_path / "x.png")


@pytest.mark.parametrize("kind", ["page-sizes", "connect", "sglang"])
def test_a_bad_plot_file_fails_before_the_benchmark_runs(
    kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", kind, "--plot", "run.jpg"]) == 1
    err = capsys.readouterr().err
    assert "must end in .png or .svg" in err
    assert "[1/" not in err  # no step of the run started


def test_a_new_benchmark_adds_its_plot_by_adding_one_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the package docstring promises issue 17's and 18's plots: a module `<kind>.py` with
    `plot(res)` in the package is found by draw() and listed, nothing shared touched."""
    (tmp_path / "demo_bench.py").write_text(
        "from polarkvd.bench.plots import figure\n"
        "def plot(res):\n"
        "    fig, axes = figure()\n"
        "    axes[0][0].bar([0], [res['gbps']])\n"
        "    fig.suptitle('bench demo-bench')\n"
        "    return fig\n"
    )
    monkeypatch.setattr(plots, "__path__", [*plots.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "polarkvd.bench.plots.demo_bench", raising=False)
    try:
        assert "demo_bench" in plots.kinds() and "sglang" in plots.kinds()
        plots.draw("demo-bench", {"gbps": 2.0}, tmp_path / "demo.png")
        png_size(tmp_path / "demo.png")
        with pytest.raises(plots.PlotError, match=r"no plot for benchmark 'nothing' \(plots: .*demo_bench"):
            plots.draw("nothing", {}, tmp_path / "x.png")
        with pytest.raises(plots.PlotError, match="no plot for benchmark"):
            plots.draw("../demo_bench", {}, tmp_path / "x.png")
    finally:
        sys.modules.pop("polarkvd.bench.plots.demo_bench", None)


def test_without_matplotlib_the_error_names_the_extra_before_running(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # as if it were not installed
        "from polarkvd.cli import main\n"
        f"sys.exit(main(['bench', 'datapath', '--plot', {str(tmp_path / 'x.png')!r}]))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=clean_env(), capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "polarkvd[plot]" in r.stderr and "matplotlib" in r.stderr
    assert "raw round trips" not in r.stderr  # refused before the benchmark started
    # and the CLI itself never imports matplotlib
    code = "import sys; from polarkvd.cli import build_parser; build_parser(); print('matplotlib' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=clean_env(), capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.stdout.strip() == "False", r.stderr

"""Pictures of benchmark results, drawn with matplotlib: the CLI side (`--plot`, `--plot-from`) and the
drawing helpers every plot shares. Each benchmark's picture is its own module, `plots/<kind>.py`.

    polarkvd bench datapath --plot datapath.png          run, print as usual, then draw
    polarkvd bench datapath --plot-from run.json --plot datapath.svg   redraw a recorded run, no run

matplotlib is an optional extra (`pip install 'polarkvd[plot]'`), imported only when a plot is drawn:
this package's top level is the standard library only, so every benchmark can offer `--plot` without
it. The format follows the file name: `.png` or `.svg`. Figures are sized for the documentation
(docs/img/, about 1000 px wide) and drawn with `matplotlib.figure.Figure`, no pyplot: no GUI backend,
no global state.

Adding the picture of a new benchmark `polarkvd bench <kind>` touches nothing here:

1. Write `polarkvd/bench/plots/<kind>.py` (the benchmark's name, `-` spelled `_`), whose docstring
   says what the picture shows, with one function `plot(res: dict[str, Any]) -> Figure` that draws
   `res`, the benchmark's `--json` output, and returns the figure without saving it. Build it from
   this package's helpers (`from polarkvd.bench.plots import COLORS, figure, grouped_bars, ...`):
   `figure()` for the Figure and its axes, units in every axis label, a legend, a `suptitle` that
   starts with "bench <kind>". Index `res` plainly (`res["key"]`): a missing key, a None or a short
   list becomes a PlotError naming the benchmark, and an old recording can raise
   `KeyError("what is missing")` itself for a clearer message. Import matplotlib inside `plot`.
2. Wire the benchmark with `add_plot_arguments(parser)` and end its `main` with
   `harness.bench_main("<kind>", args, run, render)`: it redraws for `--plot-from`, checks `--plot`
   before a long run (a bad name fails now, not after it) and draws after printing.

3. Add a small `--json` output of the benchmark as `tests/plot_results/<kind>.json`: tests/test_plots.py
   then draws it (PNG and SVG, at the docs' size, and through `--plot-from`); it fails for a plot
   module without one. A picture recorded for the docs goes in `docs/img/<kind>.png` beside the
   run's `<kind>.json` (no machine paths in it), which the tests redraw too.

`draw(kind, ...)` finds `polarkvd.bench.plots.<kind>` by importlib; `kinds()` lists the modules there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import pkgutil
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from polarkvd.errors import PolarKVError

EXTRA = "polarkvd[plot]"
FORMATS = (".png", ".svg")
#: Figure width in inches at DPI: ~1000 px, the width docs/img's pictures are shown at.
WIDTH, DPI = 10.0, 100


class PlotError(PolarKVError):
    """A plot could not be drawn: matplotlib missing, a bad file name, a JSON of another benchmark."""


# ------------------------------------------------------------------------------------- the CLI side


def add_plot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plot", metavar="FILE", default=None,
                   help=f"also draw the result into FILE (.png or .svg; needs matplotlib: pip install '{EXTRA}')")  # fmt: skip
    p.add_argument("--plot-from", metavar="JSON", default=None,
                   help="do not run: draw a recorded --json output into --plot FILE (default: JSON's name with .png)")  # fmt: skip


def check(args: argparse.Namespace) -> None:
    """Before a run: --plot's format is known and matplotlib is there (a long run is not wasted)."""
    if getattr(args, "plot", None):
        plot_format(args.plot)
        require_matplotlib()


def redraw(kind: str, args: argparse.Namespace) -> int:
    """`--plot-from JSON`: draw the recorded result of `kind` into `--plot` (or JSON's name .png)."""
    src = Path(args.plot_from)
    out = Path(args.plot) if args.plot else src.with_suffix(".png")
    plot_format(out)
    res = load_result(src)
    draw(kind, res, out)
    print(f"plot: {out}", file=sys.stderr)
    return 0


def after_run(kind: str, res: dict[str, Any], args: argparse.Namespace) -> None:
    """After a run (its result already printed): draw it if --plot was given."""
    if getattr(args, "plot", None):
        draw(kind, res, Path(args.plot))
        print(f"plot: {args.plot}", file=sys.stderr)


def plot_format(path: str | Path) -> str:
    """'png' or 'svg' from the file name; anything else is a PlotError."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise PlotError(f"--plot {path}: the file name must end in .png or .svg")
    return suffix[1:]


def require_matplotlib() -> Any:
    """The matplotlib package, or a PlotError naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError as e:
        raise PlotError(
            f"plots need matplotlib, which is not installed ({e}): pip install '{EXTRA}' "
            "(or pip install matplotlib)"
        ) from None
    return matplotlib


def load_result(path: str | Path) -> dict[str, Any]:
    """A benchmark's recorded `--json` output (the last JSON object in the file, so a file that also
    caught progress lines still reads)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise PlotError(f"--plot-from {p}: {e.strerror or e}") from None
    try:
        res = json.loads(text)
    except json.JSONDecodeError:
        start = text.find("{")
        try:
            res = json.loads(text[start:]) if start >= 0 else None
        except json.JSONDecodeError as e:
            raise PlotError(f"--plot-from {p}: not a benchmark's --json output ({e})") from None
    if not isinstance(res, dict):
        raise PlotError(f"--plot-from {p}: not a benchmark's --json output (no JSON object)")
    return res


def draw(kind: str, res: dict[str, Any], path: str | Path) -> None:
    """Draw `res` (the --json output of `polarkvd bench <kind>`) into `path` (.png or .svg)."""
    fn = plotter(kind)
    fmt = plot_format(path)
    require_matplotlib()
    with style():
        try:
            fig = fn(res)
        except (KeyError, TypeError, IndexError) as e:
            raise PlotError(
                f"this result is not a `polarkvd bench {kind} --json` output this version can draw "
                f"(missing or odd {e!s}); rerun the benchmark"
            ) from None
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format=fmt, dpi=DPI)


def kinds() -> list[str]:
    """The benchmarks that have a plot: the modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def plotter(kind: str) -> Callable[[dict[str, Any]], Any]:
    """`plot` of the module `polarkvd.bench.plots.<kind>` (bench `page-sizes` -> `page_sizes`)."""
    name = kind.replace("-", "_")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise PlotError(f"no plot for benchmark {kind!r} (plots: {', '.join(kinds())})")
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise  # the module is there but imports something missing: its own bug, shown as it is
        raise PlotError(f"no plot for benchmark {kind!r} (plots: {', '.join(kinds())})") from None
    fn = getattr(module, "plot", None)
    if not callable(fn):
        raise PlotError(f"{module.__name__} has no function plot(res)")
    return fn


def __getattr__(name: str) -> Any:
    """`plots.plot_chat` and the like, the names from before the package: each module's `plot`."""
    if name.startswith("plot_") and name[5:] in kinds():
        return plotter(name[5:])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------- drawing help

#: One color per series across every plot (matplotlib's tab10, polarkvd's own in blue).
COLORS = {
    "polarkvd": "#1f77b4",
    "fetch": "#1f77b4",
    "on": "#1f77b4",
    "store": "#1f77b4",
    "nocache": "#7f7f7f",
    "prefix_cache": "#ff7f0e",
    "example_connector": "#8c564b",
    "lmcache": "#2ca02c",
    "mooncake": "#d62728",
    "transport": "#17becf",
    "transport_stored_sums": "#9467bd",
    "raw_tcp": "#7f7f7f",
    "redis": "#e377c2",
    "hicache_file": "#9467bd",
    "off": "#ff7f0e",
    "load": "#17becf",
    "memcpy": "#7f7f7f",
    "p50": "#aec7e8",
    "p99": "#1f77b4",
    "max": "#7f7f7f",
}

#: The latency statistics benchmarks record, as grouped_bars' series: (key suffix, label).
PERCENTILES = (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max"))


@contextlib.contextmanager
def style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(
        {
            "font.size": 11,
            "axes.titlesize": 12,
            "axes.labelsize": 11,
            "legend.fontsize": 10,
            "xtick.labelsize": 10,
            "ytick.labelsize": 10,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "svg.fonttype": "none",  # SVG text stays text
            "savefig.facecolor": "white",
        }
    ):
        yield


def figure(ncols: int = 1, nrows: int = 1, height: float = 4.4, **kw: Any) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def grouped_bars(
    ax: Any,
    groups: Sequence[str],
    series: Sequence[tuple[str, str, Sequence[float | None]]],
    value_fmt: Callable[[float], str] | None = None,
    width: float = 0.8,
) -> None:
    """Bars of several series side by side in each group; None values leave a gap. `series`:
    (key for the color, label, one value per group)."""
    n = max(1, len(series))
    w = width / n
    for i, (key, label, values) in enumerate(series):
        xs = [g + (i - (n - 1) / 2) * w for g in range(len(groups))]
        pairs = [(x, v) for x, v in zip(xs, values) if v is not None]
        if not pairs:
            continue
        bars = ax.bar([x for x, _ in pairs], [v for _, v in pairs], w * 0.92, label=label,
                      color=COLORS.get(key))  # fmt: skip
        if value_fmt is not None:
            ax.bar_label(bars, labels=[value_fmt(v) for _, v in pairs], padding=2, fontsize=8)
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(axis="x", visible=False)


def num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def plain_log(ax: Any, axis: str = "y") -> None:
    """A log-scale axis whose labels read 0.4, 2, 10 (not 4x10^-1); between the powers of ten, 2, 3,
    4 and 6 are labelled too on a short axis, 2 and 5 on one of up to three decades."""
    from matplotlib.ticker import FuncFormatter

    a = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")

    def label(v: float, _pos: Any) -> str:
        if v <= 0:
            return ""
        lo, hi = sorted(a.get_view_interval())
        mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
        span = hi / max(lo, 1e-300)
        between = (2, 3, 4, 6) if span <= 20 else (2, 5) if span <= 1000 else ()
        return f"{v:g}" if mantissa == 1 or mantissa in between else ""

    a.set_major_formatter(FuncFormatter(label))
    a.set_minor_formatter(FuncFormatter(label))


def headroom(ax: Any, factor: float = 1.15) -> None:
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * factor)


# the names from before the package, for callers that used them
_style, _figure, _grouped_bars = style, figure, grouped_bars
_num, _plain_log, _headroom = num, plain_log, headroom

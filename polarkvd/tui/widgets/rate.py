"""A labelled sparkline of one rate series with its latest value."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, Sparkline

from polarkvd.tui import panels
from polarkvd.tui.model import View


class RateLine(Horizontal):
    DEFAULT_CSS = """
    RateLine { height: 1; }
    RateLine > .rate-label { width: 14; text-style: bold; }
    RateLine > Sparkline { width: 1fr; margin: 0 1; }
    RateLine > .rate-value { width: 11; text-align: right; }
    """

    def __init__(self, label: str, series: str, unit: str = "", **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.label, self.series, self.unit = label, series, unit

    def compose(self) -> ComposeResult:
        yield Label(self.label, classes="rate-label")
        yield Sparkline([], summary_function=max)
        yield Label("", classes="rate-value")

    def show(self, view: View) -> None:
        data = list(view.series.get(self.series, ()))
        spark = self.query_one(Sparkline)
        # left-pad to one sample per cell: the newest sample is always at the right edge, and a short
        # history is not stretched across the whole width
        width = spark.size.width
        spark.data = [0.0] * (width - len(data)) + data if data and len(data) < width else data
        self.query_one(".rate-value", Label).update(panels.rate_value(data, self.unit))

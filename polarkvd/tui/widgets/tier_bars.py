"""One occupancy bar per tier, fitted to the widget's width."""

from __future__ import annotations

from rich.console import RenderableType
from textual.widget import Widget

from polarkvd.tui import panels
from polarkvd.tui.model import View, tiers


class TierBars(Widget):
    DEFAULT_CSS = """
    TierBars { height: auto; }
    """

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self._view: View | None = None

    def show(self, view: View) -> None:
        rows_before = self._rows()
        self._view = view
        self.refresh(layout=self._rows() != rows_before)

    def _rows(self) -> int:
        return len(tiers(self._view.stats)) if self._view and self._view.stats else 1

    def get_content_height(self, container: object, viewport: object, width: int) -> int:
        return self._rows()

    def render(self) -> RenderableType:
        if self._view is None:
            return ""
        return panels.tier_bars(self._view, self.content_size.width)

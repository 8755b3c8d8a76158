"""What every dashboard screen shares: the status line, the disconnected banner, view dispatch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual.screen import Screen
from textual.widgets import Label

from polarkvd.tui import panels
from polarkvd.tui.model import View
from polarkvd.tui.widgets import Panel, RateLine, StatusLine, TierBars

if TYPE_CHECKING:
    from polarkvd.tui.app import PolarKVApp
    from polarkvd.tui.messages import ActionDone


class DashboardScreen(Screen[None]):
    """A screen that renders the app's latest view. Subclasses add `refresh_view` for their tables."""

    TITLE = ""

    @property
    def dash(self) -> PolarKVApp:
        return self.app  # type: ignore[return-value]

    def header(self) -> Any:
        yield StatusLine(self.TITLE)
        yield Panel(panels.disconnected_banner, id="banner")

    def on_screen_resume(self) -> None:
        self.show_view(self.dash.view)

    def show_view(self, view: View) -> None:
        if not self.is_mounted:
            return
        for widget in self.query("StatusLine, Panel, TierBars, RateLine"):
            if isinstance(widget, (Panel, TierBars, RateLine)):
                widget.show(view)
        self.query_one("#banner").display = not view.connected and bool(view.error or view.updated)
        self.set_class(not view.connected, "-disconnected")
        self.refresh_view(view)

    def refresh_view(self, view: View) -> None:
        """Screen-specific rendering (tables, fields)."""

    def action_done(self, message: ActionDone) -> bool:
        """Show the outcome of a control action in this screen's message line; False if it has none."""
        shown = False
        for label in self.query("#message").results(Label):
            label.update(message.text)
            label.set_class(message.error, "-error")
            shown = True
        return shown

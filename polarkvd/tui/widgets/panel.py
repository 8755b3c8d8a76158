"""A widget that renders one pure panel function over the latest view."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import RenderableType
from textual.widget import Widget

from polarkvd.tui.model import View


class Panel(Widget):
    """Shows `render_fn(view)`; `show(view)` swaps the view and repaints."""

    DEFAULT_CSS = """
    Panel { height: auto; }
    """

    def __init__(self, render_fn: Callable[[View], RenderableType], **kw: Any) -> None:
        super().__init__(**kw)
        self._render_fn = render_fn
        self._view: View | None = None

    def show(self, view: View) -> None:
        self._view = view
        self.refresh(layout=True)

    def render(self) -> RenderableType:
        if self._view is None:
            return ""
        return self._render_fn(self._view)


class StatusLine(Panel):
    """The first line of a screen: title, connection state, uptime, time of the last poll."""

    DEFAULT_CSS = """
    StatusLine { height: 1; background: $panel; }
    """

    def __init__(self, title: str, **kw: Any) -> None:
        from polarkvd.tui.panels import status_line

        super().__init__(lambda v: status_line(v, title), **kw)

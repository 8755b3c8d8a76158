"""Helpers for dashboard tests: the screen as text (what tmux would show), waiting on the app."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("textual", reason="the dashboard needs polarkvd[tui]")

from rich.console import Console  # noqa: E402
from textual.app import App  # noqa: E402


def screen_text(app: App[Any]) -> str:
    """The current screen as plain text, cell for cell."""
    width, height = app.size
    console = Console(
        width=width, height=height, file=io.StringIO(), force_terminal=True, color_system="truecolor",
        record=True, legacy_windows=False, safe_box=False,
    )  # fmt: skip
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


async def until(
    pilot: Any, predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition"
) -> Any:
    """Let the app run until `predicate()` is truthy (it watches the app or another process)."""
    deadline = time.monotonic() + timeout
    while True:
        await pilot.pause()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{screen_text(pilot.app)}")
        await asyncio.sleep(0.05)


def showing(keys: str, view: Any):  # type: ignore[no-untyped-def]
    """A snapshot's `run_before`: press `keys` (a screen), then show `view` twice (panels sized by
    the first render draw at their width with the second)."""

    async def run_before(pilot) -> None:  # type: ignore[no-untyped-def]
        for key in keys.split():
            await pilot.press(key)
        pilot.app.show_view(view)
        await pilot.pause()
        pilot.app.show_view(view)  # rows mounted by the first view render with the second
        await pilot.pause()

    return run_before

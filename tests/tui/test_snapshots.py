"""Snapshot tests: every screen, from a recorded daemon state, at 80x24 and 132x40, frozen clock.

The panels are pure functions of the view, so a recorded `stats`/`knobs`/`top` fixes every cell.
Update after a deliberate change with `pytest tests/tui --snapshot-update` and look at the SVGs.
"""

from __future__ import annotations

import time

import pytest

from polarkvd.tui.app import PolarKVApp
from tests.tui.conftest import showing
from tests.tui.recorded import DISCONNECTED, SOCKET, UPDATED, VIEW

SIZES = [(80, 24), (132, 40)]


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _app() -> PolarKVApp:
    app = PolarKVApp(SOCKET, connect=False, clock=lambda: UPDATED)
    app.start_knobs = {**VIEW.knobs, "dram.policy": "lru"}  # so the tuning screen shows one change
    return app


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    "screen, keys",
    [("overview", ""), ("tuning", "2"), ("pages", "3"), ("peers", "4"), ("help", "question_mark")],
)
def test_screen(snap_compare, screen: str, keys: str, size: tuple[int, int]) -> None:
    assert snap_compare(_app(), terminal_size=size, run_before=showing(keys, VIEW))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_disconnected(snap_compare, size: tuple[int, int]) -> None:
    assert snap_compare(_app(), terminal_size=size, run_before=showing("", DISCONNECTED))


def test_pages_sorted_by_hits(snap_compare) -> None:
    assert snap_compare(_app(), terminal_size=(80, 24), run_before=showing("3 s", VIEW))

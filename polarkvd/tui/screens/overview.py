"""Overview: tier occupancy, hit rates, rate sparklines, prefill time saved, attached engines."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Footer, Label

from polarkvd.tui import panels
from polarkvd.tui.screens.base import DashboardScreen
from polarkvd.tui.widgets import Panel, RateLine, TierBars


class OverviewScreen(DashboardScreen):
    TITLE = "polarkvd · overview"

    def compose(self) -> ComposeResult:
        yield from self.header()
        with VerticalScroll(id="body"):
            yield Label("Tiers", classes="section")
            yield TierBars()
            yield Panel(panels.hit_rates, id="hits")
            yield Label("Rates (last 5 minutes)", classes="section")
            yield RateLine("lookups/s", "lookups")
            yield RateLine("hit pages/s", "hit_pages")
            yield RateLine("stored", "stored_bytes", "B")
            yield RateLine("loaded", "loaded_bytes", "B")
            yield Panel(lambda v: panels.prefill_saved(v, self.dash.prefill_ms_per_token), id="prefill")
            yield Label("Engines", classes="section")
            yield Panel(panels.sessions_table, id="sessions")
        yield Footer(compact=True)

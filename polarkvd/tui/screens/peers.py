"""Peers: cluster members. A placeholder until the cluster exists."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.widgets import Footer

from polarkvd.tui import panels
from polarkvd.tui.screens.base import DashboardScreen
from polarkvd.tui.widgets import Panel


class PeersScreen(DashboardScreen):
    TITLE = "polarkvd · peers"

    def compose(self) -> ComposeResult:
        yield from self.header()
        yield Panel(panels.peers_placeholder, id="peers")
        yield Footer(compact=True)

"""Peers: the cluster as this daemon sees it. Members and their state, the traffic, the lent pool.

Renders the `cluster` reply the poller fetches every few seconds (`View.cluster`) and the cluster
counters of `stats`. A single-host daemon (or one from before the cluster existed) gets a panel
that says so and how to join one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import RenderableType
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Footer, Label

from polarkvd.tui import panels
from polarkvd.tui.model import View
from polarkvd.tui.screens.base import DashboardScreen
from polarkvd.tui.widgets import Panel


class SizedPanel(Panel):
    """A panel whose render function also gets the width it has (tables that change shape)."""

    def __init__(self, render_fn: Callable[[View, int], RenderableType], **kw: Any) -> None:
        super().__init__(lambda v: render_fn(v, self.content_size.width or self.size.width), **kw)


class PeersScreen(DashboardScreen):
    TITLE = "polarkvd · peers"
    DEFAULT_CSS = """
    PeersScreen #standalone { padding: 1 2; height: 1fr; }
    PeersScreen #cluster { height: 1fr; }
    PeersScreen #cluster-header, PeersScreen #members, PeersScreen #traffic, PeersScreen #pool,
    PeersScreen #internals {
        padding: 0 1;
    }
    PeersScreen #cluster-header, PeersScreen #members-caption, PeersScreen #pool, PeersScreen #internals {
        text-wrap: nowrap;
        text-overflow: ellipsis;
    }
    PeersScreen.-disconnected #cluster { opacity: 60%; }
    """

    def compose(self) -> ComposeResult:
        yield from self.header()
        yield Panel(panels.peers_standalone, id="standalone")
        with VerticalScroll(id="cluster"):
            yield Panel(panels.cluster_header, id="cluster-header")
            yield Panel(panels.members_caption, id="members-caption", classes="section")
            yield SizedPanel(panels.members_table, id="members")
            yield Label("Cluster traffic  (since the daemon started)", classes="section")
            yield SizedPanel(panels.traffic_table, id="traffic")
            yield Panel(panels.lent_pool, id="pool")
            yield Label("Gossip, peer service (requests from peers), meta map", classes="section")
            yield Panel(panels.cluster_internals, id="internals")
        yield Footer(compact=True)

    def refresh_view(self, view: View) -> None:
        clustered = panels.in_cluster(view)
        self.query_one("#standalone").display = not clustered
        self.query_one("#cluster").display = clustered

"""The dashboard's screens: overview, tuning, pages, peers (modes) and help (modal)."""

from polarkvd.tui.screens.help import HelpScreen
from polarkvd.tui.screens.overview import OverviewScreen
from polarkvd.tui.screens.pages import PagesScreen
from polarkvd.tui.screens.peers import PeersScreen
from polarkvd.tui.screens.tuning import TuningScreen

__all__ = ["HelpScreen", "OverviewScreen", "PagesScreen", "PeersScreen", "TuningScreen"]

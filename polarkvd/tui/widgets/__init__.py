"""Widgets of the dashboard: thin shells that hold the latest `View` and render it through panels."""

from polarkvd.tui.widgets.panel import Panel, StatusLine
from polarkvd.tui.widgets.rate import RateLine
from polarkvd.tui.widgets.tier_bars import TierBars

__all__ = ["Panel", "RateLine", "StatusLine", "TierBars"]

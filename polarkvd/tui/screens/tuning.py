"""Tuning: the daemon's live knobs, with the tier bars above them so the effect shows.

One row per knob the daemon reports as live (whatever its version has). Choices are Selects and
apply at once; typed values apply on Enter after the same check the daemon makes (config parsers
plus the watermark pair rule): a bad value gets a message and is never sent.
"""

from __future__ import annotations

from typing import Any

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Button, Footer, Input, Label, Select

from polarkvd.config import LOG_LEVELS, POLICY_NAMES, option_fields
from polarkvd.tui import panels
from polarkvd.tui.model import View, changed_knobs, check_knob, knob_text
from polarkvd.tui.screens.base import DashboardScreen
from polarkvd.tui.widgets import Panel, TierBars

SECTION_TITLES = {"dram": "L2 DRAM", "disk": "L4 disk", "daemon": "daemon"}
SECTION_ORDER = ("vram", "dram", "dmp", "disk", "daemon")


def _choices(name: str) -> list[tuple[str, Any]] | None:
    if name.endswith(".policy"):
        return [(p, p) for p in POLICY_NAMES]
    if name == "daemon.log_level":
        return [(lvl, lvl) for lvl in LOG_LEVELS]
    if name == "disk.write_through":
        return [("write-back", False), ("write-through", True)]
    return None


def _wid(name: str) -> str:
    return "knob-" + name.replace(".", "-")


class KnobRow(Horizontal):
    """Label, the field, and a note: one live knob."""

    def __init__(self, name: str, value: Any) -> None:
        super().__init__(classes="knob")
        self.knob = name
        self.value = value

    def compose(self) -> ComposeResult:
        field = option_fields().get(self.knob)  # label and note: declared with the option
        knob = field.metadata["knob"] if field is not None else None
        # a daemon of another version may have a knob this one does not know: its name, no note
        yield Label(knob.label if knob else self.knob, classes="knob-label")
        choices = _choices(self.knob)
        if choices is not None:
            yield Select(choices, value=self.value, allow_blank=False, compact=True, id=_wid(self.knob))
        else:
            yield Input(knob_text(self.value), compact=True, id=_wid(self.knob))
        yield Label(knob.note if knob else "", classes="knob-note")


class TuningScreen(DashboardScreen):
    TITLE = "polarkvd · tuning"
    BINDINGS = [
        Binding("s", "app.save_tuning", "Save"),
        Binding("r", "app.revert_tuning", "Revert"),
        Binding("escape", "reset_field", "Reset field", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._knob_names: tuple[str, ...] = ()
        self._dirty: set[str] = set()  # fields typed into and not yet applied

    def compose(self) -> ComposeResult:
        yield from self.header()
        yield Label("Tiers  (│ high watermark, ╎ low)", classes="section")
        yield TierBars()
        yield Panel(panels.tier_summary, id="summary")
        yield VerticalScroll(id="knobs")
        yield Label("", id="message")
        with Horizontal(id="buttons"):
            yield Button("Save to overlay", id="save", compact=True)
            yield Button("Revert", id="revert", compact=True)
            yield Label("", id="changed")
        yield Label("", id="overlay")
        yield Footer(compact=True)

    # ---------------------------------------------------------------- rendering

    def refresh_view(self, view: View) -> None:
        knobs = view.knobs
        if knobs is None:
            return
        names = tuple(knobs)
        if names != self._knob_names:
            self._knob_names = names
            self._build_rows(knobs)
        for name, value in knobs.items():
            self._show_value(name, value)
        changed = changed_knobs(self.dash.start_knobs, knobs)
        text = f"changed here: {', '.join(changed)}" if changed else "no knob changed here yet"
        self.query_one("#changed", Label).update(text)
        path = (view.stats or {}).get("tuning_file", "")
        if path:
            self.query_one("#overlay", Label).update(f"overlay: {path} (read by serve at start)")

    def _build_rows(self, knobs: dict[str, Any] | Any) -> None:
        box = self.query_one("#knobs", VerticalScroll)
        box.remove_children()
        rows: list[Any] = []
        section = None
        order = {sec: i for i, sec in enumerate(SECTION_ORDER)}
        names = sorted(knobs, key=lambda n: order.get(n.split(".", 1)[0], len(order)))  # stable
        for name in names:
            value = knobs[name]
            sec = name.split(".", 1)[0]
            if sec != section:
                section = sec
                rows.append(Label(SECTION_TITLES.get(sec, sec), classes="section"))
            rows.append(KnobRow(name, value))
        box.mount_all(rows)

    def _show_value(self, name: str, value: Any) -> None:
        """Show the daemon's value, unless the operator is typing in that field."""
        if name in self._dirty:
            return
        for widget in self.query(f"#{_wid(name)}"):
            if isinstance(widget, Select) and widget.value != value:
                with widget.prevent(Select.Changed):
                    widget.value = value
            elif isinstance(widget, Input) and widget.value != knob_text(value):
                with widget.prevent(Input.Changed):
                    widget.value = knob_text(value)
                widget.remove_class("-invalid")

    def _knob_of(self, widget: Any) -> str | None:
        row = widget.parent
        return row.knob if isinstance(row, KnobRow) else None

    def _say(self, text: str, error: bool = False) -> None:
        label = self.query_one("#message", Label)
        label.update(text)
        label.set_class(error, "-error")

    # ---------------------------------------------------------------- changes

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        name = self._knob_of(event.select)
        knobs = self.dash.view.knobs or {}
        if name is None or event.value == knobs.get(name):
            return
        self.apply(name, event.value)

    @on(Input.Changed)
    def _typed(self, event: Input.Changed) -> None:
        name = self._knob_of(event.input)
        if name is not None:
            self._dirty.add(name)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        name = self._knob_of(event.input)
        if name is not None and self.apply(name, event.value):
            event.input.remove_class("-invalid")
            self.set_focus(None)  # applied: leave the field, so 1-4, s, r and ? work again

    def apply(self, name: str, text: Any) -> bool:
        """Check a value and send it; False (with a message, nothing sent) when it is refused."""
        knobs = self.dash.view.knobs or {}
        try:
            value = check_knob(name, text, knobs)
        except ValueError as e:
            for widget in self.query(f"#{_wid(name)}"):
                widget.add_class("-invalid")
            self._say(f"refused, not sent: {e}", error=True)
            self.app.bell()
            return False
        self._dirty.discard(name)
        self._say(f"applying {name} = {knob_text(value)} …")
        self.dash.set_knobs({name: value})
        return True

    def action_reset_field(self) -> None:
        focused = self.focused
        name = self._knob_of(focused) if focused is not None else None
        if name is None:
            return
        self._dirty.discard(name)
        self._show_value(name, (self.dash.view.knobs or {}).get(name))
        self._say(f"{name}: back to the daemon's value")
        self.set_focus(None)  # and out of the field: keys are commands again

    @on(Button.Pressed, "#save")
    def _save(self) -> None:
        self.dash.action_save_tuning()

    @on(Button.Pressed, "#revert")
    def _revert(self) -> None:
        self.dash.action_revert_tuning()

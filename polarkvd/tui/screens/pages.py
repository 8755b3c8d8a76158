"""Pages: the largest namespaces, tenants against their quotas, and the prefixes in DRAM by bytes or
hits; pin, unpin, evict."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Footer, Label

from polarkvd.client import ControlClient
from polarkvd.tui import panels
from polarkvd.tui.model import View
from polarkvd.tui.screens.base import DashboardScreen
from polarkvd.tui.widgets import Panel


def _fill(table: DataTable[str], rows: list[tuple[str, tuple[str, ...]]]) -> None:
    """Replace the rows, keeping the cursor on the same key where it still exists."""
    keep = _cursor_key(table)
    table.clear()
    for key, cells in rows:
        table.add_row(*cells, key=key)
    keys = [k for k, _ in rows]
    if keep in keys:
        table.move_cursor(row=keys.index(keep), animate=False)


def _cursor_key(table: DataTable[str]) -> str | None:
    if not table.row_count:
        return None
    return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value


class PagesScreen(DashboardScreen):
    TITLE = "polarkvd · pages"
    BINDINGS = [
        Binding("p", "pin", "Pin"),
        Binding("u", "unpin", "Unpin"),
        Binding("e", "evict", "Evict"),
        Binding("s", "sort", "Sort"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.sort = "bytes"
        self._rows: tuple[list, list] | None = None

    def compose(self) -> ComposeResult:
        yield from self.header()
        yield Label("Namespaces  (largest first)", classes="section")
        yield DataTable(id="namespaces", cursor_type="row", zebra_stripes=True)
        yield Panel(lambda v: panels.tenants_panel(v.stats), id="tenants")
        yield Panel(lambda v: panels.pages_caption(v.top, self.sort), id="caption", classes="section")
        yield DataTable(id="prefixes", cursor_type="row", zebra_stripes=True)
        yield Label("", id="message")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#namespaces", DataTable).add_columns(*panels.NAMESPACE_COLUMNS)
        self.query_one("#prefixes", DataTable).add_columns(*panels.PREFIX_COLUMNS)
        self.query_one("#prefixes", DataTable).focus()

    def on_screen_resume(self) -> None:
        self.dash.want_top = True
        self.dash.wake(top=True)
        super().on_screen_resume()

    def on_screen_suspend(self) -> None:
        self.dash.want_top = False

    def refresh_view(self, view: View) -> None:
        rows = (panels.namespace_rows(view.top), panels.prefix_rows(view.top, self.sort))
        if rows == self._rows:
            return
        self._rows = rows
        _fill(self.query_one("#namespaces", DataTable), rows[0])
        _fill(self.query_one("#prefixes", DataTable), rows[1])

    # ---------------------------------------------------------------- actions on the selected prefix

    def _selected(self) -> bytes | None:
        key = _cursor_key(self.query_one("#prefixes", DataTable))
        if key is None:
            self.notify("No prefix selected (the table is empty).", severity="warning")
            return None
        return bytes.fromhex(key)

    def action_pin(self) -> None:
        key = self._selected()
        if key is not None:

            def pin(c: ControlClient) -> str:
                r = c.pin([key])
                return f"pinned {r['pinned_pages']} pages of prefix {key.hex()[:12]}…"

            self.dash.control("pin", pin)

    def action_unpin(self) -> None:
        key = self._selected()
        if key is not None:
            self.dash.control(
                "unpin", lambda c: f"unpinned {c.unpin([key])} pages of prefix {key.hex()[:12]}…"
            )

    def action_evict(self) -> None:
        key = self._selected()
        if key is not None:

            def evict(c: ControlClient) -> str:
                r = c.evict_keys([key])
                kept = f", {r['kept_pages']} pinned pages kept" if r["kept_pages"] else ""
                return f"evicted {r['evicted_pages']} pages of prefix {key.hex()[:12]}… to disk{kept}"

            self.dash.control("evict", evict)

    def action_sort(self) -> None:
        self.sort = "hits" if self.sort == "bytes" else "bytes"
        self._rows = None
        self.show_view(self.dash.view)

"""Help: every key, and what each screen is for."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# polarkvd dashboard

Attached to a running daemon's control socket; it never starts one. When the daemon is gone the
screens say so, keep the last numbers, and reconnect by themselves.

- `1` overview, `2` tuning, `3` pages, `4` peers; `q` quits
- `ctrl+p` command palette: screens, save, revert, policies, evict
- `?` this help (`escape` closes it); the mouse works everywhere

**Overview**: one bar per tier (used / capacity, pages; `│` high and `╎` low watermark), hit
rates (lifetime and last minute), rates over the last 5 minutes, the estimated prefill time saved
(tokens loaded from the cache × `--prefill-ms-per-token`), and the attached engines.

**Tuning**: every live knob of the daemon. Selects change at once (arrows or mouse); typed values
are checked first (a bad value is refused here and never sent), then `enter` applies them and
leaves the field; `escape` puts a field back and leaves it. `s` saves the knobs changed since the dashboard started to the daemon's tuning overlay
(read by `polarkvd serve` after its config file); `r` reverts them live.

**Pages**: the largest namespaces, tenants (cache_salts) against their quotas, and prefixes in DRAM
by bytes or hits. On the selected prefix:
`p` pin (never evicted), `u` unpin, `e` evict from DRAM (to disk); `s` sorts by bytes or hits.

**Peers**: the cluster as this daemon sees it: every member (`*` this one) with its state (alive,
suspect, dead, left), incarnation, time in that state, endpoints, DRAM used and free pool space;
pages found on peers, fetched, served and demoted to the pool, with rates; the DRAM this host lends.
A daemon without `[cluster] enabled = true` gets a panel that says how to join one.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Close"),
        Binding("question_mark", "app.pop_screen", "Close", show=False),
        Binding("q", "app.pop_screen", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(HELP)

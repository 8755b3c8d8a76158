"""The dashboard app: screens as modes, one polling worker, one worker that runs control actions.

All socket I/O happens in two thread workers, never in a handler:
- `poll_daemon` polls `stats` + `get_knobs` (+ `top` while the pages screen is shown) every
  `interval` seconds, `cluster` every CLUSTER_SECONDS, and posts a `SnapshotReady` view (coalescing);
  when the daemon is gone it posts a disconnected view and retries with exponential backoff (0.5 s
  doubling to 5 s) until it is back.
- `_run_actions` runs the operator's control calls (set knobs, save, pin, evict, ...) one at a time,
  in order, and posts an `ActionDone`; then it wakes the poller so the effect shows at once.
Screens render the latest view through pure panel functions (panels.py).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.theme import Theme
from textual.worker import get_current_worker

from polarkvd.client import ControlClient
from polarkvd.config import POLICY_NAMES
from polarkvd.config.machine import default_control_socket
from polarkvd.errors import DaemonUnavailable, ErrorCode, PolarKVError
from polarkvd.tui.messages import ActionDone, SnapshotReady
from polarkvd.tui.model import NO_CLUSTER_OP, RateHistory, View, changed_knobs, knob_text
from polarkvd.tui.screens import HelpScreen, OverviewScreen, PagesScreen, PeersScreen, TuningScreen

BACKOFF_MIN, BACKOFF_MAX = 0.5, 5.0
TOP_LIMIT = 50
# `top` walks every DRAM page on the daemon's loop: ask at most this often (and right after an action)
TOP_SECONDS = 3.0
# membership changes in seconds, not in milliseconds: the cluster report is asked for at most this often
CLUSTER_SECONDS = 2.0

THEME = Theme(
    name="polarkv",
    primary="#4fb3c8",
    secondary="#8c7ae6",
    accent="#f0a030",
    foreground="#dde3ea",
    background="#0f1419",
    surface="#161c23",
    panel="#1e2731",
    success="#5fbf77",
    warning="#e6b450",
    error="#f07178",
    dark=True,
)

Action = Callable[[ControlClient], str]


class PolarKVApp(App[None]):
    """`polarkvd tui`: attach to a daemon's control socket and show what it does."""

    CSS_PATH = "polarkv.tcss"
    TITLE = "polarkvd"
    MODES = {
        "overview": OverviewScreen,
        "tuning": TuningScreen,
        "pages": PagesScreen,
        "peers": PeersScreen,
    }
    DEFAULT_MODE = "overview"
    BINDINGS = [
        Binding("1", "switch_mode('overview')", "Overview"),
        Binding("2", "switch_mode('tuning')", "Tuning"),
        Binding("3", "switch_mode('pages')", "Pages"),
        Binding("4", "switch_mode('peers')", "Peers"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        socket_path: str | Path | None = None,
        *,
        interval: float = 1.0,
        prefill_ms_per_token: float = 0.5,
        connect: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.socket_path = str(socket_path or default_control_socket())
        self.interval = interval
        self.prefill_ms_per_token = prefill_ms_per_token
        self.clock = clock
        self._connect = connect
        self.view = View(socket=self.socket_path)
        self.start_knobs: dict[str, Any] | None = None  # live knobs when the dashboard first connected
        self.want_top = False  # the pages screen is shown: poll `top` too
        self._top_now = threading.Event()  # an action changed pages, or the pages screen just opened
        self._wake = threading.Event()
        self._closing = False
        self._actions: queue.Queue[tuple[str, Action] | None] = queue.Queue()

    # ---------------------------------------------------------------- life cycle

    def on_mount(self) -> None:
        self.register_theme(THEME)
        self.theme = "polarkv"
        if self._connect:
            self.poll_daemon()
            self._run_actions()

    def on_unmount(self) -> None:
        self._closing = True
        self._actions.put(None)
        self._wake.set()

    def wake(self, top: bool = False) -> None:
        """Poll now instead of at the next interval (with `top`: refresh the pages tables too)."""
        if top:
            self._top_now.set()
        self._wake.set()

    # ---------------------------------------------------------------- workers (all the I/O)

    @work(thread=True, exclusive=True, group="poll", exit_on_error=False)
    def poll_daemon(self) -> None:
        worker = get_current_worker()
        history = RateHistory()
        client: ControlClient | None = None
        backoff = BACKOFF_MIN
        last = self.view
        top_at = 0.0
        cluster_at = 0.0
        while not (worker.is_cancelled or self._closing):
            try:
                if client is None:
                    client = ControlClient(self.socket_path, timeout=10)
                    cluster_at = 0.0  # maybe another daemon now: ask about its cluster at once
                stats = client.stats()
                knobs = client.knobs()
                top = last.top
                if self.want_top and (self._top_now.is_set() or time.monotonic() - top_at >= TOP_SECONDS):
                    self._top_now.clear()
                    top, top_at = client.top(TOP_LIMIT), time.monotonic()
                cluster = last.cluster
                due = time.monotonic() - cluster_at >= CLUSTER_SECONDS and cluster is not NO_CLUSTER_OP
                if not cluster_at or due:
                    cluster, cluster_at = self._poll_cluster(client, cluster), time.monotonic()
                history.add(time.monotonic(), stats.get("counters", {}))
                last = View(
                    socket=self.socket_path,
                    connected=True,
                    stats=stats,
                    knobs=knobs,
                    top=top,
                    cluster=cluster,
                    series=history.series(),
                    updated=self.clock(),
                )
                backoff = BACKOFF_MIN
                wait = self.interval
            except DaemonUnavailable as e:
                if client is not None:
                    client.close()
                    client = None
                history.reset()
                last = dataclasses.replace(last, connected=False, error=str(e), retry_in=backoff)
                wait, backoff = backoff, min(backoff * 2, BACKOFF_MAX)
            except PolarKVError as e:  # the daemon answered, but refused: show it, keep polling
                last = dataclasses.replace(last, error=str(e))
                wait = self.interval
            self.post_message(SnapshotReady(last))
            self._wake.wait(wait)
            self._wake.clear()
        if client is not None:
            client.close()

    @staticmethod
    def _poll_cluster(client: ControlClient, last: Any) -> Any:
        """The `cluster` reply; NO_CLUSTER_OP (and no more asking) from a daemon that predates the op.

        Any other refusal keeps the last report: the rest of the dashboard must not stall on it."""
        try:
            return client.cluster()
        except DaemonUnavailable:
            raise
        except PolarKVError as e:
            return NO_CLUSTER_OP if e.code is ErrorCode.UNKNOWN_OP else last

    @work(thread=True, exclusive=True, group="actions", exit_on_error=False)
    def _run_actions(self) -> None:
        while True:
            item = self._actions.get()
            if item is None or self._closing:
                return
            what, call = item
            try:
                with ControlClient(self.socket_path, timeout=60) as c:
                    self.post_message(ActionDone(call(c)))
            except DaemonUnavailable as e:
                self.post_message(ActionDone(f"{what}: the daemon is not reachable ({e})", error=True))
            except PolarKVError as e:
                self.post_message(ActionDone(f"{what}: refused by the daemon: {e}", error=True))
            self._top_now.set()
            self._wake.set()

    def control(self, what: str, call: Action) -> None:
        """Run `call(client)` in the action worker; its return value is shown to the operator."""
        self._actions.put((what, call))

    # ---------------------------------------------------------------- messages

    def on_snapshot_ready(self, message: SnapshotReady) -> None:
        self.show_view(message.view)

    def show_view(self, view: View) -> None:
        """Make `view` current and render it (also how tests feed recorded snapshots)."""
        if view.connected and view.knobs is not None and self.start_knobs is None:
            self.start_knobs = dict(view.knobs)
        self.view = view
        for screen in self.screen_stack:
            show = getattr(screen, "show_view", None)
            if show is not None:
                show(view)

    def on_action_done(self, message: ActionDone) -> None:
        report = getattr(self.screen, "action_done", None)
        if report is None or not report(message):  # screens with a message line show it there
            self.notify(message.text, severity="error" if message.error else "information", timeout=6)

    # ---------------------------------------------------------------- actions shared by screens

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def set_knobs(self, knobs: dict[str, Any]) -> None:
        shown = ", ".join(f"{k} = {knob_text(v)}" for k, v in knobs.items())

        def apply(c: ControlClient) -> str:
            c.set_knobs(knobs)
            return f"applied {shown}"

        self.control(f"set {shown}", apply)

    def action_save_tuning(self, everything: bool = False) -> None:
        knobs = self.view.knobs or {}
        names = list(knobs) if everything else list(changed_knobs(self.start_knobs, knobs))
        if not names:
            self.notify("Nothing changed since the dashboard started: nothing to save.", timeout=6)
            return

        def save(c: ControlClient) -> str:
            r = c.save_tuning(names)
            return f"saved {', '.join(names)} to {r['path']} (read by `polarkvd serve` after its config)"

        self.control("save tuning", save)

    def action_revert_tuning(self) -> None:
        back = changed_knobs(self.start_knobs, self.view.knobs)
        if not back:
            self.notify("The live knobs are as they were when the dashboard started.", timeout=6)
            return
        shown = ", ".join(f"{k} = {knob_text(v)}" for k, v in back.items())

        def revert(c: ControlClient) -> str:
            c.set_knobs(back)
            return f"reverted {shown}"

        self.control("revert", revert)

    def action_evict_fraction(self, tier: str, fraction: float) -> None:
        tiers = (self.view.stats or {}).get("tiers", {})
        if tier not in tiers:
            self.notify(f"no {tier} tier", severity="error")
            return
        nbytes = int(tiers[tier]["capacity_bytes"] * fraction)
        self.control(f"evict {tier}", lambda c: f"evicted {c.evict(tier, nbytes):,} bytes from {tier}")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for mode, text in (
            ("overview", "tiers, hit rates, rates, engines"),
            ("tuning", "eviction policies, watermarks, admission, write mode"),
            ("pages", "largest namespaces and prefixes; pin, unpin, evict"),
            ("peers", "cluster members, their state and the traffic between them"),
        ):
            yield SystemCommand(f"Show {mode}", text, lambda m=mode: self.switch_mode(m))
        yield SystemCommand(
            "Save changed knobs", "write knobs changed here to the tuning overlay", self.action_save_tuning
        )
        yield SystemCommand(
            "Save all live knobs",
            "write every live knob to the tuning overlay",
            lambda: self.action_save_tuning(True),
        )
        yield SystemCommand(
            "Revert knobs",
            "set every knob back to its value when the dashboard started",
            self.action_revert_tuning,
        )
        for tier in ("dram", "disk"):
            for policy in POLICY_NAMES:
                yield SystemCommand(f"Set {tier} policy to {policy}", f"{tier}.policy = {policy}, live", lambda t=tier, p=policy: self.set_knobs({f"{t}.policy": p}))  # fmt: skip
        if "vram" in (self.view.stats or {}).get("tiers", {}):
            yield SystemCommand("Move 10% of L1 to DRAM", "demote the coldest tenth of the GPU tier to DRAM now", lambda: self.action_evict_fraction("vram", 0.1))  # fmt: skip
        yield SystemCommand("Evict 10% of DRAM", "demote the coldest tenth of DRAM to disk now", lambda: self.action_evict_fraction("dram", 0.1))  # fmt: skip
        yield SystemCommand("Reconnect now", "poll the daemon now instead of waiting", self.wake)


def run(socket_path: str | None, interval: float, prefill_ms_per_token: float) -> int:
    PolarKVApp(socket_path, interval=interval, prefill_ms_per_token=prefill_ms_per_token).run()
    return 0

"""Messages from the I/O workers to the app: small dataclasses, the high-rate one coalescing."""

from __future__ import annotations

from textual.message import Message

from polarkvd.tui.model import View


class SnapshotReady(Message):
    """A new view of the daemon (connected or not). A newer one replaces any still queued: a slow
    terminal skips frames instead of falling behind."""

    def __init__(self, view: View) -> None:
        super().__init__()
        self.view = view

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SnapshotReady)


class ActionDone(Message):
    """A control action (set knobs, save, pin, evict, ...) finished, with what to tell the operator."""

    def __init__(self, text: str, *, error: bool = False, knobs: dict | None = None) -> None:
        super().__init__()
        self.text = text
        self.error = error
        self.knobs = knobs

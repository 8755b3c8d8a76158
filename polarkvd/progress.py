"""Progress of long work on stderr: a live `rich.progress` bar on a terminal, plain lines elsewhere.

The benchmarks, `polarkvd drain` and the model converter report where they are through `Progress`.
On a terminal (the stream is a TTY, `TERM` is not `dumb`) and with `rich` installed, one live bar
shows the current step, how many are done and the time so far, and finished steps are printed above
it; anything else (a pipe, a file, CI, a test capturing stderr, no `rich`) gets one plain line per
step, the same lines the commands printed before:

    [3/10    1.2s] store 5 x 32 pages of 5.9 MB (8 per call) ...       step()    (what starts)
    [7/42   35.1s] local trial 0, pipelining on: TTFT 212 ms ...       report()  (what just happened)

`POLARKV_PROGRESS=plain` forces plain lines on a terminal too. stdout is never written: it stays
clean for `--json`.

A leaf module: it imports nothing else of the package (`rich` only inside `Progress`).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "live_terminal"]


def live_terminal(stream: TextIO) -> bool:
    """Whether a live bar can be drawn on `stream`: a terminal, not TERM=dumb, not forced plain,
    and `rich` importable."""
    if os.environ.get("POLARKV_PROGRESS", "").lower() == "plain" or os.environ.get("TERM") == "dumb":
        return False
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
    try:
        import rich.progress  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """Steps of long work. `total`: how many steps (None: not known, the bar only spins); `label`:
    a name in front of plain lines (`[label 1/5 0.3s] ...`); `quiet`: print nothing; `live`: force
    the bar on (True) or off (False) instead of asking `live_terminal(stream)`; `unit`: what the
    steps count, shown after the numbers (`update()` with pages, bytes ...).

    Use it as a context manager, or call `close()`: the bar is removed and the last step's line is
    left behind.
    """

    def __init__(
        self,
        total: int | None,
        *,
        label: str = "",
        stream: TextIO | None = None,
        quiet: bool = False,
        live: bool | None = None,
        unit: str = "",
        plain_interval: float = 5.0,
    ) -> None:
        self.total, self.done, self.quiet, self.label, self.unit = total, 0, quiet, label, unit
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self.plain_interval = plain_interval
        self._current: str | None = None  # the step under way (step()), shown when the next starts
        self._current_t = self.t0
        self._last_plain = float("-inf")
        self._bar: Any = None
        self._task: Any = None
        self._console: Any = None
        if quiet:
            return
        if live if live is not None else live_terminal(self.stream):
            self._start_bar()

    # ----------------------------------------------------------------------------- the public calls

    @property
    def live(self) -> bool:
        """True while a live bar is drawn (False: plain lines, or quiet)."""
        return self._bar is not None

    def step(self, what: str) -> None:
        """A step starts: `what` is what it does (plain: `[k/N  t s] what ...`)."""
        self.done += 1
        if self.quiet:
            return
        if self._bar is None:
            self._plain(f"{what} ...", width=6)
            return
        self._finish_current()
        self._current, self._current_t = what, time.perf_counter()
        # the bar counts finished steps: the one starting now is not done yet
        self._bar.update(self._task, completed=self.done - 1, description=what)

    def report(self, what: str) -> None:
        """A step is done: `what` says how it went (plain: `[k/N  t s] what`); kept above the bar."""
        self.done += 1
        if self.quiet:
            return
        if self._bar is None:
            self._plain(what, width=7)
            return
        self._print(f"[dim]{self._stamp(7)}[/dim] {_escape(what)}")
        self._bar.update(self._task, completed=self.done)  # the line above says what it was

    def note(self, text: str) -> None:
        """A line that is no step (a warning, a reason): printed as is, above the bar."""
        if self.quiet:
            return
        if self._bar is None:
            print(text, file=self.stream, flush=True)
        else:
            self._print(_escape(text))

    def update(
        self, completed: float | None = None, *, total: float | None = None, what: str | None = None
    ) -> None:
        """Progress within one long step (pages written, bytes moved): the bar moves at once; plain
        output prints a line at most every `plain_interval` seconds."""
        if total is not None:
            self.total = int(total)
        if self.quiet:
            return
        if self._bar is None:
            now = time.perf_counter()
            if now - self._last_plain >= self.plain_interval:
                self._last_plain = now
                of = f"/{self.total}" if self.total is not None else ""
                n = (
                    f"{completed:.0f}{of}{' ' + self.unit if self.unit else ''}"
                    if completed is not None
                    else ""
                )
                self._plain(f"{what or self._current or ''} {n}".strip(), width=6, count=False)
            return
        kw: dict[str, Any] = {}
        if completed is not None:
            kw["completed"] = completed
        if total is not None:
            kw["total"] = total
        if what is not None:
            kw["description"] = what
        self._bar.update(self._task, **kw)

    def close(self, final: str | None = None) -> None:
        """Stop the bar; `final`: a last line to leave (printed in plain mode too)."""
        if self._bar is not None:
            self._finish_current()
            self._bar.stop()
            self._bar = None
        if final is not None and not self.quiet:
            print(final, file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------- the two outputs

    def _stamp(self, width: int, count: bool = True) -> str:
        elapsed = f"{time.perf_counter() - self.t0:{width}.1f}s"
        n = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        parts = [self.label] if self.label else []
        if count:
            parts.append(n)
        return f"[{' '.join([*parts, elapsed])}]"

    def _plain(self, text: str, width: int, count: bool = True) -> None:
        print(f"{self._stamp(width, count)} {text}", file=self.stream, flush=True)

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._console = Console(file=self.stream, force_terminal=True, highlight=False)
        columns: list[Any] = [SpinnerColumn()]
        if self.label:
            columns.append(TextColumn(f"[bold]{_escape(self.label)}[/bold]"))
        columns += [
            TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            *([TextColumn(_escape(self.unit))] if self.unit else []),
            TimeElapsedColumn(),
        ]
        self._bar = RichProgress(*columns, console=self._console, transient=True, expand=False)
        self._task = self._bar.add_task("", total=self.total)
        self._bar.start()

    def _print(self, markup: str) -> None:
        self._bar.console.print(markup, overflow="fold")

    def _finish_current(self) -> None:
        """step() mode: the step under way is done; leave its line above the bar."""
        if self._current is None:
            return
        took = time.perf_counter() - self._current_t
        self._print(f"[green]✓[/green] {_escape(self._current)} [dim]({took:.1f} s)[/dim]")
        self._current = None
        self._bar.update(self._task, completed=self.done)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)

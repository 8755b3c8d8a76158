"""Failed page writes of the disk tier, counted and told without flooding the log.

Owns the count (`polarkv_disk_write_errors_total`) and the log lines: the first failure with its
reason, then at most one summary line per `every` seconds ("N more page writes failed: ENOSPC"),
and one line when writes succeed again. A full disk fails every demotion; one line per page would
bury everything else in the log. It does not decide what a failed write means for the page (the
tier and the manager do: `demotions_dropped`).
"""

from __future__ import annotations

import collections
import errno
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("polarkvd.tiers.disk")


def reason(exc: OSError) -> str:
    """The errno's name (ENOSPC), or the error's text when it has none."""
    name = errno.errorcode.get(exc.errno) if exc.errno is not None else None
    return name or str(exc)


class WriteFailures:
    """Thread-safe. `clock`: seconds, monotonic (injected by tests)."""

    def __init__(self, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self.total = 0  # page writes failed since start
        self._lock = threading.Lock()
        self._failing = False  # the last write failed: a success is worth a line
        self._since_line = 0  # failures since the last line
        self._streak = 0  # failures since the last success
        self._reasons: collections.Counter[str] = collections.Counter()
        self._last_line = 0.0

    def failed(self, path: str, exc: OSError) -> None:
        why = reason(exc)
        with self._lock:
            self.total += 1
            self._streak += 1
            now = self.clock()
            if not self._failing:
                self._failing, self._last_line = True, now
                first = True
            else:
                first = False
                self._since_line += 1
                self._reasons[why] += 1
                if now - self._last_line < self.every:
                    return
                count, reasons = self._since_line, self._reasons
                self._since_line, self._reasons, self._last_line = 0, collections.Counter(), now
        if first:
            log.warning(
                "disk tier: writing %s failed: %s (%s); further failures are summed up every %.0fs",
                path, exc, why, self.every,
            )  # fmt: skip
        else:
            said = ", ".join(f"{n} {r}" if len(reasons) > 1 else r for r, n in reasons.most_common())
            log.warning("disk tier: %d more page writes failed: %s", count, said)

    def succeeded(self) -> None:
        if not self._failing:  # the common case, without the lock: a stale read only delays the line
            return
        with self._lock:
            if not self._failing:
                return
            streak = self._streak
            self._failing, self._streak, self._since_line = False, 0, 0
            self._reasons = collections.Counter()
        log.warning("disk tier: page writes succeed again, after %d failed", streak)

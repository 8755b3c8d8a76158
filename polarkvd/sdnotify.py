"""sd_notify(3) without libsystemd: one datagram per state change to the socket in $NOTIFY_SOCKET.

Owns the notify protocol only (READY, RELOADING, STOPPING, STATUS, WATCHDOG) and the watchdog
interval systemd asks for. It knows nothing about the daemon: daemon.py decides when each state is
true. Without $NOTIFY_SOCKET every call is a cheap no-op, so `polarkvd serve` in a terminal, in a
container or under another supervisor behaves exactly as before.

A send never raises and never blocks the event loop for long: systemd reads its notify socket
continuously, and a lost STATUS or WATCHDOG datagram is repaired by the next one.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._addr: str | None = None
        self._sock: socket.socket | None = None
        self._warned = False
        self.watchdog_seconds: float | None = None  # how often to send WATCHDOG=1 (half of WatchdogSec)
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):  # abstract namespace
            self._addr = "\0" + addr[1:]
        elif addr.startswith("/"):
            self._addr = addr
        elif addr:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket path; not notifying systemd", addr)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if self._addr and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # sd_watchdog_enabled(3) recommends pinging at half the timeout.
            self.watchdog_seconds = int(usec) / 2e6

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *fields: str) -> bool:
        """Send "KEY=VALUE" fields as one datagram. False when disabled or the send failed."""
        if self._addr is None:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(1.0)  # a full receive queue must not hang the event loop
            self._sock.sendto(data, self._addr)
            return True
        except OSError as e:
            if not self._warned:  # once: a broken notify socket would otherwise log every ping
                self._warned = True
                log.warning("cannot notify systemd at %r: %s", os.environ.get("NOTIFY_SOCKET"), e)
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *_status(status))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (253+, Type=notify-reload) match this reload to its request.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *_status(status))

    def status(self, status: str) -> bool:
        return self.send(*_status(status))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> list[str]:
    # STATUS is one line: systemctl status shows it as is.
    return [] if text is None else ["STATUS=" + " ".join(text.split())]

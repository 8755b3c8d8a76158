"""Log output of the daemon: one line per event on stderr, as key=value (logfmt) or JSON.

Owns formatting and handler set-up only; modules keep logging with `logging.getLogger(__name__)` and
lazy `%s` arguments. Fields given with `extra={...}` become their own keys. A multi-line message or
a traceback stays on one line (newlines escaped), so journald and log shippers see one record per
event.

Under systemd (stderr is the journal stream named in $JOURNAL_STREAM) the timestamp is left out —
journald stamps every line — and each line starts with its syslog priority (`<3>` = err), which
journald strips and stores, so `journalctl -u polarkvd -p warning` works.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any, TextIO

_LEVEL_NAMES = {
    "WARNING": "warning",
    "CRITICAL": "critical",
    "ERROR": "error",
    "INFO": "info",
    "DEBUG": "debug",
}
_SYSLOG_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
# Attributes every LogRecord has; anything else on a record came from `extra=` and is printed.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


def _level(record: logging.LogRecord) -> str:
    return _LEVEL_NAMES.get(record.levelname, record.levelname.lower())


def _timestamp(record: logging.LogRecord) -> str:
    t = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


def _logfmt_value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not any(c in text for c in ' ="\\\n\r\t'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


class _Base(logging.Formatter):
    def __init__(self, *, timestamps: bool = True, priority_prefix: bool = False) -> None:
        super().__init__()
        self.timestamps = timestamps
        self.priority_prefix = priority_prefix

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.timestamps:
            out["ts"] = _timestamp(record)
        out["level"] = _level(record)
        out["logger"] = record.name
        out["msg"] = record.getMessage()
        for key, value in _extras(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return out

    def prefix(self, record: logging.LogRecord) -> str:
        return f"<{_SYSLOG_PRIORITY.get(_level(record), 6)}>" if self.priority_prefix else ""


class LogfmtFormatter(_Base):
    """level=info logger=polarkvd.daemon msg="polarkvd ready ..." key=value ..."""

    def format(self, record: logging.LogRecord) -> str:
        body = " ".join(f"{k}={_logfmt_value(v)}" for k, v in self.fields(record).items())
        return self.prefix(record) + body


class JsonFormatter(_Base):
    """{"level": "info", "logger": "polarkvd.daemon", "msg": "...", ...} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        return self.prefix(record) + json.dumps(self.fields(record), default=str, ensure_ascii=False)


def stderr_is_journal(stream: TextIO | None = None, env: dict[str, str] | None = None) -> bool:
    """True when `stream` is the journald stream systemd connected (sd_journal_stream_fd's check)."""
    env = dict(os.environ) if env is None else env
    want = env.get("JOURNAL_STREAM", "")
    dev, sep, ino = want.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def make_formatter(fmt: str = "text", *, journal: bool | None = None) -> logging.Formatter:
    journal = stderr_is_journal() if journal is None else journal
    cls = JsonFormatter if fmt == "json" else LogfmtFormatter
    return cls(timestamps=not journal, priority_prefix=journal)


def setup_logging(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Route every log record to `stream` (stderr) in `fmt`; `level` applies to polarkvd's loggers.

    Third-party libraries log at warning and above. The live knob `daemon.log_level` changes the
    level of the "polarkvd" logger later (server/control.py).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("polarkvd").setLevel(level.upper())
    logging.captureWarnings(True)

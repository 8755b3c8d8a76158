"""The error hierarchy of polarkvd.

A leaf module: it imports nothing else of the package. Every error that crosses the wire carries a
stable `code` (the `ErrorCode` values), so clients branch on codes, never on message text.
"""

from __future__ import annotations

import enum

#: Exit status for a configuration or resource problem (sysexits EX_CONFIG). systemd's
#: `RestartPreventExitStatus=78` keeps a bad config from restart-looping.
EXIT_CONFIG = 78


class ErrorCode(str, enum.Enum):
    BAD_REQUEST = "bad_request"  # malformed frame, wrong types, unknown fields
    BAD_VERSION = "bad_version"  # protocol version the daemon does not speak
    UNKNOWN_OP = "unknown_op"
    TOO_LARGE = "too_large"  # frame or count over the daemon's limits
    NO_SESSION = "no_session"  # engine op before `hello`
    NAMESPACE = "namespace"  # key belongs to another namespace, or bad namespace
    NOT_RESERVED = "not_reserved"  # commit/abort of a key this session did not reserve
    NO_SPACE = "no_space"
    NOT_FOUND = "not_found"
    CORRUPT = "corrupt"
    DRAINING = "draining"  # the daemon refuses new stores while draining
    BAD_VALUE = "bad_value"  # a knob or argument with an invalid value
    UNAVAILABLE = "unavailable"  # client side: the daemon cannot be reached
    INTERNAL = "internal"


class PolarKVError(Exception):
    """Base class. `code` says what kind of failure it is, on both sides of the wire."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ConfigError(PolarKVError):
    """A configuration value is wrong. Carries every problem found, each with key, value and why."""

    code = ErrorCode.BAD_VALUE

    def __init__(self, problems: list[tuple[str, object, str]]) -> None:
        self.problems = problems
        lines = [f"{key} = {value!r}: {why}" for key, value, why in problems]
        super().__init__("invalid configuration:\n  " + "\n  ".join(lines))


class ResourceError(PolarKVError):
    """The machine does not have what the configuration asks for (RAM, /dev/shm, disk, memlock)."""

    code = ErrorCode.NO_SPACE


class ProtocolError(PolarKVError):
    code = ErrorCode.BAD_REQUEST


class NamespaceError(PolarKVError):
    code = ErrorCode.NAMESPACE


class NoSpaceError(PolarKVError):
    code = ErrorCode.NO_SPACE


class PageNotFound(PolarKVError):
    code = ErrorCode.NOT_FOUND


class LeaseExpired(PageNotFound):
    """Client side: a lease ran out before `release`; what was read under it may be stale."""


class PageCorrupt(PolarKVError):
    """Stored bytes failed their checksum. The page is dropped; the caller recomputes."""

    code = ErrorCode.CORRUPT


class DaemonUnavailable(PolarKVError):
    """Client side: the daemon's socket cannot be reached or the connection broke."""

    code = ErrorCode.UNAVAILABLE


class TransportError(PolarKVError):
    """A peer cannot be reached, refused the handshake, timed out, or the connection broke mid-call."""

    code = ErrorCode.UNAVAILABLE


def error_for_code(code: str, message: str) -> PolarKVError:
    """Rebuild a typed error on the client from an error reply."""
    try:
        ec = ErrorCode(code)
    except ValueError:
        ec = ErrorCode.INTERNAL
    for cls in (ProtocolError, NamespaceError, NoSpaceError, PageNotFound, PageCorrupt, DaemonUnavailable):
        if cls.code is ec:
            return cls(message)
    return PolarKVError(message, code=ec)

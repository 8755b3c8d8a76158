"""The wire protocol between the daemon and its clients (engines, the CLI, the TUI).

Shared by both sides; imports only leaves. Messages are msgpack (never pickle), each in a frame
prefixed by its length (4 bytes, little endian) on a Unix stream socket:

    request  [VERSION, request_id, op, {args}]
    reply    [VERSION, request_id, OK, {result}]   or   [VERSION, request_id, ERROR, {code, message}]

Page keys travel as an array of 16-byte `bin`s (msgpack's C decoder makes the key objects directly:
measured 4x cheaper than slicing one packed blob in Python). Tiers travel as one byte per page. Bulk bytes never travel here: they move through the shared-memory arena.

Version policy: a daemon answers requests of any version in `SUPPORTED_VERSIONS`; anything else gets a
`bad_version` error reply naming the versions it speaks.
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import msgpack

from polarkvd.errors import ErrorCode, ProtocolError
from polarkvd.types import KEY_BYTES

VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
OK, ERROR = 0, 1
LENGTH = struct.Struct("<I")
#: Default limit on one frame; the daemon's is `daemon.max_frame_bytes`.
MAX_FRAME = 16 << 20


class Op(str, enum.Enum):
    # engine API
    HELLO = "hello"
    LOOKUP = "lookup"
    RESERVE = "reserve"
    COMMIT = "commit"
    ABORT = "abort"
    LOAD = "load"
    RELEASE = "release"
    PING = "ping"
    OBSERVE = "observe"  # an engine's prefill timing: what recomputing costs (manager/worth.py)
    REPORT_LOAD = "report_load"  # an engine's running / waiting requests, queued prefill (`where`)
    # control API
    STATS = "stats"
    EVICT = "evict"
    DRAIN = "drain"
    RESUME = "resume"
    GET_KNOBS = "get_knobs"
    SET_KNOBS = "set_knobs"
    SAVE_TUNING = "save_tuning"
    TOP = "top"
    PIN = "pin"
    UNPIN = "unpin"
    EVICT_KEYS = "evict_keys"
    CLUSTER = "cluster"
    WHERE = "where"  # how much of a prefix is cached here and on which members (server/where.py)


#: Status codes in a reserve reply, per key, besides a non-negative arena offset.
class Reserved(enum.IntEnum):
    """What `reserve` answers for a key instead of an offset (offsets are never negative); on the
    wire these are the plain integers."""

    EXISTS = -1  # already cached: nothing to write
    NO_SPACE = (
        -2
    )  # not stored: no room (everything pinned), not admitted (dram.min_prefix_pages) or over quota


def pack(message: list[Any]) -> bytes:
    payload: bytes = msgpack.packb(message, use_bin_type=True)
    return LENGTH.pack(len(payload)) + payload


def unpack(payload: bytes | bytearray | memoryview) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=False)


def request(request_id: int, op: str, args: dict[str, Any]) -> bytes:
    return pack([VERSION, request_id, op, args])


def reply_ok(request_id: int, result: dict[str, Any]) -> bytes:
    return pack([VERSION, request_id, OK, result])


def reply_error(request_id: int, code: ErrorCode, message: str) -> bytes:
    return pack([VERSION, request_id, ERROR, {"code": code.value, "message": message}])


class FrameTooLarge(ProtocolError):
    code = ErrorCode.TOO_LARGE


class FrameReader:
    """Splits a byte stream into frame payloads. `feed` returns every payload completed so far."""

    __slots__ = ("_buf", "limit")

    def __init__(self, limit: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        if not self._buf and len(data) >= 4:  # fast path: exactly one whole frame, nothing buffered
            (n,) = LENGTH.unpack_from(data)
            if n + 4 == len(data) and n <= self.limit:
                return [data[4:]]
        self._buf += data
        out = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = LENGTH.unpack_from(buf, pos)
            if n > self.limit:
                raise FrameTooLarge(f"frame of {n} bytes exceeds the limit of {self.limit}")
            if len(buf) - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        if pos:
            del buf[:pos]
        return out


def pack_keys(keys: list[bytes]) -> list[bytes]:
    return keys if isinstance(keys, list) else list(keys)


_KEY_LEN = {KEY_BYTES}


def unpack_keys(keys: object, limit: int) -> list[bytes]:
    """Validate a key array: bad types and sizes are a ProtocolError, too many keys FrameTooLarge."""
    if not isinstance(keys, list):
        raise ProtocolError("keys must be an array of 16-byte binary keys")
    if len(keys) > limit:
        raise FrameTooLarge(f"{len(keys)} keys in one request exceeds the limit of {limit}")
    if keys:
        # Two C-level passes (measured half the cost of checking types and lengths as sets): join
        # refuses anything not bytes-like (str, ints, maps, nil); msgpack decodes every bin as bytes.
        try:
            b"".join(keys)
        except TypeError:
            raise ProtocolError(f"every key must be {KEY_BYTES} bytes of binary") from None
        if set(map(len, keys)) != _KEY_LEN:
            raise ProtocolError(f"every key must be {KEY_BYTES} bytes of binary")
    return keys

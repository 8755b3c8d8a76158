"""Gossip wire messages: small frozen dataclasses, one packet = a list of them, encoded with msgpack.

Owns the schema and its validation. Must not know about sockets or member state. `decode` raises
`ProtocolError` for anything that is not a well-formed packet of this version (garbage, a foreign
protocol, wrong field types, oversize), so receivers can count and drop it; it never executes or
instantiates anything the bytes name (no pickle).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import msgpack

from polarkvd.errors import ProtocolError

#: First element of every packet: the protocol name and version, so a foreign sender is dropped.
MAGIC = "pkg1"
#: Hard limits against hostile or broken peers.
MAX_PACKET_BYTES = 4 << 20
MAX_MESSAGES = 4096


class State(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    seq: int
    target: str  # node id the sender means to reach; a restarted node under the same address says no


@dataclasses.dataclass(frozen=True, slots=True)
class IndirectPing:
    seq: int
    target: str
    target_addr: str


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclasses.dataclass(frozen=True, slots=True)
class Alive:
    node: str
    incarnation: int
    addr: str
    meta: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Suspect:
    node: str
    incarnation: int
    source: str  # who suspects: distinct sources are the independent confirmations


@dataclasses.dataclass(frozen=True, slots=True)
class Dead:
    node: str
    incarnation: int
    source: str  # source == node means a graceful leave


@dataclasses.dataclass(frozen=True, slots=True)
class NodeState:
    node: str
    addr: str
    incarnation: int
    state: State
    meta: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class PushPull:
    states: tuple[NodeState, ...]
    join: bool
    reply: bool


Message = Ping | IndirectPing | Ack | Alive | Suspect | Dead | PushPull


class MsgType(enum.IntEnum):
    PING = 1
    INDIRECT_PING = 2
    ACK = 3
    ALIVE = 4
    SUSPECT = 5
    DEAD = 6
    PUSH_PULL = 7


_TYPE_OF: dict[type, MsgType] = {
    Ping: MsgType.PING,
    IndirectPing: MsgType.INDIRECT_PING,
    Ack: MsgType.ACK,
    Alive: MsgType.ALIVE,
    Suspect: MsgType.SUSPECT,
    Dead: MsgType.DEAD,
    PushPull: MsgType.PUSH_PULL,
}


_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _TYPE_OF
}


def _to_wire(m: Message) -> list[Any]:
    t = _TYPE_OF[type(m)]
    if t is MsgType.PUSH_PULL:
        assert isinstance(m, PushPull)
        states = [[s.node, s.addr, s.incarnation, int(s.state), s.meta] for s in m.states]
        return [int(t), states, m.join, m.reply]
    return [int(t), *(getattr(m, name) for name in _FIELDS[type(m)])]


def encode(msgs: list[Message]) -> bytes:
    return msgpack.packb([MAGIC, [_to_wire(m) for m in msgs]], use_bin_type=True)


def _int(v: Any) -> int:
    if type(v) is not int or v < 0 or v >= 1 << 63:
        raise ProtocolError(f"expected a non-negative int, got {type(v).__name__}")
    return v


def _str(v: Any) -> str:
    if type(v) is not str or len(v) > 1024:
        raise ProtocolError(f"expected a short str, got {type(v).__name__}")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise ProtocolError(f"expected a bool, got {type(v).__name__}")
    return v


def _meta(v: Any) -> dict[str, Any]:
    if type(v) is not dict:
        raise ProtocolError(f"expected a meta map, got {type(v).__name__}")
    return v


def _node_state(v: Any) -> NodeState:
    if type(v) is not list or len(v) != 5:
        raise ProtocolError("bad node state")
    try:
        state = State(v[3])
    except ValueError:
        raise ProtocolError(f"bad state {v[3]!r}") from None
    return NodeState(_str(v[0]), _str(v[1]), _int(v[2]), state, _meta(v[4]))


def _from_wire(w: Any) -> Message:
    if type(w) is not list or not w:
        raise ProtocolError("message is not a list")
    try:
        t = MsgType(w[0])
    except (ValueError, TypeError):
        raise ProtocolError(f"unknown message type {w[0]!r}") from None
    a = w[1:]
    n = {
        MsgType.PING: 2,
        MsgType.INDIRECT_PING: 3,
        MsgType.ACK: 1,
        MsgType.ALIVE: 4,
        MsgType.SUSPECT: 3,
        MsgType.DEAD: 3,
        MsgType.PUSH_PULL: 3,
    }[t]
    if len(a) != n:
        raise ProtocolError(f"{t.name}: expected {n} fields, got {len(a)}")
    if t is MsgType.PING:
        return Ping(_int(a[0]), _str(a[1]))
    if t is MsgType.INDIRECT_PING:
        return IndirectPing(_int(a[0]), _str(a[1]), _str(a[2]))
    if t is MsgType.ACK:
        return Ack(_int(a[0]))
    if t is MsgType.ALIVE:
        return Alive(_str(a[0]), _int(a[1]), _str(a[2]), _meta(a[3]))
    if t is MsgType.SUSPECT:
        return Suspect(_str(a[0]), _int(a[1]), _str(a[2]))
    if t is MsgType.DEAD:
        return Dead(_str(a[0]), _int(a[1]), _str(a[2]))
    if type(a[0]) is not list:
        raise ProtocolError("PUSH_PULL: states is not a list")
    return PushPull(tuple(_node_state(s) for s in a[0]), _bool(a[1]), _bool(a[2]))


def decode(data: bytes) -> list[Message]:
    """Bytes → messages, or `ProtocolError`. Never raises anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_PACKET_BYTES:
        raise ProtocolError(f"packet of {len(data)} bytes is over {MAX_PACKET_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"not msgpack: {e}") from None
    if type(obj) is not list or len(obj) != 2 or obj[0] != MAGIC or type(obj[1]) is not list:
        raise ProtocolError("not a polarkvd gossip packet")
    if len(obj[1]) > MAX_MESSAGES:
        raise ProtocolError(f"{len(obj[1])} messages in one packet")
    return [_from_wire(w) for w in obj[1]]

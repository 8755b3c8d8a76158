"""Fuzz target: client bytes on the engine and control sockets, up to the Manager's calls.

Covers the frame decoder (wire/frames.py FrameReader), request parsing (connection.parse_request) and
every engine and control op's argument checks (server/engine.py, server/control.py), driven
in-process against a fresh Manager per input, assembled as the daemon assembles it (slab allocator,
signal board and lookup table over one arena; no disk, no cluster). Each input is a short session
of frames on two engine connections and one control connection: raw garbage, bogus lengths, and
requests built from well-formed ones with a field changed, dropped or added.

It fails (raises) when the server side breaks its rules: a frame without exactly one well-formed
reply, an `internal` error reply (the daemon's word for a bug), a `bad_request` made from a stray
TypeError/ValueError/KeyError instead of a check, a request that never finishes, or pages, slots
or pins left over once every connection has closed, or pages that an operator eviction of
everything cannot remove (beyond what the operator pinned). libFuzzer itself reports an input that
hangs (-timeout) or eats memory (-rss_limit_mb).

Standalone, for as long as you like (libFuzzer flags; a corpus directory keeps what it found):

    mkdir -p corpus && python tests/fuzz/fuzz_frames.py -max_total_time=600 [-jobs=4] corpus/

tests/fuzz/test_fuzz.py runs it in CI for a bounded number of inputs, and replays with hypothesis
where atheris is not installed.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

if __name__ == "__main__":  # run as a script: import polarkvd from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from polarkvd.config import LIVE_KNOBS, load_config
from polarkvd.config.machine import resolve
from polarkvd.errors import ErrorCode
from polarkvd.manager import Manager
from polarkvd.server import connection
from polarkvd.server.control import control_handlers
from polarkvd.server.engine import engine_api
from polarkvd.server.engine_thread import ON_LOOP
from polarkvd.tiers.dram import SlabAllocator, slot_size
from polarkvd.transport.pipeline import SIGNAL_BOARD_BYTES, SignalBoard
from polarkvd.types import Namespace, Tier
from polarkvd.wire import frames as P
from polarkvd.wire.lookup_table import LookupTable, table_bytes
from polarkvd.wire.lookup_table import table_entries as table_entries_for

CAPACITY = 256 << 10
SLAB = 64 << 10
MAX_KEYS = 16
MAX_FRAMES = 24  # per input
#: 4 KiB pages (one slot); a hello may change any field of it
BASE_NS = Namespace(
    "fuzz@0", "bfloat16", "fuzz/v1", num_layers=1, num_kv_heads=1, head_dim=64, page_tokens=16
)
KEY_POOL = [bytes([i]) * 16 for i in range(8)]
ENGINE_OPS = ["hello", "lookup", "reserve", "commit", "abort", "load", "release", "ping"]
CONTROL_OPS = [
    "stats", "evict", "drain", "resume", "get_knobs", "set_knobs", "save_tuning", "top", "pin",
    "unpin", "evict_keys", "ping", "cluster",
]  # fmt: skip
ODD_INTS = [
    0,
    1,
    -1,
    2,
    3,
    4,
    16,
    17,
    255,
    4096,
    1 << 31,
    -(1 << 31),
    (1 << 63) - 1,
    -(1 << 63),
    (1 << 64) - 1,
]
ODD_FLOATS = [0.0, -0.0, 0.5, 1.0, 1.5, 1e300, -1e300, math.inf, -math.inf, math.nan, 1e-300]
ODD_STRS = [
    "",
    "x",
    "dram",
    "disk",
    "vram",
    "lru",
    "debug",
    "1s",
    "30s",
    "NaN",
    "inf",
    "-1",
    "1e9s",
    "é",
    "\x00",
]


class Failure(AssertionError):
    """The server side broke one of its rules for this input."""


class Input:
    """Reads decisions from the fuzzer's bytes; zeros once they run out (so every input is valid)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def below(self, n: int) -> int:
        if n <= 256:
            return self.byte() % n
        return (self.byte() | self.byte() << 8 | self.byte() << 16) % n

    def pick(self, items: list[Any]) -> Any:
        return items[self.below(len(items))]

    def chance(self, in_256: int) -> bool:
        return self.byte() < in_256

    def raw(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


def value(inp: Input, depth: int = 0) -> Any:
    """Any msgpack value, biased towards the ones validation must think about."""
    kind = inp.below(12 if depth < 2 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return inp.chance(128)
    if kind == 2:
        return inp.pick(ODD_INTS)
    if kind == 3:
        return inp.pick(ODD_FLOATS)
    if kind == 4:
        return inp.pick(ODD_STRS) if inp.chance(200) else "s" * inp.below(5000)
    if kind == 5:
        return inp.pick(KEY_POOL)
    if kind == 6:
        return inp.raw(inp.below(40))
    if kind == 7:  # near the edges of msgpack's integers
        return max(-(1 << 63), min((1 << 64) - 1, inp.pick(ODD_INTS) + inp.below(5) - 2))
    if kind in (8, 9):
        return [value(inp, depth + 1) for _ in range(inp.below(5))]
    return {scalar(inp): value(inp, depth + 1) for _ in range(inp.below(4))}


def scalar(inp: Input) -> Any:
    """A map key (msgpack allows any; Python's dict only hashable ones)."""
    return inp.pick([None, True, 0, 1, -1, 1.5, b"x" * 16, *ODD_STRS])


def keys(inp: Input) -> list[bytes]:
    n = inp.below(MAX_KEYS + 3)
    start = inp.below(len(KEY_POOL))
    return [KEY_POOL[(start + i) % len(KEY_POOL)] for i in range(n)]


def template(inp: Input, op: str) -> dict[str, Any]:
    """Well-formed arguments for `op` (or for nothing in particular, for a junk op)."""
    if op == "hello":
        ns = BASE_NS.to_wire()
        if inp.chance(60):
            ns[inp.pick(list(ns))] = value(inp)
        args: dict[str, Any] = {"namespace": ns, "engine_id": inp.pick(ODD_STRS)}
        if inp.chance(40):
            args["vram"] = inp.chance(128)
        return args
    if op == "lookup":
        return {"keys": keys(inp), "pin": inp.chance(128)}
    if op == "reserve":
        return {"keys": keys(inp), "parent": inp.pick([None, *KEY_POOL]), "tier": inp.pick([1, 2])}
    if op in ("commit", "abort", "pin", "unpin", "evict_keys"):
        return {"keys": keys(inp)}
    if op == "load":
        return {"keys": keys(inp), "pipelined": inp.chance(128)}
    if op == "release":
        return {"lease": inp.below(8)}
    if op == "evict":
        return {"tier": inp.pick(["dram", "disk", "vram"]), "bytes": inp.pick([0, 4096, 1 << 20, 1 << 40])}
    if op == "set_knobs":
        return {"knobs": {inp.pick(LIVE_KNOBS): value(inp) for _ in range(1 + inp.below(3))}}
    if op == "save_tuning":
        return {"names": [inp.pick(LIVE_KNOBS) for _ in range(1 + inp.below(3))]}
    if op == "top":
        return {"limit": inp.pick([1, 20, 1000])}
    return {}


def request(inp: Input, ops: list[str]) -> bytes:
    """One frame's payload: a request built from a template with something changed, or garbage."""
    shape = inp.below(16)
    if shape == 0:
        return inp.raw(inp.below(64))  # not msgpack, or msgpack of anything
    if shape == 1:
        return msgpack.packb(value(inp), use_bin_type=True)
    op = inp.pick(ops) if inp.chance(240) else value(inp)
    args = template(inp, op) if isinstance(op, str) else {}
    change = inp.below(8)
    if change == 0 and args:  # a field of the wrong type or value
        args[inp.pick(list(args))] = value(inp)
    elif change == 1:  # an argument the op does not know
        args[inp.pick(["offset", "length", "tier", "keys", "x", "pin"])] = value(inp)
    elif change == 2 and args:  # a required argument left out
        del args[inp.pick(list(args))]
    version = P.VERSION if inp.chance(240) else value(inp)
    rid = inp.below(1 << 20) if inp.chance(240) else value(inp)
    message: Any = [version, rid, op, args if inp.chance(250) else value(inp)]
    if inp.chance(4):
        message = message[: inp.below(4)] + [value(inp)] * inp.below(2)
    return msgpack.packb(message, use_bin_type=True)


# ---------------------------------------------------------------------------------------- the daemon's side


class Conn:
    """A connection as the handlers see it (what connection.Connection and the engine socket's
    ThreadConnection both provide)."""

    def __init__(self, target: Target, name: str) -> None:
        self.server = self  # `answer` reads conn.server.name
        self.name = name
        self.session: Any = None
        self.closed = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.reader = P.FrameReader(target.cfg.daemon.max_frame_bytes)


class Target:
    """A Manager and the handlers over it, as daemon.py assembles them; one per input."""

    def __init__(self, workdir: Path) -> None:
        sets = {
            "daemon.runtime_dir": str(workdir / "run"),
            "daemon.state_dir": str(workdir / "state"),
            "daemon.tuning_file": str(workdir / "tuning.toml"),
            "daemon.max_keys_per_request": str(MAX_KEYS),
            "daemon.max_frame_bytes": "64KiB",
            "daemon.max_sessions": "4",
            "dram.capacity": str(CAPACITY),
            "dram.slab_bytes": str(SLAB),
            "disk.enabled": "false",
        }
        cfg = self.cfg = resolve(load_config(env={}, overrides=sets))
        entries = table_entries_for(CAPACITY, cfg.dram.lookup_table_entries, 0)
        table_at = CAPACITY + SIGNAL_BOARD_BYTES
        table_size = table_bytes(entries, cfg.daemon.max_sessions)
        arena = memoryview(bytearray(table_at + table_size))
        self.manager = Manager(
            cfg,
            arena,
            SlabAllocator(CAPACITY, SLAB),
            None,
            EXECUTOR,
            signals=SignalBoard(arena[CAPACITY:table_at]),
            table=LookupTable(arena[table_at:], entries, cfg.daemon.max_sessions),
        )
        api = engine_api(
            self.manager,
            arena_path="/nonexistent/fuzz-arena",
            arena_size=len(arena),
            max_keys=MAX_KEYS,
            signal_offset=CAPACITY,
            table_offset=table_at,
            table_size=table_size,
        )
        self.engine, self.on_thread = api.handlers, api.thread_handlers
        self.control = control_handlers(self.manager)

    async def frame(self, conn: Conn, payload: bytes) -> None:
        """One frame: exactly one well-formed reply, never `internal`, never stray exceptions."""
        handlers = self.engine if conn.name == "engine" else self.control
        replies: list[bytes] = []
        req = connection.parse_request(payload, conn.name, handlers)
        if type(req) is bytes:
            replies.append(req)
        else:
            assert isinstance(req, connection.Request)
            here = self.on_thread.get(req.op) if conn.name == "engine" else None
            result = ON_LOOP
            if here is not None:  # the engine socket answers these on the connection's thread first
                try:
                    result = here(conn, req.args)
                except Exception as e:
                    replies.append(connection.error_reply(conn.name, req.rid, req.op, e))
                else:
                    if result is not ON_LOOP:
                        replies.append(P.reply_ok(req.rid, result))
            if not replies:
                connection.answer(conn, req, replies.append)
                if conn.tasks:
                    done, pending = await asyncio.wait(list(conn.tasks), timeout=5)
                    if pending:
                        raise Failure(f"{req.op} {req.args!r}: no reply after 5 s")
        if len(replies) != 1:
            raise Failure(f"{len(replies)} replies to one frame {payload[:200]!r}")
        check_reply(replies[0], req if not isinstance(req, bytes) else None)

    def close(self, conns: list[Conn]) -> None:
        """Every connection closes (the daemon's on_close): nothing may stay reserved or pinned."""
        m = self.manager
        for conn in conns:
            conn.closed = True
            if conn.session is not None:
                m.detach(conn.session)
        if m.sessions:
            raise Failure(f"sessions left after every connection closed: {list(m.sessions)}")
        pins = {p.key.hex(): p.pins for p in m.index if p.pins and p.key not in m.operator_pins}
        if pins:
            raise Failure(f"pages still pinned after every connection closed: {pins}")
        used = sum(slot_size(p.size) for p in m.index)
        if m.allocator.used_bytes != used:
            raise Failure(f"{m.allocator.used_bytes} bytes of slots in use, pages hold {used}")
        # an operator eviction of everything leaves only operator-pinned pages and their ancestors
        m.evict_bytes(Tier.DRAM, CAPACITY)
        keep: set[bytes] = set()
        for key in m.operator_pins:
            while key is not None and key not in keep:
                keep.add(key)
                page = m.index.get(key)
                key = page.parent if page is not None else None
        stuck = [p.key.hex() for p in m.index if p.key not in keep]
        if stuck:
            raise Failure(f"pages that no eviction can remove: {stuck}")


def check_reply(data: bytes, req: connection.Request | None) -> None:
    (n,) = P.LENGTH.unpack_from(data)
    if n + 4 != len(data):
        raise Failure(f"reply frame of {len(data)} bytes says {n}")
    msg = P.unpack(data[4:])
    if not (isinstance(msg, list) and len(msg) == 4 and msg[0] == P.VERSION and msg[2] in (P.OK, P.ERROR)):
        raise Failure(f"malformed reply {msg!r}")
    if req is not None and msg[1] != req.rid:
        raise Failure(f"reply to request {req.rid} carries id {msg[1]}")
    body = msg[3]
    if not isinstance(body, dict):
        raise Failure(f"reply body {body!r} is not a map")
    if msg[2] == P.ERROR:
        if body.get("code") not in {c.value for c in ErrorCode} or not isinstance(body.get("message"), str):
            raise Failure(f"malformed error reply {body!r}")
        if body["code"] == ErrorCode.INTERNAL.value:
            raise Failure(f"internal error: {body['message']} (request {req!r})")
    if STRAY:
        e = STRAY.pop()
        raise Failure(f"bad_request from an unchecked {type(e).__name__}: {e!r} (request {req!r})") from e


#: Exceptions that `error_reply` turned into bad_request without a handler having checked for them.
STRAY: list[BaseException] = []
_error_reply = connection.error_reply


def _watch_error_reply(name: str, rid: int, op: str, e: Exception) -> bytes:
    if type(e) in (TypeError, ValueError, KeyError):
        STRAY.append(e)
    return _error_reply(name, rid, op, e)


EXECUTOR = concurrent.futures.ThreadPoolExecutor(1)  # never used without a disk tier
WORKDIR = Path(tempfile.mkdtemp(prefix="polarkvd-fuzz-"))
atexit.register(shutil.rmtree, WORKDIR, ignore_errors=True)
LOOP = asyncio.new_event_loop()


@contextlib.contextmanager
def _watching() -> Iterator[None]:
    """For one input: stray exceptions recorded, and the handlers' logging of refusals silenced (the
    oracle reads replies); both undone afterwards, for the tests that share this process."""
    STRAY.clear()
    connection.error_reply = _watch_error_reply  # what `answer` and the thread path call
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        connection.error_reply = _error_reply
        STRAY.clear()


async def _session(data: bytes) -> None:
    inp = Input(data)
    target = Target(WORKDIR)
    conns = [Conn(target, "engine"), Conn(target, "engine"), Conn(target, "control")]
    with _watching():
        for _ in range(MAX_FRAMES):
            if not inp.left():
                break
            conn = inp.pick(conns)
            if conn.closed:
                continue
            ops = ENGINE_OPS if conn.name == "engine" else CONTROL_OPS
            if inp.chance(8):  # bytes on the stream: a bogus length, a split frame, several frames
                stream = inp.raw(inp.below(12))
            else:
                payload = request(inp, ops)
                stream = P.LENGTH.pack(len(payload)) + payload
            cut = inp.below(len(stream) + 1)
            for part in (stream[:cut], stream[cut:]):
                try:
                    frames = conn.reader.feed(part)
                except P.FrameTooLarge:
                    conn.closed = True  # the server replies too_large and closes
                    break
                for payload in frames:
                    await target.frame(conn, payload)
    target.close(conns)


def test_one_input(data: bytes) -> None:
    LOOP.run_until_complete(_session(data))


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

"""The engine API: the ops an inference engine's connector calls over the engine socket.

Owns argument validation and the mapping of wire requests onto Manager calls; owns no state beyond
which session a connection is. One connection is one session: when it closes (the engine exited or
was killed), the session's reservations are aborted and its leases dropped at once.

Two sets of handlers (served by engine_thread.EngineThreadServer): `handlers` run on the event loop
and may change anything; `thread_handlers` run on the connection's own thread and only read. Today
that is one op, a lookup without `pin` (Manager.lookup_in_thread); it hands the request to the loop
(`ON_LOOP`) when it needs more. Both validate with the same functions, so a bad request gets the same
error reply on either path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Awaitable
from time import perf_counter_ns
from typing import Any

from polarkvd.errors import ErrorCode, PolarKVError, ProtocolError
from polarkvd.manager import Manager, Session
from polarkvd.metrics import OpTimings
from polarkvd.server.connection import Handler, arg_bool, arg_int, only_args
from polarkvd.server.engine_events import EngineEvents, EngineLoad, parse_spec
from polarkvd.server.engine_thread import ON_LOOP, ThreadHandler
from polarkvd.types import KEY_BYTES, Namespace, Tier
from polarkvd.wire import frames as P

# A connection as the handlers see it: `session` (None before hello) and `closed`; a
# connection.Connection or an engine_thread.ThreadConnection.
Connection = Any


def _session(conn: Connection) -> Session:
    if conn.session is None:
        raise PolarKVError(
            "send hello (namespace, engine id) before any other engine op", code=ErrorCode.NO_SESSION
        )
    return conn.session


@dataclasses.dataclass(frozen=True)
class EngineAPI:
    handlers: dict[str, Handler]  # every engine op, on the event loop
    thread_handlers: dict[str, ThreadHandler]  # ops tried first on the connection's thread


def engine_api(
    manager: Manager,
    *,
    arena_path: str,
    arena_size: int,
    max_keys: int,
    timings: OpTimings | None = None,
    signal_offset: int | None = None,
    table_offset: int | None = None,
    table_size: int = 0,
    vram_region: dict[str, Any] | None = None,
    engine_events: EngineEvents | None = None,
) -> EngineAPI:
    """`vram_region`: the L1 pool's `RegionHandle.to_wire()`, sent to sessions that attach with
    `vram` (docs/VRAM.md), or None when the daemon has no pool."""
    # Latency of the data-path ops, for metrics: a perf_counter_ns pair and a histogram add
    # (docs/METRICS.md has the measured cost). Failed requests are not timed. Lookups are timed on
    # connection threads and on the loop: the histogram's `+=` is not atomic, so they take a lock
    # (uncontended: ~0.1 us); the other ops run on the loop only.
    timings = timings if timings is not None else OpTimings()
    lookup_histogram, lookup_lock = timings["lookup"], threading.Lock()

    def observe_lookup(ns: int) -> None:
        with lookup_lock:
            lookup_histogram.observe_ns(ns)

    observe_reserve = timings["reserve"].observe_ns
    observe_commit = timings["commit"].observe_ns
    observe_load = timings["load"].observe_ns

    def keys(args: dict[str, Any]) -> list[bytes]:
        if "keys" not in args:
            raise ProtocolError("missing keys")
        return P.unpack_keys(args["keys"], max_keys)

    def hello(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "namespace", "engine_id", "vram", "kv_events")
        # the engine's own KV event publisher (server/engine_events.py), checked before attaching
        spec = parse_spec(args["kv_events"]) if args.get("kv_events") is not None else None
        if conn.session is not None:
            raise ProtocolError(
                "this connection is already attached; open another connection for another namespace"
            )
        try:
            ns = Namespace.from_wire(args.get("namespace"))
        except TypeError as e:
            raise PolarKVError(f"bad namespace: {e}", code=ErrorCode.NAMESPACE) from None
        engine_id = args.get("engine_id", "")
        if not isinstance(engine_id, str) or len(engine_id) > 256:
            raise ProtocolError("engine_id must be a string of at most 256 characters")
        if len(manager.sessions) >= manager.cfg.daemon.max_sessions:
            raise PolarKVError(
                f"too many sessions (daemon.max_sessions = {manager.cfg.daemon.max_sessions})",
                code=ErrorCode.TOO_LARGE,
            )
        session = manager.attach(ns, engine_id, vram=arg_bool(args, "vram") and vram_region is not None)
        if spec is not None and engine_events is not None:
            try:
                engine_events.attach(session, spec)
            except ProtocolError:  # an address ZeroMQ refuses: the hello fails whole
                manager.detach(session)
                raise
        conn.session = session
        return {
            "session": session.id,
            "arena_path": arena_path,
            "arena_size": arena_size,
            "page_bytes": ns.page_bytes,
            "layer_bytes": ns.layer_bytes,
            "ns_digest": session.ns.digest,
            "lease_seconds": manager.cfg.daemon.lease_seconds,
            "max_keys": max_keys,
            # where pipelined loads' readiness slots start in the arena file (transport/pipeline.py)
            "signal_offset": signal_offset,
            "lookup_table": lookup_table(session),
            # L1: the pool for this engine to open, when it asked and the daemon has one
            "vram": vram_region if session.vram else None,
        }

    def lookup_table(session: Session) -> dict[str, Any] | None:
        """Where the engine probes the daemon's index itself (lookup_table.py), or None: ask the socket."""
        if table_offset is None or session.table_slot is None:
            return None
        return {
            "offset": table_offset,
            "size": table_size,
            "slot": session.table_slot,
            "ns": session.ns.id,
            # a key missing from the table is cached nowhere: no cluster, and no disk tier or the
            # namespace's disk pages are listed (else the daemon sets the session slot's `final`
            # once they are; until then the client asks the socket for the rest)
            "final_miss": manager.final_miss(session.ns),
        }

    def lookup(conn: Connection, args: dict[str, Any]) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        t0 = perf_counter_ns()
        only_args(args, "keys", "pin")
        session, ks = _session(conn), keys(args)
        tiers, lease = manager.lookup(session, ks, arg_bool(args, "pin"))
        if len(tiers) < len(ks) and manager.cluster is not None:
            return lookup_cluster(session, ks, tiers, lease, t0)  # a local miss: ask the cluster
        out = {"tiers": bytes(tiers), "lease": lease}
        observe_lookup(perf_counter_ns() - t0)
        return out

    def lookup_on_thread(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """`lookup` on the connection's thread: read-only, or ON_LOOP when it would change state."""
        t0 = perf_counter_ns()
        only_args(args, "keys", "pin")
        session, ks = _session(conn), keys(args)
        if arg_bool(args, "pin"):
            return ON_LOOP  # a lease pins pages: the loop's business
        tiers = manager.lookup_in_thread(session, ks)
        if tiers is None:
            return ON_LOOP  # a local miss with a cluster: asking peers is asynchronous
        out = {"tiers": bytes(tiers), "lease": None}
        observe_lookup(perf_counter_ns() - t0)
        return out

    async def lookup_cluster(
        session: Session, ks: list[bytes], tiers: list[Tier], lease: int | None, t0: int
    ) -> dict[str, Any]:
        tiers = await manager.lookup_remote(session, ks, tiers)
        observe_lookup(perf_counter_ns() - t0)
        return {"tiers": bytes(tiers), "lease": lease}

    def reserve(conn: Connection, args: dict[str, Any]) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        t0 = perf_counter_ns()
        only_args(args, "keys", "parent", "tier")
        parent = args.get("parent")
        if parent is not None and (not isinstance(parent, bytes) or len(parent) != KEY_BYTES):
            raise ProtocolError("parent must be a 16-byte key or nil")
        tier = args.get("tier", int(Tier.DRAM))
        if type(tier) is not int or tier not in (Tier.VRAM, Tier.DRAM):
            raise ProtocolError(
                f"tier must be {int(Tier.VRAM)} (VRAM) or {int(Tier.DRAM)} (DRAM), got {tier!r}"
            )
        session, ks = _session(conn), keys(args)
        offsets, tiers = manager.reserve_in(session, ks, parent, Tier(tier))
        room = manager.reclaim.pending(session.ns.slot_bytes) if P.Reserved.NO_SPACE in offsets else None
        if room is not None:
            return reserve_rest(conn, session, ks, parent, Tier(tier), offsets, tiers, room, t0)
        out = {"offsets": offsets, "tiers": bytes(tiers)}
        observe_reserve(perf_counter_ns() - t0)
        return out

    async def reserve_rest(
        conn: Connection,
        session: Session,
        ks: list[bytes],
        parent: bytes | None,
        tier: Tier,
        offsets: list[int],
        tiers: list[int],
        room: asyncio.Future[bool],
        t0: int,
    ) -> dict[str, Any]:
        """The keys a reserve had no room for, once the slab being emptied for their page size is
        (a second model's first pages: manager/slab_reclaim.py); the loop serves others meanwhile."""
        emptied = await asyncio.shield(room)
        i = offsets.index(P.Reserved.NO_SPACE)
        if not emptied:
            manager.counters["reserve_no_space"] += len(ks) - i
        elif not conn.closed:
            more, more_tiers = manager.reserve_in(session, ks[i:], ks[i - 1] if i else parent, tier)
            offsets[i:], tiers[i:] = more, more_tiers
        observe_reserve(perf_counter_ns() - t0)
        return {"offsets": offsets, "tiers": bytes(tiers)}

    def commit(conn: Connection, args: dict[str, Any]) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        t0 = perf_counter_ns()
        only_args(args, "keys")
        committed, writes = manager.commit_pages(_session(conn), keys(args))
        if writes is not None:  # write-through: the reply waits until the pages are durable
            return commit_durable(committed, writes, t0)
        out = {"committed": committed}
        observe_commit(perf_counter_ns() - t0)
        return out

    async def commit_durable(committed: int, writes: list[asyncio.Future[bool]], t0: int) -> dict[str, Any]:
        results = await asyncio.gather(*writes, return_exceptions=True)
        observe_commit(perf_counter_ns() - t0)  # includes the disk writes and syncs
        return {"committed": committed, "durable": sum(r is True for r in results)}

    def abort(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "keys")
        return {"aborted": manager.abort(_session(conn), keys(args))}

    async def load(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        t0 = perf_counter_ns()
        only_args(args, "keys", "pipelined", "release", "serial")
        session, ks, serial = _session(conn), keys(args), arg_bool(args, "serial")
        if "release" in args:  # the lease of the batch before, copied out: one round trip for both
            manager.release(session, arg_int(args, "release"))  # unknown: not_found, nothing loaded
        signal = None
        if arg_bool(args, "pipelined") and signal_offset is not None:
            offsets, tiers, lease, signal = await manager.load_pipelined(session, ks)
        else:
            offsets, tiers, lease = await manager.load(session, ks, serial=serial)
        if conn.closed and lease is not None:  # the engine left while we read from disk
            manager.release(conn.session, lease)
            signal = None
        observe_load(perf_counter_ns() - t0)  # includes waiting for promotions (not for pipelined ones)
        return {"offsets": offsets, "tiers": bytes(tiers), "lease": lease, "signal": signal}

    def release(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "lease")
        return {"released": manager.release(_session(conn), arg_int(args, "lease"))}

    def ping(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args)
        return {}

    def observe(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """The engine computed `tokens` tokens after `depth` of context in `seconds` (one step)."""
        only_args(args, "tokens", "depth", "seconds")
        tokens, depth = arg_int(args, "tokens"), arg_int(args, "depth")
        if not 0 < tokens <= 1 << 24 or not 0 <= depth <= 1 << 32:
            raise ProtocolError(f"tokens must be 1..{1 << 24} and depth 0..{1 << 32}")
        seconds = args.get("seconds")
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds < 3600:
            raise ProtocolError("seconds must be a number of seconds in (0, 3600)")  # NaN fails too
        manager.worth.observe_prefill(_session(conn).ns.id, tokens, depth, float(seconds))
        return {}

    def report_load(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """The engine's running and waiting requests and queued prefill tokens (and its URL), for `where`."""
        only_args(args, "running", "waiting", "queued_prefill_tokens", "url")
        load, session = EngineLoad.from_wire(args), _session(conn)
        if engine_events is not None:
            engine_events.report_load(session, load)
        return {}

    handlers: dict[str, Handler] = {
        P.Op.HELLO.value: hello,
        P.Op.LOOKUP.value: lookup,
        P.Op.RESERVE.value: reserve,
        P.Op.COMMIT.value: commit,
        P.Op.ABORT.value: abort,
        P.Op.LOAD.value: load,
        P.Op.RELEASE.value: release,
        P.Op.PING.value: ping,  # on the loop: a ping answered says the loop is alive
        P.Op.OBSERVE.value: observe,
        P.Op.REPORT_LOAD.value: report_load,
    }
    return EngineAPI(handlers, {P.Op.LOOKUP.value: lookup_on_thread})

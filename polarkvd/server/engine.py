"""The engine API: the ops an inference engine's connector calls over the engine socket.

Owns argument validation and the mapping of wire requests onto Manager calls; owns no state beyond
which session a connection is. One connection is one session: when it closes (the engine exited or
was killed), the session's reservations are aborted and its leases dropped at once.
"""

from __future__ import annotations

from time import perf_counter_ns
from collections.abc import Awaitable
from typing import Any

from polarkvd.errors import ErrorCode, PolarKVError, ProtocolError
from polarkvd.manager import Manager, Session
from polarkvd.metrics import OpTimings
from polarkvd.server import protocol as P
from polarkvd.server.connection import Connection, Handler, arg_bool, arg_int, only_args
from polarkvd.types import KEY_BYTES, Namespace, Tier


def _session(conn: Connection) -> Session:
    if conn.session is None:
        raise PolarKVError(
            "send hello (namespace, engine id) before any other engine op", code=ErrorCode.NO_SESSION
        )
    return conn.session


def engine_handlers(
    manager: Manager,
    *,
    arena_path: str,
    arena_size: int,
    max_keys: int,
    timings: OpTimings | None = None,
) -> dict[str, Handler]:
    # Latency of the data-path ops, for metrics: a perf_counter_ns pair and a lock-free histogram
    # add (docs/METRICS.md has the measured cost). Failed requests are not timed.
    timings = timings if timings is not None else OpTimings()
    observe_lookup = timings["lookup"].observe_ns
    observe_reserve = timings["reserve"].observe_ns
    observe_commit = timings["commit"].observe_ns
    observe_load = timings["load"].observe_ns

    def keys(args: dict[str, Any]) -> list[bytes]:
        if "keys" not in args:
            raise ProtocolError("missing keys")
        return P.unpack_keys(args["keys"], max_keys)

    def hello(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "namespace", "engine_id")
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
        session = manager.attach(ns, engine_id)
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

    async def lookup_cluster(
        session: Session, ks: list[bytes], tiers: list[Tier], lease: int | None, t0: int
    ) -> dict[str, Any]:
        tiers = await manager.lookup_remote(session, ks, tiers)
        observe_lookup(perf_counter_ns() - t0)
        return {"tiers": bytes(tiers), "lease": lease}

    def reserve(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        t0 = perf_counter_ns()
        only_args(args, "keys", "parent")
        parent = args.get("parent")
        if parent is not None and (not isinstance(parent, bytes) or len(parent) != KEY_BYTES):
            raise ProtocolError("parent must be a 16-byte key or nil")
        out = {"offsets": manager.reserve(_session(conn), keys(args), parent)}
        observe_reserve(perf_counter_ns() - t0)
        return out

    def commit(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        t0 = perf_counter_ns()
        only_args(args, "keys")
        out = {"committed": manager.commit(_session(conn), keys(args))}
        observe_commit(perf_counter_ns() - t0)
        return out

    def abort(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "keys")
        return {"aborted": manager.abort(_session(conn), keys(args))}

    async def load(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        t0 = perf_counter_ns()
        only_args(args, "keys")
        offsets, tiers, lease = await manager.load(_session(conn), keys(args))
        if conn.closed and lease is not None:  # the engine left while we read from disk
            manager.release(conn.session, lease)
        observe_load(perf_counter_ns() - t0)  # includes waiting for promotions from disk
        return {"offsets": offsets, "tiers": bytes(tiers), "lease": lease}

    def release(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "lease")
        return {"released": manager.release(_session(conn), arg_int(args, "lease"))}

    def ping(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args)
        return {}

    return {
        P.Op.HELLO.value: hello,
        P.Op.LOOKUP.value: lookup,
        P.Op.RESERVE.value: reserve,
        P.Op.COMMIT.value: commit,
        P.Op.ABORT.value: abort,
        P.Op.LOAD.value: load,
        P.Op.RELEASE.value: release,
        P.Op.PING.value: ping,
    }

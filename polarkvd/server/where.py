"""`where`: how much of a prompt's prefix is cached here, by tier, and on which other members.

Owns the control op's argument checks (a namespace by digest or by model and salt; token ids or page
keys), the local answer (the manager's pure lookup probe: no page is touched, pinned or counted) and
the per-member prefix lengths from the meta map's records (`cluster/pool/locate.py` `leading`, passed
in by the daemon: this package does not import the cluster), the attached engines' own caches and
last load reports (`engine_events.py`), and the same query over HTTP (`http_route`, served beside
/metrics). docs/ROUTING.md says how a router uses it and gives the reply field by field.
"""

from __future__ import annotations

import array
import asyncio
import concurrent.futures
import inspect
import json
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import numpy as np

from polarkvd.errors import ErrorCode, NamespaceError, PolarKVError, ProtocolError
from polarkvd.keys import page_keys
from polarkvd.manager import Manager
from polarkvd.manager.records import NamespaceInfo
from polarkvd.server.connection import Connection, Handler, only_args
from polarkvd.server.engine_events import EngineEvents
from polarkvd.types import KEY_BYTES, Tier
from polarkvd.wire import frames as P

#: (keys) -> per member (ourselves included), how many leading keys the meta map's owners say it
#: holds; the owners are asked at the call, the awaitable gives their answers
Leading = Callable[[list[bytes]], Awaitable[Mapping[str, int]]]

_TIER_NAMES = {Tier.VRAM: "l1", Tier.DRAM: "dram", Tier.DISK: "disk"}


def _namespace(manager: Manager, args: dict[str, Any]) -> NamespaceInfo:
    if ("namespace" in args) == ("model" in args):
        raise ProtocolError("give either namespace (a 16-byte digest, or 32 hex digits) or model (and salt)")
    known = manager.namespaces
    if "namespace" in args:
        value = args["namespace"]
        if isinstance(value, str):
            try:
                value = bytes.fromhex(value)
            except ValueError:
                raise ProtocolError("namespace must be 16 bytes or 32 hex digits") from None
        if not isinstance(value, bytes) or len(value) != KEY_BYTES:
            raise ProtocolError("namespace must be 16 bytes or 32 hex digits")
        info = known.get(value)
        if info is None:
            raise NamespaceError(
                f"namespace {value.hex()} is not known here (no engine of it attached since the start)"
            )
        return info
    model, salt = args["model"], args.get("salt", "")
    if not isinstance(model, str) or not model or not isinstance(salt, str):
        raise ProtocolError("model must be a non-empty string, salt a string")
    found = [i for i in known.values() if i.ns.model == model and i.ns.cache_salt == salt]
    if not found:
        raise NamespaceError(f"no namespace of model {model!r:.80} with this salt is known here")
    if len(found) > 1:
        options = ", ".join(f"{i.digest.hex()} (tp rank {i.ns.tp_rank}, {i.ns.dtype})" for i in found[:8])
        raise PolarKVError(
            f"model {model!r:.80} has {len(found)} namespaces here; name one: {options}",
            code=ErrorCode.NAMESPACE,
        )
    return found[0]


def _keys(manager: Manager, info: NamespaceInfo, args: dict[str, Any]) -> list[bytes]:
    if ("tokens" in args) == ("keys" in args):
        raise ProtocolError("give either tokens (token ids) or keys (16-byte page keys)")
    limit = manager.cfg.daemon.max_keys_per_request
    if "keys" in args:
        return P.unpack_keys(args["keys"], limit)
    tokens = args["tokens"]
    if isinstance(tokens, bytes):  # packed: uint32 little-endian, no per-id msgpack work
        if len(tokens) % 4:
            raise ProtocolError("packed tokens must be a multiple of 4 bytes (uint32 little-endian)")
        tokens = np.frombuffer(tokens, "<u4")
    elif not isinstance(tokens, list):
        raise ProtocolError("tokens must be an array of token ids, or bytes of packed uint32")
    page_tokens = info.ns.page_tokens
    if len(tokens) > limit * page_tokens:
        raise PolarKVError(
            f"{len(tokens)} tokens exceed the limit of {limit * page_tokens}", code=ErrorCode.TOO_LARGE
        )
    if isinstance(tokens, np.ndarray):
        return list(page_keys(info.digest, tokens, page_tokens))
    try:  # array's C loop both converts and range-checks (floats, strings, lists: TypeError)
        arr = np.frombuffer(array.array("I", tokens), np.uint32)
    except (TypeError, OverflowError):
        raise ProtocolError("tokens must be integers from 0 to 2**32 - 1") from None
    return list(page_keys(info.digest, arr, page_tokens))


def _local(
    manager: Manager, engines: EngineEvents | None, info: NamespaceInfo, keys: list[bytes]
) -> dict[str, Any]:
    """The answer without the cluster: this host's tiers and its engines' own caches."""
    pt = info.ns.page_tokens
    tiers, _ = manager.lookups.probe(info, keys)
    here = {"tokens": len(tiers) * pt, "l1": 0, "dram": 0, "disk": 0}
    for t in tiers:
        here[_TIER_NAMES[t]] += pt
    out: dict[str, Any] = {
        "namespace": info.digest.hex(),
        "model": info.ns.model,
        "page_tokens": pt,
        "tokens": len(keys) * pt,
        "here": here,
    }
    if engines is not None:
        out["engines"] = {e: n * pt for e, n in sorted(engines.leading(info.digest, keys).items())}
        out["engine_load"] = dict(sorted(engines.loads(info.digest).items()))
    return out


def where_handler(
    manager: Manager,
    cluster: Callable[[], tuple[str, Leading] | None] | None,
    engines: EngineEvents | None = None,
) -> Handler:
    """The `where` op. `cluster` gives this member's id and the meta map's query while a cluster
    runs (else None); `engines`, the GPU prefix caches of engines that publish their KV events."""

    async def where(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "namespace", "model", "salt", "tokens", "keys")
        info = _namespace(manager, args)
        keys = _keys(manager, info, args)
        member = cluster() if cluster is not None else None
        if member is None:
            return _local(manager, engines, info, keys)
        me, query = member
        asked = query(keys)  # the owners work while we answer our part
        try:
            out = _local(manager, engines, info, keys)
        except BaseException:
            if inspect.iscoroutine(asked):
                asked.close()
            raise
        nodes = await asked
        pt = info.ns.page_tokens
        out["node"] = me
        out["cluster"] = {node: pages * pt for node, pages in sorted(nodes.items()) if node != me}
        return out

    return where


# ------------------------------------------------------------------------------ over HTTP

_HTTP_ARGS = ("namespace", "model", "salt", "tokens", "keys")
HTTP_TIMEOUT = 30.0


def _http_args(method: str, query: str, body: bytes) -> dict[str, Any]:
    """The op's arguments from `GET /where?...` (tokens and keys comma-separated) or `POST /where`
    (a JSON object; keys as hex strings). Raises ProtocolError naming what is wrong."""
    if method == "POST":
        if body.count(b"[") + body.count(b"{") > 16:  # nested: deep JSON recurses, wide costs ~25x in objects
            raise ProtocolError("the body must be a JSON object whose tokens or keys are flat arrays")
        try:
            args = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ProtocolError(f"the body must be a JSON object: {e}") from None
        if not isinstance(args, dict):
            raise ProtocolError("the body must be a JSON object")
    else:
        try:
            pairs = urllib.parse.parse_qsl(
                query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=16
            )
        except ValueError as e:
            raise ProtocolError(f"bad query string: {e}") from None
        args = {}
        for name, value in pairs:
            if name in args:
                raise ProtocolError(f"{name} is given twice")
            args[name] = value
        for name in ("tokens", "keys"):
            if isinstance(args.get(name), str):
                args[name] = [t for t in args[name].replace(",", " ").split()]
        if isinstance(args.get("tokens"), list):
            try:
                args["tokens"] = [int(t) for t in args["tokens"]]
            except ValueError:
                raise ProtocolError("tokens must be integers from 0 to 2**32 - 1, comma-separated") from None
    unknown = sorted(set(args) - set(_HTTP_ARGS))
    if unknown:
        raise ProtocolError(f"unknown arguments {unknown}; known: {', '.join(_HTTP_ARGS)}")
    if "keys" in args:
        keys = args["keys"]
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ProtocolError("keys must be page keys as 32 hex digits each")
        try:
            args["keys"] = [bytes.fromhex(k) for k in keys]
        except ValueError:
            raise ProtocolError("keys must be page keys as 32 hex digits each") from None
    return args


def http_route(
    loop: asyncio.AbstractEventLoop,
    where: Callable[[Any, dict[str, Any]], Any],
    timeout: float = HTTP_TIMEOUT,
) -> Callable[[str, str, bytes], tuple[int, Any]]:
    """`where` for the HTTP endpoint (metrics.MetricsServer.route), run on the daemon's loop: the
    same answer as the control op, as JSON; 400 for a bad request, 404 for an unknown namespace,
    405 for another method than GET or POST, 503 after `timeout` (the query is then cancelled),
    each with {"error": what is wrong, "code": ...}."""

    def route(method: str, query: str, body: bytes) -> tuple[int, Any]:
        if method not in ("GET", "POST"):
            return 405, {"error": f"{method} is not allowed: GET /where?... or POST /where with JSON"}
        try:
            args = _http_args(method, query, body)

            abandoned = threading.Event()

            async def run() -> dict[str, Any]:
                if abandoned.is_set():  # the loop got to it after the client was told 503
                    raise asyncio.CancelledError
                out = where(None, args)
                return await out if inspect.isawaitable(out) else out

            answer = asyncio.run_coroutine_threadsafe(run(), loop)
            try:
                return 200, answer.result(timeout)
            except concurrent.futures.TimeoutError:
                abandoned.set()  # nobody waits for it any more: not to be started or finished
                answer.cancel()
                raise
        except NamespaceError as e:
            return 404, {"error": str(e), "code": e.code.value}
        except PolarKVError as e:
            return 400, {"error": str(e), "code": e.code.value}
        except concurrent.futures.TimeoutError:
            return 503, {"error": f"no answer within {timeout:g} s"}

    return route

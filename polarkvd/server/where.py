"""`where`: how much of a prompt's prefix is cached here, by tier, and on which other members.

Owns the control op's argument checks (a namespace by digest or by model and salt; token ids or page
keys), the local answer (the manager's pure lookup probe: no page is touched, pinned or counted) and
the per-member prefix lengths from the meta map's records (`cluster/pool/locate.py` `holders`, passed
in by the daemon: this package does not import the cluster). docs/ROUTING.md says how a router uses it.
"""

from __future__ import annotations

import array
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

#: (keys) -> holders per key index, as the meta map's owners answer (ourselves included)
Holders = Callable[[list[bytes]], Awaitable[Mapping[int, tuple[str, ...]]]]

_TIER_NAMES = {Tier.VRAM: "l1", Tier.DRAM: "dram", Tier.DISK: "disk"}


def leading_by_node(n: int, holders: Mapping[int, tuple[str, ...]], exclude: str = "") -> dict[str, int]:
    """Per member, how many of keys 0, 1, ... it holds without a gap (keys chain: a gap ends its
    usable prefix); members that hold key 0 only are listed. Consecutive keys mostly have the same
    holders: the set is narrowed only where they change."""
    running = {h for h in holders.get(0, ()) if h != exclude}
    counts = dict.fromkeys(running, 0)
    prev: tuple[str, ...] | None = None
    i = 0
    get = holders.get
    while i < n and running:
        here = get(i, ())
        if here != prev:
            for h in [h for h in running if h not in here]:
                running.discard(h)
                counts[h] = i
            prev = here
        i += 1
    for h in running:
        counts[h] = i
    return counts


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


def where_handler(
    manager: Manager,
    cluster: Callable[[], tuple[str, Holders] | None] | None,
    engines: EngineEvents | None = None,
) -> Handler:
    """The `where` op. `cluster` gives this member's id and the meta map's query while a cluster
    runs (else None); `engines`, the GPU prefix caches of engines that publish their KV events."""

    async def where(conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        only_args(args, "namespace", "model", "salt", "tokens", "keys")
        info = _namespace(manager, args)
        keys = _keys(manager, info, args)
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
        member = cluster() if cluster is not None else None
        if member is not None:
            me, query = member
            found = await query(keys) if keys else {}
            nodes = leading_by_node(len(keys), found, exclude=me)
            out["node"] = me
            out["cluster"] = {node: pages * pt for node, pages in sorted(nodes.items())}
        return out

    return where

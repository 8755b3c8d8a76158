"""Where this vLLM publishes its KV cache events, as the daemon can reach them.

vLLM with `--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'` publishes
its GPU prefix cache's changes (BlockStored, BlockRemoved, AllBlocksCleared) on a ZeroMQ PUB socket,
with an optional ROUTER for replay. The scheduler side passes those endpoints at `hello` (for the
default namespace: events of salted requests belong to other namespaces and are skipped by the
daemon anyway), and the daemon follows them (polarkvd/server/engine_events.py): `polarkvd where`
then says how much of a prompt each engine's GPU still holds (docs/ROUTING.md).

vLLM binds a wildcard (`tcp://*:5557`) or an ipc endpoint, and connects to any other (a subscriber
that binds); the daemon runs on the same host, so a wildcard becomes 127.0.0.1. Endpoints the daemon
cannot reach (inproc, a port 0 the OS picks, a connecting publisher) are not passed, with one log
line saying why.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("vllm.polarkvd.connector")


def _reachable(endpoint: str | None, dp_rank: int) -> str | None:
    """The address the daemon connects to for a publisher endpoint vLLM binds, or None."""
    if not endpoint:
        return None
    if dp_rank and endpoint.startswith("tcp://"):  # vLLM offsets the port by the data-parallel rank
        host, _, port = endpoint.rpartition(":")
        if not port.isdigit() or int(port) == 0:
            return None
        endpoint = f"{host}:{int(port) + dp_rank}"
    elif dp_rank and endpoint.startswith("ipc://"):
        return None  # vLLM appends a suffix we do not mirror here
    if endpoint.startswith("ipc://"):
        return endpoint
    if not endpoint.startswith("tcp://"):
        return None  # inproc: inside vLLM's process only
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return None
    if host in ("*", "0.0.0.0"):
        return f"tcp://127.0.0.1:{port}"
    if host in ("[::]", "::", "[*]"):
        return f"tcp://[::1]:{port}"
    return None  # a named host: vLLM connects there instead of binding


def kv_events_spec(vllm_config: Any) -> dict[str, str] | None:
    """`hello`'s `kv_events` for this engine, or None when it publishes none the daemon can follow."""
    cfg = getattr(vllm_config, "kv_events_config", None)
    if cfg is None or not getattr(cfg, "enable_kv_cache_events", False) or cfg.publisher != "zmq":
        return None
    # vLLM offsets the port by the data-parallel index (the scheduler's EventPublisherFactory.create)
    parallel = getattr(vllm_config, "parallel_config", None)
    dp_rank = getattr(parallel, "data_parallel_index", getattr(parallel, "data_parallel_rank", 0)) or 0
    endpoint = _reachable(cfg.endpoint, dp_rank)
    if endpoint is None:
        logger.info(
            "polarkvd: vLLM's KV events at %s cannot be followed by the daemon (bind a wildcard "
            "tcp://*:PORT or an ipc:// path); `polarkvd where` will not see this engine's GPU cache",
            cfg.endpoint,
        )
        return None
    spec = {"endpoint": endpoint}
    replay = _reachable(cfg.replay_endpoint, dp_rank)
    if replay is not None:
        spec["replay_endpoint"] = replay
    if cfg.topic:
        spec["topic"] = cfg.topic
    return spec

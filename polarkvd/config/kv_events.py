"""The `[kv_events]` section: publishing this daemon's page changes as vLLM KV events.

Only the options and how their values are parsed; the publisher is `polarkvd/server/kv_events.py`
and what a router does with the events is docs/ROUTING.md.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from polarkvd.config.options import option as _opt
from polarkvd.config.values import parse_bool, parse_duration, parse_int, parse_str

_ENDPOINT = re.compile(r"(tcp://(\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}|ipc://.+|inproc://.+)")


def parse_endpoint(value: object) -> str:
    """A ZeroMQ address the daemon binds: tcp://HOST:PORT (HOST may be `*`), ipc://PATH, inproc://NAME."""
    text = parse_str(value).strip()
    m = _ENDPOINT.fullmatch(text)
    if m is None or (text.startswith("tcp://") and not 0 <= int(text.rsplit(":", 1)[1]) <= 65535):
        raise ValueError("expected a ZeroMQ endpoint to bind: tcp://HOST:PORT, tcp://*:PORT or ipc://PATH")
    return text


def _replay_endpoint(value: object) -> str:
    text = parse_str(value).strip()
    return parse_endpoint(text) if text else ""


def _count(most: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        out = parse_int(value)
        if not 1 <= out <= most:
            raise ValueError(f"expected an integer from 1 to {most}")
        return out

    return parse


def _interval(value: object) -> float:
    out = parse_duration(value)
    if not 0.001 <= out <= 10:
        raise ValueError("expected a duration from 1ms to 10s")
    return out


def _topic(value: object) -> str:
    text = parse_str(value)
    if len(text.encode()) > 256:
        raise ValueError("at most 256 bytes")
    return text


@dataclasses.dataclass
class KvEventsConfig:
    enabled: bool = _opt(
        False, parse_bool, "publish this daemon's page changes as vLLM KVEventBatch messages"
    )
    endpoint: str = _opt(
        "tcp://127.0.0.1:5570",
        parse_endpoint,
        "ZeroMQ PUB address the daemon binds (tcp://*:PORT for all interfaces)",
    )
    replay_endpoint: str = _opt(
        "tcp://127.0.0.1:5571",
        _replay_endpoint,
        "ZeroMQ ROUTER address for replay requests (missed batches by sequence number); empty = no replay",
    )
    topic: str = _opt("", _topic, "the first frame of every message (llm-d reads kv@POD@MODEL)")
    buffer_steps: int = _opt(10_000, _count(10_000_000), "batches kept for replay")
    hwm: int = _opt(100_000, _count(10_000_000), "ZeroMQ high-water mark of the PUB socket (messages)")
    interval: float = _opt(0.05, _interval, "how often changes are gathered into one batch")
    int_hashes: bool = _opt(
        False,
        parse_bool,
        "block hashes as integers: the key's last 8 bytes, big-endian (vLLM's VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES)",
    )

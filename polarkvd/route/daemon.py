"""The router's daemon: `where` for its prompts, the engines found from the cluster, and each
engine's own host's tiers in a `where` answer.

Owns the control-socket client the router uses (one thread at a time, reconnected after a failure),
discovery (`discover`: the engines attached to the asked daemon that report the URL they serve at,
from `where`'s `engine_load`, and every other member's, from the `engines` its gossip metadata
publishes, `server/engine_events.py`), and `host_tiers`. Blocking: the router calls it in worker
threads, never on its loop.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

#: An engine's host when it is the asked daemon's (in a cluster or not); else the member's id.
LOCAL = ""


@dataclasses.dataclass(frozen=True, order=True)
class Found:
    """An engine some daemon of the cluster reports: the URL it serves at, and its host."""

    url: str
    node: str  # LOCAL, or the id of the member whose daemon it is attached to


def _url(value: object) -> str | None:
    if not isinstance(value, str) or len(value) > 512:
        return None
    url = value.rstrip("/")
    parts = urlsplit(url)
    return url if parts.scheme in ("http", "https") and parts.hostname else None


class DaemonWhere:
    """The daemon's `where` for the router's prompts, and `discover` (called from worker threads)."""

    def __init__(self, socket: str, model: str | None, salt: str, timeout: float = 2.0) -> None:
        from polarkvd.client import ControlClient

        self._new: Callable[[], Any] = lambda: ControlClient(socket, timeout=timeout)
        self._lock = threading.Lock()
        self._client: Any = None
        self.model, self.salt = model, salt

    def _namespace_args(self, c: Any) -> dict[str, Any]:
        if self.model is None:
            models = {s.get("model") for s in c.stats().get("sessions", []) if s.get("model")}
            if len(models) != 1:
                raise RuntimeError(f"the daemon serves {len(models)} models; name one with --daemon-model")
            self.model = models.pop()
        return {"model": self.model, "salt": self.salt}

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        with self._lock:
            try:
                if self._client is None:
                    self._client = self._new()
                return fn(self._client)
            except Exception:
                if self._client is not None:
                    self._client.close()
                self._client = None
                raise

    def __call__(self, tokens: list[int]) -> dict[str, Any]:
        return dict(self._call(lambda c: c.where({**self._namespace_args(c), "tokens": tokens})))

    def discover(self) -> list[Found]:
        """Every engine of the router's model that a daemon of the cluster reports with its URL:
        this daemon's from `where` (at once), the other members' from their gossip metadata (a
        member republishes it within a few seconds of a change). An engine on two lists is this
        daemon's. Raises what the daemon raised (the caller keeps its engines meanwhile)."""

        def ask(c: Any) -> tuple[dict[str, Any], dict[str, Any]]:
            return dict(c.where({**self._namespace_args(c), "tokens": []})), dict(c.cluster())

        ans, rep = self._call(ask)
        digest = str(ans.get("namespace", ""))
        found: dict[str, Found] = {}
        for load in (ans.get("engine_load") or {}).values():
            url = _url(load.get("url")) if isinstance(load, dict) else None
            if url is not None:
                found[url] = Found(url, LOCAL)
        if rep.get("enabled"):
            for m in rep.get("members") or []:
                if (
                    m.get("self")
                    or m.get("state") not in ("alive", "suspect")
                    or not isinstance(m.get("node"), str)
                ):
                    continue
                engines = (m.get("meta") or {}).get("engines")
                if not isinstance(engines, dict):
                    continue
                for value, tag in engines.items():
                    url = _url(value)
                    if (
                        url is not None
                        and url not in found
                        and isinstance(tag, str)
                        and tag
                        and digest.startswith(tag)
                    ):
                        found[url] = Found(url, m["node"])
        return sorted(found.values())


def host_tiers(answer: dict[str, Any] | None, node: str) -> dict[str, int]:
    """An engine's host tiers and pool for one prompt, in tokens, from one daemon's `where` answer:
    for an engine on the asked daemon's host (`LOCAL`), that host's L1 + DRAM and disk, and the
    best other member as the pool; for one on member `node`, what the meta map says that member
    holds (any of its tiers: counted as DRAM) and the best of the others, the asked host included."""
    if not answer:
        return {"dram": 0, "disk": 0, "pool": 0}
    here = answer.get("here") or {}
    members = {str(m): int(t) for m, t in (answer.get("cluster") or {}).items()}
    if node == LOCAL or node == answer.get("node"):
        return {
            "dram": int(here.get("l1", 0)) + int(here.get("dram", 0)),
            "disk": int(here.get("disk", 0)),
            "pool": max(members.values(), default=0),
        }
    others = [t for m, t in members.items() if m != node] + [int(here.get("tokens", 0))]
    return {"dram": members.get(node, 0), "disk": 0, "pool": max(others)}

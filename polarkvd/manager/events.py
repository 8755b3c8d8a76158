"""What happened to pages here, as typed events that their consumers drain.

The manager's parts emit an event for every change others must follow: a copy of a page arrived in
a tier (committed, promoted, moved between L1 and DRAM, written to disk), a copy left a tier
(evicted, moved), a namespace became known (its disk pages can be served from now on), the disk
tier dropped pages. A consumer subscribes once and drains its own queue (`Subscription.take`)
before it answers anything that depends on them; the cluster pool keeps the meta map this way. The
manager does not know who listens, and emits nothing while nobody does.

Emitting is loop-only, except `DiskPagesRemoved`, which the disk tier's threads emit; a deque's
append and popleft are atomic, so that needs no lock.
"""

from __future__ import annotations

import collections
import dataclasses

from polarkvd.types import Tier


@dataclasses.dataclass(frozen=True, slots=True)
class PageStored:
    """A copy of `key` is now in `tier` on this host."""

    key: bytes
    tier: Tier


@dataclasses.dataclass(frozen=True, slots=True)
class PageRemoved:
    """The copy of `key` in `tier` on this host is gone (other tiers may still hold one)."""

    key: bytes
    tier: Tier


@dataclasses.dataclass(frozen=True, slots=True)
class NamespaceKnown:
    """An engine attached to a namespace new to this daemon: its pages on disk can be served now."""

    digest: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class DiskPagesRemoved:
    """The disk tier dropped these pages (evicted, corrupt, removed by the operator)."""

    keys: tuple[bytes, ...]


Event = PageStored | PageRemoved | NamespaceKnown | DiskPagesRemoved


class Subscription:
    """One consumer's queue of events, oldest first."""

    def __init__(self) -> None:
        self._queue: collections.deque[Event] = collections.deque()

    def take(self) -> list[Event]:
        """Every event since the last take, in the order they happened."""
        queue, out = self._queue, []
        while queue:
            out.append(queue.popleft())
        return out

    def put(self, event: Event) -> None:
        self._queue.append(event)

    @property
    def pending(self) -> bool:
        """Whether events wait to be taken (safe to ask from any thread)."""
        return bool(self._queue)


class EventLog:
    """Fan-out of the manager's events to its subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[Subscription] = []

    def subscribe(self) -> Subscription:
        sub = Subscription()
        self._subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)

    @property
    def wanted(self) -> bool:
        """Whether anyone listens: emitters skip building events otherwise (the store path)."""
        return bool(self._subscribers)

    def emit(self, event: Event) -> None:
        for sub in self._subscribers:
            sub.put(event)

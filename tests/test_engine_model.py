"""A stateful model of the engine API: random sequences of hello, reserve, commit, abort, lookup,
load, release and close over several sessions in two namespaces, against one real daemon, each step
checked against a reference model of what engines rely on: every loaded page has exactly the bytes
committed under its key; a leased page stays until released; a reserved page is invisible and an
aborted one never appears; a committed page is visible to its namespace and to no other.

The daemon's DRAM is tiny (16 slots of one page size, no disk), so reserves evict often. The model
stays exact: after any step that may have evicted, it asks the daemon which pages are left
(one-key lookups) and checks that the arena dropped only what it had to, only unpinned pages, leaves
first, and said "no space" only when nothing could go.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from polarkvd.client import ControlClient, EngineClient
from polarkvd.errors import ErrorCode, LeaseExpired, NamespaceError, PolarKVError
from polarkvd.types import Namespace, Tier
from polarkvd.wire.frames import Reserved
from tests.conftest import DaemonProc, chain_tokens, wait_for

#: Two tenants of one model: 4 KiB pages (one slot each), the same tokens give different keys.
NAMESPACES = [
    Namespace(
        "model-test@0", "bfloat16", "test/v1", num_layers=1, num_kv_heads=1, head_dim=64, page_tokens=16,
        cache_salt=salt,
    )
    for salt in ("tenant-a", "tenant-b")
]  # fmt: skip
PAGE = NAMESPACES[0].page_bytes
SLOTS = 8  # the whole arena, in pages: far fewer than the 26 distinct keys below, so reserves evict
SLAB_PAGES = 4
MAX_SESSIONS = 4  # engine sessions a run opens at once (besides one observer per namespace)
DAEMON = {
    "dram.capacity": str(SLOTS * PAGE),
    "dram.slab_bytes": str(SLAB_PAGES * PAGE),
    "disk.enabled": "false",  # an evicted page is gone: the model knows exactly what is cached
    "daemon.lease_seconds": "3600s",  # leases and reservations never expire during a run
    "daemon.log_level": "info",
}


def budget(examples: int, steps: int) -> settings:
    """The default run's size; `--hypothesis-profile=explore` (tests/conftest.py) searches longer."""
    if settings.default.derandomize:
        return settings(max_examples=examples, stateful_step_count=steps)
    return settings()


@dataclasses.dataclass
class World:
    """What lives for the whole module: the daemon, its control socket, and per namespace an observer
    session that asks the daemon itself (no shared lookup table) which pages it holds."""

    daemon: DaemonProc
    control: ControlClient
    observers: list[EngineClient]
    chains: list[list[list[bytes]]]  # [namespace][chain] -> keys; chains 0 and 1 share two pages


@pytest.fixture(scope="module")
def world(module_daemon_factory) -> Iterator[World]:
    d = module_daemon_factory(DAEMON, name="model")
    observers = [d_engine(d, ns, "observer", lookup_table=False) for ns in NAMESPACES]
    t0, t1, t2 = chain_tokens(1, 5), chain_tokens(2, 3), chain_tokens(3, 5)
    tokens = [t0, t0[: 2 * 16] + t1, t2]
    chains = [[kv.page_keys(t) for t in tokens] for kv in observers]
    with d.control() as ctl:
        yield World(d, ctl, observers, chains)
    for kv in observers:
        kv.close()


def d_engine(d: DaemonProc, ns: Namespace, engine_id: str, lookup_table: bool) -> EngineClient:
    return EngineClient(ns, engine_id, d.engine_socket, timeout=60, lookup_table=lookup_table)


def content(key: bytes, seed: int) -> bytes:
    """The bytes a run writes under `key` (a different seed, different bytes: a stale page shows)."""
    rng = np.random.default_rng([seed, int.from_bytes(key[:8], "little")])
    return rng.bytes(PAGE)


@dataclasses.dataclass(eq=False)
class Session:
    kv: EngineClient
    ns: int
    leases: dict[int, list[bytes]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)
class Page:
    ns: int
    parent: bytes | None  # as the daemon records it: the key before this one in its reserve
    offset: int
    data: bytes
    owner: Session | None = None  # while reserved
    linked: bool = False  # counted among its parent's children (committed while the parent was)


SESSION = st.integers(0, MAX_SESSIONS - 1)

# Preconditions keep the steps a run draws to those that do something.
has_session = precondition(lambda self: bool(self.sessions))
has_reserved = precondition(lambda self: bool(self.reserved))
has_lease = precondition(lambda self: any(s.leases for s in self.sessions))
CHAIN = st.integers(0, 2)
START = st.integers(0, 4)
COUNT = st.integers(1, 5)


class EngineModel(RuleBasedStateMachine):
    def __init__(self, world: World) -> None:
        super().__init__()
        self.w = world
        self.sessions: list[Session] = []
        self.reserved: dict[bytes, Page] = {}
        self.committed: dict[bytes, Page] = {}  # exactly the pages the daemon holds
        self.pins: collections.Counter[bytes] = collections.Counter()

    # ------------------------------------------------------------------ the model's own rules

    def keys(self, ns: int, chain: int, start: int, n: int) -> list[bytes]:
        return self.w.chains[ns][chain][start : start + n]

    def children(self) -> dict[bytes, list[bytes]]:
        kids: dict[bytes, list[bytes]] = collections.defaultdict(list)
        for key, page in self.committed.items():
            if page.linked and page.parent is not None:
                kids[page.parent].append(key)
        return kids

    def droppable(self) -> set[bytes]:
        """Committed pages a full arena may drop, leaf first: unpinned, and so is every child."""
        kids = self.children()
        memo: dict[bytes, bool] = {}

        def ok(key: bytes) -> bool:
            if key not in memo:
                memo[key] = self.pins[key] == 0 and all(ok(c) for c in kids[key])
            return memo[key]

        return {k for k in self.committed if ok(k)}

    def visible(self, ns: int, keys: list[bytes]) -> int:
        """Length of the longest prefix of `keys` committed in namespace `ns`."""
        n = 0
        for key in keys:
            page = self.committed.get(key)
            if page is None or page.ns != ns:
                break
            n += 1
        return n

    def settle_evictions(self, droppable: set[bytes], expected: int, gone: list[bytes]) -> None:
        """After a step that may have evicted: find which committed pages the daemon dropped (`gone`:
        those already known), and check there are `expected` of them, all droppable, leaves first."""
        for key in list(self.committed):
            page = self.committed[key]
            if self.w.observers[page.ns].lookup([key]).hits == 0:
                gone.append(key)
        kids = self.children()
        for key in gone:
            assert key in droppable, f"page {key.hex()} was evicted while pinned or under a pinned child"
            kept = [c for c in kids[key] if c not in gone]
            assert not kept, f"page {key.hex()} was evicted before its child {kept[0].hex()}"
        assert len(gone) == expected, f"{len(gone)} pages evicted to make room for {expected}"
        for key in gone:
            self.committed.pop(key, None)

    def offsets_in_use(self) -> set[int]:
        """Slots nobody else may be handed: reserved ones, and those of pages pinned by a lease."""
        pinned = {self.committed[k].offset for k, n in self.pins.items() if n and k in self.committed}
        return {p.offset for p in self.reserved.values()} | pinned

    # ------------------------------------------------------------------ sessions

    @initialize(table=st.booleans())
    def two_tenants(self, table: bool) -> None:
        for ns in (0, 1):
            self.hello(ns, table)

    @precondition(lambda self: len(self.sessions) < MAX_SESSIONS)
    @rule(ns=st.integers(0, 1), table=st.booleans())
    def hello(self, ns: int, table: bool) -> None:
        kv = d_engine(self.w.daemon, NAMESPACES[ns], f"model-{len(self.sessions)}", table)
        self.sessions.append(Session(kv, ns))

    @precondition(lambda self: len(self.sessions) > 1)
    @rule(s=SESSION)
    def close(self, s: int) -> None:
        sess = self.sessions[s % len(self.sessions)]
        self.sessions.remove(sess)
        sess.kv.close()
        wait_for(
            lambda: all(x["id"] != sess.kv.session_id for x in self.w.control.stats()["sessions"]),
            what="the daemon to see the session close",
        )
        # its reservations are aborted and its leases dropped
        for key in [k for k, p in self.reserved.items() if p.owner is sess]:
            del self.reserved[key]
        for keys in sess.leases.values():
            self.pins.subtract(keys)

    # ------------------------------------------------------------------ store

    @has_session
    @rule(s=SESSION, chain=CHAIN, start=START, n=COUNT, rooted=st.booleans(), seed=st.integers(0, 3))
    def reserve(self, s: int, chain: int, start: int, n: int, rooted: bool, seed: int) -> None:
        """Reserve and write pages, to commit or abort later (or never: the session may close)."""
        self._reserve(self.sessions[s % len(self.sessions)], chain, start, n, rooted, seed)

    @has_session
    @rule(s=SESSION, chain=CHAIN, start=START, n=COUNT, rooted=st.booleans(), seed=st.integers(0, 3))
    def store(self, s: int, chain: int, start: int, n: int, rooted: bool, seed: int) -> None:
        """Reserve, write and commit, as `EngineClient.store` does."""
        sess = self.sessions[s % len(self.sessions)]
        keys = self._reserve(sess, chain, start, n, rooted, seed)
        if keys:
            self._commit(sess, keys)

    def _reserve(self, sess: Session, chain: int, start: int, n: int, rooted: bool, seed: int) -> list[bytes]:
        """Reserve and write the pages; returns the keys that got a slot."""
        keys = self.keys(sess.ns, chain, start, n)
        parent = self.w.chains[sess.ns][chain][start - 1] if start and rooted else None
        used = len(self.reserved) + len(self.committed)
        droppable = self.droppable()
        taken = self.offsets_in_use()
        offsets = sess.kv.reserve(keys, parent)
        assert len(offsets) == len(keys), offsets
        prev, got, gone, no_space = parent, [], [], False
        for i, (key, off) in enumerate(zip(keys, offsets)):
            if off == Reserved.NO_SPACE:
                assert set(offsets[i:]) == {Reserved.NO_SPACE}, f"no space, then a slot: {offsets}"
                no_space = True
                break
            if off == Reserved.EXISTS:
                assert key in self.reserved or key in self.committed, (
                    f"key {i} reported as cached but was never committed, or was aborted: {offsets}"
                )
                prev = key
                continue
            assert 0 <= off <= (SLOTS - 1) * PAGE and off % PAGE == 0, f"offset {off} outside the arena"
            assert key not in self.reserved, f"key {i} reserved twice: {offsets}"
            assert off not in taken, f"slot {off} handed out while reserved or pinned: {offsets}"
            if key in self.committed:  # evicted by this very reserve, for an earlier key
                gone.append(key)
                del self.committed[key]
            data = content(key, seed)
            sess.kv.page(off)[:] = data
            self.reserved[key] = Page(sess.ns, prev, off, data, owner=sess)
            taken.add(off)
            got.append(key)
            prev = key
        evicted = max(0, used + len(got) - SLOTS)
        if evicted or gone or no_space:
            self.settle_evictions(droppable, evicted, gone)
        if no_space:
            assert len(self.reserved) + len(self.committed) == SLOTS, "no space with free slots left"
            kids = self.children()
            leaves = [k for k in self.committed if self.pins[k] == 0 and not kids[k]]
            assert not leaves, f"no space, but {len(leaves)} unpinned leaf pages could have gone"
        return got

    @has_reserved
    @rule(
        s=SESSION,
        picks=st.lists(st.integers(0, 15), min_size=1, max_size=6),
        op=st.sampled_from(["commit", "abort"]),
        bad=st.sampled_from(["", "", "twice", "foreign"]),
        foreign=st.tuples(st.integers(0, 1), CHAIN, START),
    )
    def finish(self, s: int, picks: list[int], op: str, bad: str, foreign: tuple[int, int, int]) -> None:
        """Commit or abort some of a session's reservations. `bad`: with a key twice, or with a key it
        did not reserve (another's reservation, a committed page, a fresh key): refused, nothing changes."""
        holders = [x for x in self.sessions if any(p.owner is x for p in self.reserved.values())]
        sess = holders[s % len(holders)]
        mine = [k for k, p in self.reserved.items() if p.owner is sess]
        keys = list(dict.fromkeys(mine[i % len(mine)] for i in picks))
        other = self.w.chains[foreign[0]][foreign[1]][foreign[2]]
        if bad == "foreign" and other not in mine:
            with pytest.raises(PolarKVError) as e:
                getattr(sess.kv, op)(keys + [other])
            assert e.value.code == ErrorCode.NOT_RESERVED, e.value
        elif bad == "twice":
            with pytest.raises(PolarKVError) as e:
                getattr(sess.kv, op)(keys + keys[:1])
            assert e.value.code == ErrorCode.BAD_REQUEST, e.value
        elif op == "commit":
            self._commit(sess, keys)
        else:
            assert sess.kv.abort(keys) == len(keys)
            for key in keys:
                del self.reserved[key]

    def _commit(self, sess: Session, keys: list[bytes]) -> None:
        assert sess.kv.commit(keys) == len(keys)
        for key in keys:  # in order: a parent committed earlier in the same call links its child
            page = self.reserved.pop(key)
            page.owner = None
            parent = self.committed.get(page.parent) if page.parent is not None else None
            page.linked = parent is not None
            self.committed[key] = page

    # ------------------------------------------------------------------ read

    @has_session
    @rule(
        s=SESSION,
        other=st.booleans(),
        chain=CHAIN,
        start=START,
        n=COUNT,
        mix=st.booleans(),
        pin=st.booleans(),
    )
    def lookup(self, s: int, other: bool, chain: int, start: int, n: int, mix: bool, pin: bool) -> None:
        sess = self.sessions[s % len(self.sessions)]
        keys = self.keys(sess.ns ^ other, chain, start, n)
        if mix:  # the same pages of the other tenant after them: never a hit
            keys += self.keys(1 - sess.ns, chain, start, n)
        r = sess.kv.lookup(keys, pin=pin)
        expected = self.visible(sess.ns, keys)
        assert r.hits == expected, f"lookup hit {r.hits} pages, the model says {expected}"
        assert r.tiers == [Tier.DRAM] * expected
        if pin and expected:
            assert r.lease is not None and r.lease not in sess.leases
            sess.leases[r.lease] = keys[:expected]
            self.pins.update(keys[:expected])
        else:
            assert r.lease is None

    @has_session
    @rule(
        s=SESSION,
        other=st.booleans(),
        chain=CHAIN,
        start=START,
        n=COUNT,
        mix=st.booleans(),
        keep=st.booleans(),
    )
    def load(self, s: int, other: bool, chain: int, start: int, n: int, mix: bool, keep: bool) -> None:
        sess = self.sessions[s % len(self.sessions)]
        keys = self.keys(sess.ns ^ other, chain, start, n)
        if mix:
            keys += self.keys(1 - sess.ns, chain, start, n)
        expected = self.visible(sess.ns, keys)
        stop = keys[expected] if expected < len(keys) else None
        if stop is not None and stop in self.committed:  # another tenant's page: refused, nothing pinned
            with pytest.raises(NamespaceError):
                sess.kv.load(keys)
            return
        r = sess.kv.load(keys)
        assert r.loaded == expected, f"loaded {r.loaded} pages, the model says {expected}"
        assert r.tiers == [Tier.DRAM] * expected
        for i, (key, view) in enumerate(zip(keys, r.views)):
            assert bytes(view) == self.committed[key].data, f"page {i} of the load has other bytes"
        del r.views
        if not expected:
            assert r.lease is None
        elif keep:
            assert r.lease is not None and r.lease not in sess.leases
            sess.leases[r.lease] = keys[:expected]
            self.pins.update(keys[:expected])
        else:
            assert r.lease is not None
            sess.kv.release(r.lease)

    @has_session
    @rule(s=SESSION, i=st.integers(0, 7), whose=st.sampled_from(["mine", "mine", "other", "never"]))
    def release(self, s: int, i: int, whose: str) -> None:
        """Release a lease. Another session's lease, or one never given out: not found, pins stay."""
        sess = self.sessions[s % len(self.sessions)]
        theirs = [
            lease for x in self.sessions if x is not sess for lease in x.leases if lease not in sess.leases
        ]
        if whose == "mine" and sess.leases:
            lease = list(sess.leases)[i % len(sess.leases)]
            sess.kv.release(lease)
            self.pins.subtract(sess.leases.pop(lease))
        else:
            with pytest.raises(LeaseExpired):
                sess.kv.release(theirs[i % len(theirs)] if whose == "other" and theirs else 1 << 40)

    # ------------------------------------------------------------------ operator

    @precondition(lambda self: len(self.committed) > SLOTS // 2)
    @rule(pages=st.integers(1, 6))
    def operator_evict(self, pages: int) -> None:
        droppable = self.droppable()
        freed = self.w.control.evict("dram", pages * PAGE)
        expected = min(pages, len(droppable))
        assert freed == expected * PAGE, f"evict freed {freed} bytes, the model says {expected} pages"
        self.settle_evictions(droppable, expected, [])

    # ------------------------------------------------------------------ always

    @invariant()
    def daemon_agrees(self) -> None:
        dram = self.w.control.stats()["tiers"]["dram"]
        assert dram["pages"] == len(self.committed)
        assert dram["reserved_pages"] == len(self.reserved)
        assert dram["pinned_pages"] == sum(len(k) for s in self.sessions for k in s.leases.values())
        assert dram["slot_bytes_used"] == (len(self.reserved) + len(self.committed)) * PAGE

    @invariant()
    def every_tenant_sees_exactly_its_pages(self) -> None:
        for ns, observer in enumerate(self.w.observers):
            for chains in self.w.chains:
                for keys in chains:
                    assert observer.lookup(keys).hits == self.visible(ns, keys)

    def teardown(self) -> None:
        """Leave the daemon as the next run expects it: no engine sessions, nothing cached."""
        for sess in self.sessions:
            sess.kv.close()
        ctl, ids = self.w.control, {kv.session_id for kv in self.w.observers}
        wait_for(lambda: {x["id"] for x in ctl.stats()["sessions"]} == ids, what="the sessions to close")
        ctl.evict("dram", 1 << 30)
        dram = ctl.stats()["tiers"]["dram"]
        assert (dram["pages"], dram["reserved_pages"], dram["pinned_pages"], dram["slot_bytes_used"]) == (
            0,
            0,
            0,
            0,
        ), dram


def test_engine_api_follows_the_model(world: World) -> None:
    """The default run is derandomized (the same sequences every time, so CI never fails on a case
    an unrelated change happened to draw); `--hypothesis-profile=explore` draws new ones."""
    run_state_machine_as_test(lambda: EngineModel(world), settings=budget(examples=100, steps=50))

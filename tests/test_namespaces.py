"""Namespaces at the edge: hello refuses over-long strings (they would be held and logged), and the
daemon forgets a namespace no engine uses once none of its pages is in memory, while its pages on
disk are found again by the next engine that attaches to it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from polarkvd.client import EngineClient
from polarkvd.errors import NamespaceError
from polarkvd.types import STRING_LIMITS, Tier
from tests.conftest import TEST_NS, bad_pages, page_bytes_for, wait_for

BAD_FIELDS = {  # id: (field, value, what the error says)
    "model-1MiB": ("model", "m" * (1 << 20), "model must be at most 1024 characters, got 1048576"),
    "layout-129": ("layout", "l" * 129, "layout must be at most 128 characters, got 129"),
    "salt-4097": ("cache_salt", "s" * 4097, "cache_salt must be at most 4096 characters, got 4097"),
    "model-int": ("model", 12345, "model must be a string, got int"),
    "dtype-100k": ("dtype", "d" * 100_000, "dtype 'ddddd"),
    "layers-list": ("num_layers", list(range(100_000)), "num_layers must be an integer"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_hello_refuses_overlong_or_mistyped_namespace_strings(daemon, case) -> None:
    """A 1 MiB model name was accepted, held for good and logged whole at attach."""
    field, value, message = BAD_FIELDS[case]
    ns = dataclasses.replace(TEST_NS, **{field: value})
    with pytest.raises(NamespaceError, match=message) as e:
        EngineClient(ns, "long", daemon.engine_socket, timeout=30)
    assert len(str(e.value)) < 400  # the value is not echoed back whole
    assert "m" * 2000 not in daemon.log() and "d" * 2000 not in daemon.log()
    with daemon.engine() as kv:  # the daemon serves on; the refused namespace was never held
        kv.ping()
        assert daemon.stats()["namespaces"] == 1


def test_strings_at_the_limits_are_accepted(daemon) -> None:
    ns = dataclasses.replace(TEST_NS, **{name: "x" * most for name, most in STRING_LIMITS.items()})
    with EngineClient(ns, "at-the-limit", daemon.engine_socket, timeout=30) as kv:
        kv.ping()
    assert f"model {'x' * 200}," in daemon.log()  # logged shortened
    assert "x" * 201 not in daemon.log()


def test_namespaces_without_sessions_or_pages_in_memory_are_forgotten(daemon) -> None:
    """60 hellos with distinct namespaces, then disconnects, left 60 namespaces behind for good."""
    with daemon.engine(engine_id="steady") as steady:  # an engine that stays: its namespace stays
        base = daemon.stats()["namespaces"]
        assert base == 1
        for i in range(60):
            with EngineClient(
                dataclasses.replace(TEST_NS, model=f"made-up-{i}"), "tmp", daemon.engine_socket
            ) as kv:
                kv.ping()
        wait_for(lambda: daemon.stats()["namespaces"] == base, what="idle namespaces to be forgotten")
        st = daemon.stats()
        assert st["counters"]["namespaces_forgotten"] == 60
        assert [t["model"] for t in st["namespace_stats"]] == [TEST_NS.model]
        steady.ping()


def test_a_namespace_comes_back_with_its_disk_pages(daemon) -> None:
    """Pages keep their namespace while in memory; once they are on disk only, the namespace goes, and
    an engine attaching to it again finds and loads them from disk."""
    ns = dataclasses.replace(TEST_NS, model="comes-back@1")
    with EngineClient(ns, "first", daemon.engine_socket) as kv:
        keys = kv.page_keys(np.arange(4 * ns.page_tokens))
        assert kv.store(keys, [page_bytes_for(k, kv.page_bytes) for k in keys]).stored == 4
    st = daemon.stats()
    assert st["namespaces"] == 1  # its pages are in DRAM: still needed to write them to disk
    with daemon.control() as ctl:
        assert ctl.evict("dram", 1 << 40) == 4 * ns.page_bytes
    wait_for(lambda: daemon.stats()["counters"].get("demoted_pages", 0) == 4, what="demotion to disk")
    wait_for(lambda: daemon.stats()["namespaces"] == 0, what="the namespace to be forgotten")
    for lookup_table in (True, False):  # answered by the engine from the shared table, then by the daemon
        with EngineClient(ns, "again", daemon.engine_socket, lookup_table=lookup_table) as kv:
            assert kv.lookup(keys).tiers == [Tier.DISK] * 4
            r = kv.load(keys)
            assert r.loaded == 4
            assert bad_pages(kv, keys, r.views) == []
            del r.views
            kv.release(r.lease)
        with daemon.control() as ctl:  # loaded pages were promoted to DRAM: down to disk again
            ctl.evict("dram", 1 << 40)
        wait_for(lambda: daemon.stats()["namespaces"] == 0, what="the namespace to be forgotten again")

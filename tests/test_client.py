"""Client-side behaviour an engine relies on: shared arena mappings, lookup-only clients."""

from __future__ import annotations

import dataclasses
import os
import signal

import numpy as np
import pytest

from polarkvd.client import EngineClient, _ArenaMaps
from polarkvd.errors import DaemonUnavailable, PolarKVError
from tests.conftest import TEST_NS


def test_sessions_of_one_process_share_one_arena_mapping(daemon) -> None:
    salted = dataclasses.replace(TEST_NS, cache_salt="tenant-a")
    with daemon.engine() as a, daemon.engine(salted) as b:
        assert a._arena_id == b._arena_id and len(_ArenaMaps._maps) == 1
        keys = b.page_keys(np.arange(32))
        page = np.full(b.page_bytes, 7, np.uint8)
        assert b.store(keys, [page, page]).stored == 2
        out = [bytearray(b.page_bytes) for _ in keys]
        assert b.load_into(keys, out) == 2 and out[1] == page.tobytes()
        assert a.lookup(a.page_keys(np.arange(32))).hits == 0  # other salt: other keys
    assert not _ArenaMaps._maps  # the last close unmapped it


def test_a_restarted_daemon_is_mapped_afresh(daemon) -> None:
    """A new arena file at the same path must never be confused with the unlinked old one."""
    with daemon.engine() as kv:
        old = kv._arena_id
        assert not kv.connection_lost()  # open and idle
        kv.ping()
        assert not kv.connection_lost()
        daemon.stop()
        assert kv.connection_lost()  # what the vLLM connector checks before it reuses a session
        daemon.start()
        assert kv.connection_lost()  # the new daemon does not adopt the old connection
        with daemon.engine() as kv2:
            assert kv2._arena_id != old
            keys = kv2.page_keys(np.arange(16))
            page = np.full(kv2.page_bytes, 3, np.uint8)
            assert kv2.store(keys, [page]).stored == 1
            out = bytearray(kv2.page_bytes)
            assert kv2.load_into(keys, [out]) == 1 and out == page.tobytes()


def test_lookup_only_client_maps_nothing_and_refuses_byte_ops(daemon) -> None:
    with daemon.engine() as writer:
        keys = writer.page_keys(np.arange(16))
        writer.store(keys, [np.zeros(writer.page_bytes, np.uint8)])
        scheduler = EngineClient(TEST_NS, "scheduler", daemon.engine_socket, map_arena=False)
        try:
            assert scheduler.lookup(keys).hits == 1
            with pytest.raises(PolarKVError):
                scheduler.load(keys)
            with pytest.raises(PolarKVError):
                scheduler.store(keys, [np.zeros(writer.page_bytes, np.uint8)])
        finally:
            scheduler.close()
        assert daemon.stats()["leases"] == 0  # the refused load pinned nothing


def test_a_daemon_that_stops_answering_times_out_with_a_clear_error(daemon) -> None:
    """A hung daemon (SIGSTOP) must not hang the engine: the call fails after the client's timeout."""
    kv = EngineClient(TEST_NS, "t", daemon.engine_socket, timeout=0.5)
    try:
        kv.ping()
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(DaemonUnavailable, match=r"did not answer ping within 0.5s"):
                kv.ping()
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
    finally:
        kv.close()

"""A hostile or broken KV event publisher at the address an engine gave at `hello`: an address
ZeroMQ refuses, a replay socket nobody listens on, a replay that never ends. The daemon answers a
clear error, never blocks its loop, and keeps following the live stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import msgpack
import pytest
import zmq

from polarkvd.client import EngineClient
from polarkvd.errors import ErrorCode, PolarKVError
from polarkvd.keys import page_keys
from polarkvd.server import engine_events
from polarkvd.server.engine_events import EngineEventsSubscriber, GpuPrefixes
from tests.conftest import TEST_NS, chain_tokens, store_chain

DIGEST = bytes(range(16))
PT = 16


@pytest.mark.parametrize(
    "kv_events",
    [
        {"endpoint": "tcp://127.0.0.1:notaport"},
        {"endpoint": "ipc://"},
        {"endpoint": "ipc://" + "x" * 200},
        {"endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:nope"},
    ],
    ids=["port not a number", "empty ipc path", "ipc path too long", "bad replay address"],
)
def test_an_address_zeromq_refuses_gets_bad_request_and_no_session(daemon, kv_events) -> None:
    with pytest.raises(PolarKVError) as e:
        EngineClient(TEST_NS, "bad-events", daemon.engine_socket, timeout=10, kv_events=kv_events)
    assert e.value.code == ErrorCode.BAD_REQUEST and "ZeroMQ refuses" in str(e.value)
    assert daemon.stats()["sessions"] == []  # the failed hello attached nothing
    with daemon.engine() as kv:  # and the daemon serves engines as before
        keys = store_chain(kv, chain_tokens(3, 2))
        assert len(kv.lookup(keys).tiers) == 2
    assert "internal error" not in daemon.log()


@pytest.fixture
def pub() -> Iterator[tuple[zmq.Socket, str]]:
    """A publisher of our own: vLLM's always answers replay, this one is the broken engine."""
    s = zmq.Context.instance().socket(zmq.PUB)
    s.setsockopt(zmq.LINGER, 0)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    yield s, f"tcp://127.0.0.1:{port}"
    s.close(linger=0)


def dead_address() -> str:
    """A TCP address nobody listens on (bound, then closed)."""
    with zmq.Context.instance().socket(zmq.PUB) as s:
        port = s.bind_to_random_port("tcp://127.0.0.1")
    return f"tcp://127.0.0.1:{port}"


def stored(tokens: list[int], first: int, parent: object) -> dict:
    n = len(tokens) // PT
    return {
        "type": "BlockStored", "block_hashes": [first + i for i in range(n)], "parent_block_hash": parent,
        "token_ids": tokens, "block_size": PT, "medium": "GPU",
    }  # fmt: skip


def send(pub: zmq.Socket, seq: int, *events: dict) -> None:
    pub.send_multipart([b"", seq.to_bytes(8, "big"), msgpack.packb([time.time(), list(events), 0])])


def test_a_replay_nobody_answers_is_given_up_and_the_live_stream_followed(pub) -> None:
    sock, address = pub
    now = [0.0]
    view = GpuPrefixes(DIGEST, PT)
    sub = EngineEventsSubscriber(address, dead_address(), view, clock=lambda: now[0])
    try:
        tokens = chain_tokens(1, 4)
        keys = page_keys(DIGEST, tokens, PT)
        deadline = time.monotonic() + 10
        while view.leading(keys) < 4:  # the first batches wait for the replay of 0.. that never comes
            assert time.monotonic() < deadline, (sub.counters, view.counters)
            send(sock, 1, stored(tokens, 0, None))  # seq 0 was "lost"
            sub.tick()
            now[0] += 1.0  # ... until the replay is given up (the clock, not the batch count)
            time.sleep(0.01)
        assert sub.counters["replays_given_up"] >= 1
    finally:
        sub.close()


def test_replay_requests_to_a_dead_address_never_block_the_loop(pub, monkeypatch) -> None:
    """ZeroMQ queues requests to an address nobody listens on; past its high-water mark a blocking
    send would stop the daemon's loop for good. Every gap asks for a replay (given up at once here)."""
    monkeypatch.setattr(engine_events, "MAX_HELD_BACK", 0)
    sock, address = pub
    sub = EngineEventsSubscriber(address, dead_address(), GpuPrefixes(DIGEST, PT))
    done = threading.Event()

    def run() -> None:
        for seq in range(0, 2 * 3000, 2):  # >1000 gaps: more than the replay socket's 1000 queued messages
            send(sock, seq)
            while sub.counters["batches"] < seq // 2:  # the last one may be held back for a replay
                sub.tick()
        done.set()

    t = threading.Thread(target=run, daemon=True)
    time.sleep(0.3)  # the SUB socket's slow join
    t.start()
    t.join(60)
    try:
        assert done.is_set(), f"tick blocked: {sub.counters}"
        assert sub.counters["gaps"] >= 1000
    finally:
        if done.is_set():
            sub.close()


def hwm_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_message_that_decodes_to_millions_of_objects_is_dropped(daemon, pub) -> None:
    """15 MiB of empty msgpack arrays would be 15M Python lists (about 1 GB, and a second of the
    daemon's loop); the daemon drops the message and follows the stream on."""
    sock, address = pub
    tokens = chain_tokens(9, 4)
    with EngineClient(
        TEST_NS, "bomber", daemon.engine_socket, timeout=10, kv_events={"endpoint": address}
    ) as kv:
        digest = kv.ns_digest.hex()

    def held(n_tokens: int, seq: int, event: dict) -> None:
        deadline = time.monotonic() + 30
        while True:
            send(sock, seq, event)
            with daemon.control() as c:
                got = c.where({"namespace": digest, "tokens": tokens})["engines"].get("bomber", 0)
            if got == n_tokens:
                return
            assert time.monotonic() < deadline, got
            time.sleep(0.1)

    with EngineClient(TEST_NS, "bomber", daemon.engine_socket, timeout=10, kv_events={"endpoint": address}):
        held(2 * PT, 0, stored(tokens[: 2 * PT], 0, None))  # subscribed: the first two pages are seen
        before = hwm_mib(daemon.proc.pid)
        n = (15 << 20) - 32
        bomb = b"\x93\xcb" + bytes(8) + b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n + b"\x00"
        sock.send_multipart([b"", (1).to_bytes(8, "big"), bomb])
        held(4 * PT, 2, stored(tokens[2 * PT :], 2, 1))  # the stream is followed past it
        grown = hwm_mib(daemon.proc.pid) - before
    assert grown < 400, f"the daemon's peak memory grew {grown:.0f} MiB"

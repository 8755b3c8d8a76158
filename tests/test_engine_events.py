"""Events in: vLLM's own publisher (`ZmqEventPublisher`, real sockets) → the daemon's view of that
engine's GPU prefix cache, in polarkvd keys: stores, evictions, a clear, and a late subscriber that
recovers the earlier batches through the replay socket."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from polarkvd.keys import page_keys
from polarkvd.server.engine_events import EngineEventsSubscriber, GpuPrefixes
from tests.conftest import chain_tokens

kv_events = pytest.importorskip("vllm.distributed.kv_events", reason="vLLM's publisher produces the stream")

pytestmark = pytest.mark.slow  # importing vLLM takes seconds

DIGEST = bytes(range(16))
PT = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def publisher() -> Iterator[tuple[object, str, str]]:
    import zmq

    for attempt in range(5):  # a free port can be taken by another process before vLLM binds it
        port, replay = free_port(), f"tcp://127.0.0.1:{free_port()}"
        try:
            # a wildcard address: vLLM binds it (a named host it would connect to, for a binding subscriber)
            p = kv_events.ZmqEventPublisher(0, endpoint=f"tcp://*:{port}", replay_endpoint=replay)
            break
        except zmq.ZMQError:
            if attempt == 4:
                raise
    yield p, f"tcp://127.0.0.1:{port}", replay
    p.shutdown()


def vllm_blocks(tokens: list[int], block: int, first: int = 0, parent: bytes | None = None):
    """A BlockStored as vLLM's scheduler emits it: hashes of its own (anything unique will do here)."""
    n = len(tokens) // block
    hashes = [f"h{first + i}".encode() for i in range(n)]
    return kv_events.BlockStored(
        block_hashes=hashes, parent_block_hash=parent, token_ids=tokens[: n * block], block_size=block,
        lora_id=None, medium="GPU", lora_name=None,
    ), hashes  # fmt: skip


def follow(sub: EngineEventsSubscriber, until, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; counters {sub.counters} {sub.prefixes.counters}")
        sub.tick()
        time.sleep(0.01)


def publish(p, *events) -> None:
    p.publish(kv_events.KVEventBatch(ts=time.time(), events=list(events)))


@pytest.mark.parametrize("block", [16, 8, 32], ids=["block=page", "two blocks a page", "two pages a block"])
def test_gpu_view_follows_stores_evictions_and_clears(publisher, block: int) -> None:
    p, pub, replay = publisher
    tokens = chain_tokens(1, 8)
    keys = page_keys(DIGEST, tokens, PT)
    view = GpuPrefixes(DIGEST, PT)
    sub = EngineEventsSubscriber(pub, replay, view)
    try:
        time.sleep(0.3)  # ZeroMQ's slow joiner: what it misses here, replay brings back anyway
        first, hashes = vllm_blocks(tokens[: 4 * PT], block)  # a request's first 4 pages
        publish(p, first)
        follow(sub, lambda: view.leading(keys) == 4)
        more, more_hashes = vllm_blocks(tokens[4 * PT :], block, first=len(hashes), parent=hashes[-1])
        publish(p, more)  # its continuation, chained from the parent's hash
        follow(sub, lambda: view.leading(keys) == 8)
        # evicting the blocks of page 5 on: the engine's prefix is 5 pages
        gone = more_hashes[(PT * 5 - 4 * PT) // block :] if block <= PT else more_hashes[1:]
        publish(p, kv_events.BlockRemoved(block_hashes=gone, medium="GPU"))
        expect = 5 if block <= PT else 6
        follow(sub, lambda: view.leading(keys) == expect)
        publish(p, kv_events.AllBlocksCleared())
        follow(sub, lambda: view.leading(keys) == 0 and len(view) == 0)
    finally:
        sub.close()


def test_a_late_subscriber_recovers_through_replay(publisher) -> None:
    p, pub, replay = publisher
    tokens = chain_tokens(2, 6)
    keys = page_keys(DIGEST, tokens, PT)
    first, hashes = vllm_blocks(tokens[: 3 * PT], PT)
    publish(p, first)  # nobody listens yet
    time.sleep(0.2)
    view = GpuPrefixes(DIGEST, PT)
    sub = EngineEventsSubscriber(pub, replay, view)
    try:
        time.sleep(0.3)
        more, _ = vllm_blocks(tokens[3 * PT :], PT, first=3, parent=hashes[-1])
        publish(p, more)  # seq 1 arrives first: a gap, so seq 0 is replayed, then seq 1 applies
        follow(sub, lambda: view.leading(keys) == 6)
        assert sub.counters["replayed"] >= 1  # the first batch came through the replay socket
    finally:
        sub.close()


def test_blocks_of_another_namespace_or_with_an_unknown_parent_are_skipped() -> None:
    view = GpuPrefixes(DIGEST, PT)
    tokens = chain_tokens(3, 2)
    salted = {"type": "BlockStored", "block_hashes": [b"a"], "parent_block_hash": None, "token_ids": tokens[:PT],
              "block_size": PT, "lora_id": None, "medium": "GPU", "lora_name": None, "extra_keys": [("salt",)]}  # fmt: skip
    orphan = {**salted, "extra_keys": None, "parent_block_hash": b"never-seen"}
    view.apply([salted, orphan, {"type": "Nonsense"}, "junk"])
    assert len(view) == 0
    assert view.counters["skipped_blocks"] == 2 and view.counters["bad"] == 2


def test_where_reports_an_attached_engines_gpu_prefix(publisher, daemon) -> None:
    """An engine that attaches with its publisher's address: the daemon follows its GPU cache, and
    `where` answers how much of a prompt that engine's GPU holds."""
    from polarkvd.errors import PolarKVError
    from tests.conftest import TEST_NS

    p, pub, replay = publisher
    tokens = chain_tokens(6, 5)
    wildcard = {"endpoint": pub.replace("127.0.0.1", "*"), "replay_endpoint": replay}  # as vLLM names it
    with daemon.engine(engine_id="gpu-0") as _plain, daemon.control() as c:
        from polarkvd.client import EngineClient

        with EngineClient(TEST_NS, "gpu-1", daemon.engine_socket, kv_events=wildcard) as kv:
            first, _ = vllm_blocks(tokens[: 3 * TEST_NS.page_tokens], TEST_NS.page_tokens)
            publish(p, first)
            query = {"namespace": kv.ns_digest.hex(), "tokens": tokens}
            deadline = time.monotonic() + 10
            while c.where(query)["engines"] != {"gpu-1": 3 * TEST_NS.page_tokens}:
                assert time.monotonic() < deadline, c.where(query)
                # the engine keeps publishing: a later batch shows a gap if the first was missed
                publish(p, kv_events.BlockRemoved(block_hashes=[b"none"], medium="GPU"))
                time.sleep(0.05)
            # with its load, the blocks its cache holds (a router weighs evictions by them)
            kv.report_load(1, 0, 100)
            assert c.where(query)["engine_load"]["gpu-1"]["gpu_blocks"] == 3
        # detached (its connection closed, which the daemon sees a moment later): no longer followed
        deadline = time.monotonic() + 10
        while c.where(query)["engines"] != {}:
            assert time.monotonic() < deadline, c.where(query)
            time.sleep(0.05)
        with pytest.raises(PolarKVError, match="kv_events"):
            EngineClient(TEST_NS, "bad", daemon.engine_socket, kv_events={"endpoint": "http://x"})


def test_an_engine_storing_more_blocks_than_the_bound_is_not_followed_past_it(monkeypatch) -> None:
    """A publisher that never removes anything cannot grow the daemon's memory: past MAX_BLOCKS
    its further stores are skipped and counted, and what was followed stays right."""
    from polarkvd.server import engine_events

    monkeypatch.setattr(engine_events, "MAX_BLOCKS", 8)
    g = GpuPrefixes(DIGEST, PT)
    tokens = chain_tokens(3, 16, PT)
    first = {"type": "BlockStored", "block_hashes": [f"a{i}" for i in range(6)], "parent_block_hash": None,
             "token_ids": tokens[: 6 * PT], "block_size": PT, "medium": "GPU"}  # fmt: skip
    more = {"type": "BlockStored", "block_hashes": [f"a{i}" for i in range(6, 12)], "parent_block_hash": "a5",
            "token_ids": tokens[6 * PT : 12 * PT], "block_size": PT, "medium": "GPU"}  # fmt: skip
    g.apply([first, more])
    assert g.counters["stored_blocks"] == 6 and g.counters["skipped_blocks"] == 6
    keys = page_keys(DIGEST, tokens[: 12 * PT], PT)
    assert g.leading(keys) == 6

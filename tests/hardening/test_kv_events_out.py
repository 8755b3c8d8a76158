"""The daemon's own KV event publisher under a flood of replay requests (any local process can send
them): each asks for the whole replay buffer; the daemon's loop must go on serving its sockets."""

from __future__ import annotations

import time

import pytest
import zmq

from polarkvd.client import ControlClient
from tests.conftest import chain_tokens, store_chain
from tests.test_kv_events import free_port


@pytest.mark.slow
def test_a_flood_of_replay_requests_does_not_stop_the_loop(daemon_factory) -> None:
    pub, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    d = daemon_factory(
        {
            "kv_events.enabled": "true",
            "kv_events.endpoint": pub,
            "kv_events.replay_endpoint": replay,
            "kv_events.interval": "1ms",
            "kv_events.buffer_steps": "2000",
        }
    )
    with d.engine() as kv:
        for i in range(3000):  # a batch each, or nearly: the replay buffer fills
            store_chain(kv, chain_tokens(100 + i, 1))
            time.sleep(0.001)
    asker = zmq.Context.instance().socket(zmq.DEALER)
    asker.setsockopt(zmq.LINGER, 0)
    asker.setsockopt(zmq.RCVHWM, 10)  # it never reads: what it asked for is dropped at its end
    asker.connect(replay)
    try:
        for _ in range(3000):  # each: every batch from 0 (~2000 x 3000 messages in all)
            asker.send_multipart([b"", (0).to_bytes(8, "big")])
        with ControlClient(d.control_socket, timeout=10) as c:  # the loop still answers meanwhile
            for _ in range(20):
                c.ping()
            assert c.stats()["sessions"] == []
    finally:
        asker.close(linger=0)

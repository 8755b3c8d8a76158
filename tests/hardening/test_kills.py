"""A daemon SIGKILLed at a random moment of work other than a store (tests/test_durable.py has those):
while it promotes pages from disk for loads and evicts DRAM to disk (with a full disk tier, evicting
disk pages too), and while it serves a peer's fetch. After each restart every page it serves has the bytes that were stored (or is
a miss: what was lost is recomputed), and it keeps serving. The kill point is drawn at random; set
POLARKV_TEST_SEED to draw others. A few iterations in the default suite, many under `slow`.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from polarkvd.errors import PolarKVError
from tests.cluster.test_daemons import Cluster
from tests.conftest import bad_pages, chain_tokens, store_chain, wait_for

SEED = int(os.environ.get("POLARKV_TEST_SEED", "7"))
CHAINS = 12
PAGES = 8


def _check(kv, keys: list[bytes]) -> int:  # type: ignore[no-untyped-def]
    """Load `keys`: what is served must be the stored bytes. How many pages were served."""
    res = kv.load(keys)
    try:
        assert bad_pages(kv, keys[: res.loaded], res.views[: res.loaded]) == [], "wrong bytes after a kill"
        return res.loaded
    finally:
        del res.views
        if res.lease is not None:
            kv.release(res.lease)


def _busy(d, chains: list[list[bytes]], rng: random.Random, stop: threading.Event) -> None:  # type: ignore[no-untyped-def]
    """Promotions (loads of disk pages) and evictions of DRAM to disk until the daemon dies."""
    try:
        with d.engine(engine_id="busy") as kv, d.control() as ctl:
            while not stop.is_set():
                what = rng.random()
                if what < 0.6:
                    _check(kv, rng.choice(chains))
                else:
                    ctl.evict("dram", rng.randrange(1, 64) << 15)
    except (PolarKVError, OSError):
        pass  # the kill cut the connection; wrong bytes before it fail the test (an AssertionError)


def _kill_during_disk_work(daemon_factory, iterations: int, disk: str = "256MiB") -> None:  # type: ignore[no-untyped-def]
    """`disk`: the disk tier's capacity; below the 3 MiB the pages take, demotions evict disk pages."""
    rng = random.Random(SEED)
    d = daemon_factory({"disk.index_flush_seconds": "200ms", "disk.capacity": disk})
    served = []
    for it in range(iterations):
        with d.engine() as kv, d.control() as ctl:  # every page stored (again) and on disk
            chains = [store_chain(kv, chain_tokens(700 + i, PAGES)) for i in range(CHAINS)]
            ctl.evict("dram", 1 << 40)
            wait_for(lambda: d.stats()["tiers"]["disk"]["pending_pages"] == 0, 15, "the disk writes")
        stop = threading.Event()
        errors: list[BaseException] = []

        def work(
            stop: threading.Event = stop, errors: list[BaseException] = errors, chains: list = chains
        ) -> None:
            try:
                _busy(d, chains, random.Random(rng.random()), stop)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        t = threading.Thread(target=work)
        t.start()
        time.sleep(rng.uniform(0.05, 0.6))
        d.kill()
        stop.set()
        t.join(30)
        assert not errors, f"iteration {it}: {errors[0]!r}"
        d.start()
        with d.engine() as kv:
            n = sum(_check(kv, keys) for keys in chains)
        served.append(n)
    print(f"pages served after each of {iterations} kills: {served}")
    assert d.proc.poll() is None
    if disk == "256MiB":  # every page was synced to disk before the kill: none may be lost
        assert served == [CHAINS * PAGES] * iterations


def test_daemon_killed_while_promoting_and_evicting_serves_exact_bytes(daemon_factory) -> None:
    _kill_during_disk_work(daemon_factory, iterations=3)


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["256MiB", "2MiB"], ids=["roomy-disk", "full-disk"])
def test_daemon_killed_at_20_random_moments_of_disk_work(daemon_factory, disk: str) -> None:
    _kill_during_disk_work(daemon_factory, iterations=20, disk=disk)


@pytest.mark.slow
@pytest.mark.cluster
def test_holder_killed_while_serving_a_fetch_then_restarted(daemon_factory, tmp_path) -> None:
    """The holder dies at a random moment of a peer's fetch (and of its own disk promotions for it):
    the fetch ends early with exact bytes; once restarted (its disk pages found again), the peer
    loads the whole prefix with exact bytes."""
    rng = random.Random(SEED)
    cluster = Cluster.keyed(daemon_factory, tmp_path)
    a, b = cluster.add("a"), cluster.add("b", disk__enabled="false")
    cluster.wait_converged(["a", "b"])
    for it in range(4):
        with a.engine() as kv, a.control() as ctl:  # (again: a SIGKILL loses a's DRAM pages)
            keys = store_chain(kv, chain_tokens(800, 600))
            ctl.evict("dram", rng.randrange(0, 600) << 15)  # some on disk: promoted for the peer
        with b.engine() as kv, b.control() as ctl:
            ctl.evict("dram", 1 << 40)
            with a.engine(engine_id="ns"):  # a knows the namespace: its disk pages are offered
                wait_for(lambda k=keys: kv.lookup(k).hits > 0, 20, "b to find a's pages")
                killer = threading.Timer(rng.uniform(0.0, 0.4), a.kill)
                killer.start()
                got = _check(kv, keys)
                killer.join()
            print(f"iteration {it}: {got} of {len(keys)} pages before the holder died")
        a.start()
        cluster.wait_converged(["a", "b"], timeout=30)
    with b.engine() as kv, a.engine(engine_id="ns") as akv:
        _check(kv, keys)  # what survived on a's disk: exact bytes
        store_chain(akv, chain_tokens(800, 600))  # a's engine recomputes what was lost
        wait_for(lambda: kv.lookup(keys).hits == len(keys), 30, "b to find all of a's pages again")
        assert _check(kv, keys) == len(keys)
    assert b.stats()["counters"].get("cluster_corrupt_pages", 0) == 0

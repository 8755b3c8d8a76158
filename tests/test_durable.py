"""Write-through is durable: a commit acknowledged under disk.write_through survives a SIGKILL of the
daemon, and a commit the disk cannot take says so (docs/OPERATIONS.md, "Write-through")."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from polarkvd.errors import DaemonUnavailable
from polarkvd.types import Tier
from tests.conftest import (
    REPO_ROOT,
    TEST_NS,
    DaemonProc,
    chain_tokens,
    clean_env,
    page_bytes_for,
    wait_for,
)

WRITE_THROUGH = {
    "disk.write_through": "true",
    "disk.capacity": "1GiB",  # every acknowledged page of the run fits: nothing is evicted from disk
    "dram.capacity": "16MiB",  # 512 pages: DRAM evicts (and demotes) all the time as well
    "daemon.log_level": "info",
}


def writer_main() -> None:
    """A storing engine (argv[1]: socket, seed): reserve, fill, commit chains of 4 pages as fast as
    it can, and print {"acked": [keys]} for the pages of each commit that answered durable, only
    after that answer. Stops when the daemon goes away."""
    socket_path, seed = sys.argv[1], int(sys.argv[2])
    from polarkvd.client import EngineClient

    try:
        kv = EngineClient(TEST_NS, f"writer-{seed}", socket_path, timeout=60)
        for c in range(1_000_000):
            keys = kv.page_keys(chain_tokens(seed * 1_000_003 + c, 4))
            offsets = kv.reserve(keys)
            mine = [k for k, off in zip(keys, offsets) if off >= 0]
            for k, off in zip(keys, offsets):
                if off >= 0:
                    kv.page(off)[:] = page_bytes_for(k, kv.page_bytes)
            if not mine:
                continue
            r = kv.commit_result(mine)
            if r.durable != len(mine):  # the daemon says these are not on disk: not promised
                print(json.dumps({"not_durable": [k.hex() for k in mine]}), flush=True)
                continue
            print(json.dumps({"acked": [k.hex() for k in mine]}), flush=True)
    except DaemonUnavailable:
        print(json.dumps({"gone": True}), flush=True)


class Writer:
    def __init__(self, socket_path: Path, seed: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.test_durable import writer_main; writer_main()", str(socket_path), str(seed)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT, env=clean_env(),
        )  # fmt: skip
        self.acked: list[bytes] = []
        self.not_durable = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            self.acked += [bytes.fromhex(k) for k in msg.get("acked", ())]
            self.not_durable += len(msg.get("not_durable", ()))

    def finish(self) -> None:
        """Wait for it to notice the daemon is gone (it must not be killed: its last line matters)."""
        try:
            self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read().decode()
        self.proc.stderr.close()
        assert self.proc.returncode == 0, err


def lost_pages(d: DaemonProc, keys: list[bytes]) -> list[str]:
    """The keys that do not load from the restarted daemon with their exact bytes."""
    lost = []
    with d.engine(engine_id="checker") as kv:
        for i in range(0, len(keys), 4):
            batch = keys[i : i + 4]
            r = kv.load(batch)
            for j, key in enumerate(batch):
                if j >= r.loaded or not np.array_equal(
                    np.frombuffer(r.views[j], np.uint8), page_bytes_for(key, kv.page_bytes)
                ):
                    lost.append(key.hex())
            del r.views
            if r.lease is not None:
                kv.release(r.lease)
    return lost


def kill_while_storing(daemon_factory: Any, kills: int, sync: str, writers: int = 2) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    d = daemon_factory({**WRITE_THROUGH, "disk.write_through_sync": sync})
    acked: list[bytes] = []
    not_durable = 0
    for n in range(kills):
        ws = [Writer(d.engine_socket, seed + n * writers + i) for i in range(writers)]
        # a random moment once the writers are busy: mid-batch, mid-sync, between commits
        wait_for(lambda ws=ws: sum(len(w.acked) for w in ws) >= 8, timeout=60, what="acknowledged pages")
        time.sleep(rng.uniform(0.0, 0.5))
        d.kill()
        for w in ws:
            w.finish()
            acked += w.acked
            not_durable += w.not_durable
        d.start()
    assert acked and not_durable == 0
    lost = lost_pages(d, acked)
    assert lost == [], f"seed {seed}: {len(lost)} of {len(acked)} acknowledged pages lost over {kills} kills"
    assert d.stats()["tiers"]["disk"]["pages"] >= len(set(acked))
    print(f"{len(acked)} acknowledged pages over {kills} SIGKILLs ({sync}): none lost")  # pytest -s


@pytest.mark.parametrize("sync", ["files", "filesystem"])
def test_acknowledged_write_through_pages_survive_sigkills(daemon_factory, sync: str) -> None:
    kill_while_storing(daemon_factory, kills=3, sync=sync)


@pytest.mark.slow
@pytest.mark.parametrize("sync", ["files", "filesystem"])
def test_acknowledged_write_through_pages_survive_20_sigkills(daemon_factory, sync: str) -> None:
    kill_while_storing(daemon_factory, kills=20, sync=sync)


def test_write_through_commit_says_when_the_disk_cannot_take_the_pages(daemon_factory) -> None:
    # a disk tier smaller than one page: every durable write fails for want of room
    d = daemon_factory({"disk.write_through": "true", "disk.capacity": "16KiB"})
    with d.engine() as kv:
        keys = kv.page_keys(chain_tokens(1, 4))
        r = kv.store(keys, [page_bytes_for(k, kv.page_bytes) for k in keys])
        assert r.stored == 4 and r.durable == 0
        assert kv.lookup(keys).tiers == [Tier.DRAM] * 4  # committed all the same, in memory
    st = d.stats()
    assert st["counters"]["write_through_failed_pages"] == 4
    assert st["tiers"]["disk"]["pages"] == 0


def test_write_back_commit_promises_nothing_and_write_through_everything(daemon_factory) -> None:
    d = daemon_factory()
    with d.engine() as kv, d.control() as c:
        keys = kv.page_keys(chain_tokens(2, 4))
        r = kv.store(keys, [page_bytes_for(k, kv.page_bytes) for k in keys])
        assert r.stored == 4 and r.durable is None  # write-back (the default): nothing written yet
        c.set_knobs({"disk.write_through": "on"})
        more = kv.page_keys(chain_tokens(3, 8))
        r = kv.store(more, [page_bytes_for(k, kv.page_bytes) for k in more])
        assert r.stored == 8 and r.durable == 8
        st = c.stats()  # on disk when the commit answered: no waiting for a queue
        assert st["tiers"]["disk"]["pages"] == 8 and st["counters"]["written_through_pages"] == 8
        assert st["tiers"]["disk"]["group_commit"]["pages"] == 8

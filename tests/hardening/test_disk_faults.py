"""The disk tier's directory under faults an operator or a full disk makes while the daemon runs.
Removed (`rm -rf`): the next write makes it again, locks it again and records the seed, so writes go
on and a second daemon cannot move in; taken by another process before that: this one writes and
deletes nothing there. Full: the log says the first failure with its reason, then one summary line
per ~10 s, and once when writes succeed again; `polarkv_disk_write_errors_total` counts them."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from polarkvd.errors import ResourceError
from polarkvd.tiers.disk import DiskTier
from polarkvd.tiers.disk_failures import WriteFailures
from polarkvd.tiers.disk_format import LOCK_NAME, recorded_seed
from tests.conftest import FakeClock, bad_pages, chain_tokens, store_chain, wait_for
from tests.hardening.test_resources import fill, needs_root, small_fs  # noqa: F401 - a fixture
from tests.tiers.test_disk import NS, key, page_bytes, put_chain, read

SEED = "0123456789abcdef"


def open_tier(root: Path) -> DiskTier:
    tier = DiskTier(root, 1 << 30, seed_fingerprint=SEED)
    tier.open()
    return tier


def test_a_removed_directory_is_made_again_locked_again_and_written(tmp_path: Path) -> None:
    root = tmp_path / "l4"
    tier = open_tier(root)
    removed: list[bytes] = []
    tier.on_removed = removed.extend
    before = put_chain(tier, 0, 4)
    shutil.rmtree(root)  # the operator's rm -rf
    after = put_chain(tier, 10, 4)  # every put lands (each subdirectory was cached as made)
    assert all(read(tier, k) == page_bytes(k) for k in after)
    assert sorted(removed) == sorted(before)  # the pages that went are forgotten, not served
    assert tier.stats().pages == 4 and tier.stats().write_errors == 0
    assert recorded_seed(root) == SEED  # a restart keeps the new pages instead of refusing them
    with pytest.raises(ResourceError, match="in use"):
        open_tier(root)  # the lock went with the directory, and was taken again
    tier.close()
    again = open_tier(root)  # what was written after the removal survives a restart
    assert sorted(again.keys()) == sorted(after)
    assert all(read(again, k) == page_bytes(k) for k in after)
    again.close()


def test_a_removed_subdirectory_is_made_again(tmp_path: Path) -> None:
    root = tmp_path / "l4"
    tier = open_tier(root)
    k = put_chain(tier, 0, 1)[0]
    shutil.rmtree(root / k.hex()[:2])
    tier.remove(k)
    assert tier.put(k, None, NS, page_bytes(k), 2)
    assert read(tier, k) == page_bytes(k)
    tier.close()


def test_a_removed_directory_another_process_took_first_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "l4"
    tier = open_tier(root)
    put_chain(tier, 0, 4)
    shutil.rmtree(root)
    other = open_tier(root)  # another daemon, started meanwhile, owns it now
    theirs = put_chain(other, 100, 4)
    assert not tier.flush_index(force=True)  # its index does not overwrite the other's
    assert not tier.put(key(50), None, NS, page_bytes(key(50)), 2)  # refused, not written there
    assert tier.stats().write_errors == 1 and tier.stats().pages == 0
    tier.close()
    assert all(read(other, k) == page_bytes(k) for k in theirs)
    assert not any(p.name.startswith(key(50).hex()) for p in root.rglob("*"))
    assert (root / LOCK_NAME).exists()
    other.close()


def test_failed_writes_are_told_once_then_summed_up_then_when_they_succeed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    f = WriteFailures(every=10.0, clock=clock)
    full = OSError(errno.ENOSPC, "No space left on device")
    with caplog.at_level(logging.WARNING, "polarkvd.tiers.disk"):
        for _ in range(92):  # one burst: the first line only
            f.failed("page-a", full)
        clock.now += 10
        f.failed("page-b", full)  # ten seconds on: the sum of what was not told
        clock.now += 1
        f.failed("page-c", OSError(errno.EIO, "Input/output error"))
        f.succeeded()
        f.succeeded()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "page-a" in lines[0] and "ENOSPC" in lines[0]
    assert lines[1] == "disk tier: 92 more page writes failed: ENOSPC"
    assert lines[2] == "disk tier: page writes succeed again, after 94 failed"
    assert f.total == 94


# ---------------------------------------------------------------- under a running daemon


def test_a_daemon_writes_on_after_its_disk_directory_is_removed(daemon_factory, tmp_path: Path) -> None:
    pages = tmp_path / "pages"
    d = daemon_factory({"dram.capacity": "2MiB", "disk.path": str(pages)})  # 64 pages: more are demoted
    with d.engine() as kv:
        for seed in range(4):
            store_chain(kv, chain_tokens(seed, 20))
        wait_for(lambda: d.stats()["tiers"]["disk"]["pages"] >= 16, what="pages on disk")
        shutil.rmtree(pages)
        newer = [store_chain(kv, chain_tokens(seed, 20)) for seed in range(10, 16)]
        wait_for(lambda: d.stats()["tiers"]["disk"]["pages"] >= 40, what="pages on disk again")
        with d.control() as c:
            c.evict("dram", 2 << 20)  # what is read next comes from the disk
        wait_for(lambda: d.stats()["tiers"]["disk"]["pages"] >= 100, what="DRAM demoted")
        stats = d.stats()
        assert stats["tiers"]["disk"]["write_errors"] == 0
        for keys in newer:
            r = kv.load(keys)
            try:
                assert r.loaded == len(keys) and bad_pages(kv, keys, r.views) == []
            finally:
                if r.lease is not None:
                    kv.release(r.lease)
    assert "was removed under the daemon: made again and locked again" in d.log()
    assert (pages / LOCK_NAME).exists()
    assert d.stop() == 0, d.log()


@needs_root
def test_a_full_disk_is_told_in_a_few_lines_and_counted(daemon_factory, small_fs: Path) -> None:  # noqa: F811
    d = daemon_factory(
        {"dram.capacity": "2MiB", "disk.path": str(small_fs / "pages"), "disk.capacity": "12MiB"}
    )
    with d.engine() as kv:
        store_chain(kv, chain_tokens(0, 20))
        fill(small_fs)
        for seed in range(10, 16):  # ~120 demotions fail
            store_chain(kv, chain_tokens(seed, 20))
        wait_for(lambda: d.stats()["tiers"]["disk"]["write_errors"] >= 50, what="failed writes")
        errors = d.stats()["tiers"]["disk"]["write_errors"]
        port = re.search(r"metrics_url=http://[0-9.]+:([0-9]+)/metrics", d.log())
        assert port is not None
        text = urllib.request.urlopen(f"http://127.0.0.1:{port[1]}/metrics", timeout=10).read().decode()
        counted = re.search(r"^polarkv_disk_write_errors_total ([0-9.e+]+)$", text, re.M)
        assert counted is not None and float(counted[1]) >= errors
        told = [
            line for line in d.log().splitlines() if re.search("disk tier: (writing|[0-9]+ more page)", line)
        ]
        assert 1 <= len(told) <= 3, told  # not one line per page
        assert "ENOSPC" in told[0]

        os.unlink(small_fs / "ballast")  # room again
        for seed in range(20, 26):
            store_chain(kv, chain_tokens(seed, 20))
        wait_for(lambda: "page writes succeed again" in d.log(), what="the all-clear line")
        assert d.stats()["counters"]["demotions_dropped"] >= errors  # each failed write dropped a page
    assert d.stop() == 0, d.log()

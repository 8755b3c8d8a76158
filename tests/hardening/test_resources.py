"""Resources running out under a running daemon. The disk tier's file system full (a real small
tmpfs, filled by another file): engines are served from DRAM throughout, `polarkvd drain` says how
many pages could not be written instead of counting them as written, a shutdown that cannot save the
index still exits cleanly, and once there is room again pages reach the disk and a restart finds
none corrupt. The directory turned read-only: reads and DRAM go on, drain says what it could not
write. A DRAM arena larger than its shm file system: refused at start. The tuning overlay saved onto
a full disk: the old one stays. The daemon's open-files limit reached: attached engines go on, new ones are refused
with the reason at once (not left waiting for a hello reply), and attach again once there is room."""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from polarkvd.client import EngineClient
from polarkvd.errors import PolarKVError
from tests.conftest import TEST_NS, bad_pages, chain_tokens, store_chain, wait_for

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


def test_out_of_file_descriptors_refuses_new_engines_with_the_reason(daemon) -> None:
    pid = daemon.proc.pid
    with daemon.engine() as kv:
        keys = store_chain(kv, chain_tokens(1, 4))
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 4, hard))
        refusals = []
        held = []
        try:
            for i in range(8):
                try:
                    held.append(
                        EngineClient(TEST_NS, f"late{i}", daemon.engine_socket, timeout=10).__enter__()
                    )
                except PolarKVError as e:
                    refusals.append(str(e))
            assert refusals, "every engine attached: the limit was not reached"
            assert all("out of file descriptors" in r for r in refusals), refusals
            more = store_chain(kv, chain_tokens(2, 4))  # the attached engine goes on
            assert len(kv.lookup(keys + more).tiers) == 8
        finally:
            for c in held:
                c.close()
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        with daemon.engine(engine_id="after") as again:
            assert len(again.lookup(keys).tiers) == 4


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path) -> None:
    """Another file takes every free byte of `fs`."""
    fd = os.open(fs / "ballast", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for n in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * n)
            except OSError:
                pass
    finally:
        os.close(fd)


@needs_root
@pytest.mark.slow
def test_a_full_disk_keeps_dram_serving_and_is_told_not_hidden(daemon_factory, small_fs: Path) -> None:
    d = daemon_factory(
        {
            "dram.capacity": "4MiB",  # 128 pages of 32 KiB: more are demoted
            "disk.path": str(small_fs / "pages"),
            "disk.capacity": "12MiB",
            "disk.index_flush_seconds": "1h",  # the index is saved at shutdown only: onto a full disk
        }
    )
    with d.engine() as kv:
        for seed in range(3):
            store_chain(kv, chain_tokens(seed, 20))
        fill(small_fs)
        chains = [store_chain(kv, chain_tokens(seed, 20)) for seed in range(10, 16)]  # demotions fail
        assert len(kv.lookup(chains[-1]).tiers) == 20  # served from DRAM
        with d.control() as c:
            reply = c.drain()
        assert reply["unwritten_pages"] > 0 and reply["written_pages"] == 0, reply
        assert "could not be written" in d.log()
        stats = d.stats()
        assert stats["counters"]["demotions_dropped"] > 0
        with d.control() as c:
            c.resume()

        os.unlink(small_fs / "ballast")  # room again
        before = stats["counters"].get("demoted_pages", 0)
        for seed in range(20, 26):
            store_chain(kv, chain_tokens(seed, 20))
        wait_for(lambda: d.stats()["counters"].get("demoted_pages", 0) > before, what="demotions again")
        fill(small_fs)
    assert d.stop() == 0, d.log()  # the index cannot be saved: said so, not a crash
    assert "saving the disk index failed" in d.log() and "polarkvd failed" not in d.log()

    os.unlink(small_fs / "ballast")
    d.start()
    opened = [line for line in d.log().splitlines() if "verified in" in line][-1]
    assert " 0 dropped" in opened, opened
    with d.engine() as kv:  # what reached the disk reads back whole
        found = 0
        for seed in [*range(3), *range(10, 16), *range(20, 26)]:
            keys = kv.page_keys(chain_tokens(seed, 20))
            r = kv.load(keys)
            try:
                assert bad_pages(kv, keys[: r.loaded], r.views) == []
                found += r.loaded
            finally:
                if r.lease is not None:
                    kv.release(r.lease)
        assert found > 0


@needs_root
def test_saving_the_tuning_overlay_onto_a_full_disk_keeps_the_old_one(daemon_factory, small_fs: Path) -> None:
    overlay = small_fs / "tuning.toml"
    d = daemon_factory({"daemon.tuning_file": str(overlay), "disk.path": str(small_fs.parent / "pages")})
    with d.control() as c:
        c.set_knobs({"dram.policy": "s3fifo"})
        c.save_tuning(["dram.policy"])
        saved = overlay.read_text()
        fill(small_fs)
        c.set_knobs({"dram.policy": "lru", "dram.min_prefix_pages": 2})
        with pytest.raises(PolarKVError, match="cannot write the tuning overlay"):
            c.save_tuning(["dram.policy", "dram.min_prefix_pages"])
        assert overlay.read_text() == saved
        assert sorted(p.name for p in small_fs.iterdir()) == ["ballast", "tuning.toml"]  # no partial copy
        os.unlink(small_fs / "ballast")
        c.save_tuning(["dram.policy", "dram.min_prefix_pages"])  # room again
    assert 'policy = "lru"' in overlay.read_text()


@needs_root
def test_a_dram_arena_larger_than_the_shm_file_system_is_refused_at_start(
    tmp_path: Path, small_fs: Path
) -> None:
    from tests.hardening.test_config_serve import base_sets, refused

    sets = {**base_sets(tmp_path), "dram.shm_dir": str(small_fs), "dram.capacity": "64MiB"}
    refused(tmp_path, sets, "dram.capacity", f"of {small_fs} but only")
    assert list(small_fs.iterdir()) == []  # no arena begun


@needs_root
@pytest.mark.slow
def test_a_disk_directory_turned_read_only_keeps_reads_and_dram_serving(
    daemon_factory, tmp_path: Path
) -> None:
    pages = tmp_path / "pages"
    d = daemon_factory({"dram.capacity": "2MiB", "disk.path": str(pages)})
    with d.engine() as kv:
        chains = [store_chain(kv, chain_tokens(seed, 20)) for seed in range(8)]
        wait_for(lambda: d.stats()["tiers"]["disk"]["pages"] >= 80, what="pages on disk")
        subprocess.run(["mount", "--bind", str(pages), str(pages)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(pages)], check=True)
            newer = [store_chain(kv, chain_tokens(seed, 20)) for seed in range(10, 14)]
            assert len(kv.lookup(newer[-1]).tiers) == 20  # DRAM serves
            r = kv.load(chains[0])  # the disk still reads
            try:
                assert r.loaded == 20 and bad_pages(kv, chains[0], r.views) == []
            finally:
                if r.lease is not None:
                    kv.release(r.lease)
            with d.control() as c:
                reply = c.drain()
                assert reply["unwritten_pages"] > 0 and reply["written_pages"] == 0, reply
                c.resume()
        finally:
            subprocess.run(["umount", str(pages)], check=False)
    assert d.stop() == 0, d.log()
    assert "polarkvd failed" not in d.log()

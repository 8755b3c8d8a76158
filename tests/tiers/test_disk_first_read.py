"""A page's first read on a fresh I/O thread takes buffers made ahead, rather than faulting in new
ones inside a promotion (the disk tier's `readers`, `codec.Scratch`); a page stored raw needs no
buffer at all (`disk_format.read_page`)."""

from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from polarkvd.tiers.disk import DiskTier
from tests.tiers.test_disk import NS, key, page_bytes

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread fault counts are Linux's")

PAGE = 4 << 20  # 1,024 pages of 4 KiB: a buffer made on first use faults about that many times


def first_read_faults(tier: DiskTier, keys: list[bytes], threads: int) -> list[int]:
    """Each of `threads` fresh threads reads one page: the minor faults of that read, per thread.
    The threads stay alive until all have read, so none inherits another's freed buffers."""
    faults = [0] * threads
    done = threading.Barrier(threads)
    out = [bytearray(PAGE) for _ in range(threads)]  # touched here: only the read's own buffers count

    def reader(i: int) -> None:
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        tier.get_into(keys[i % len(keys)], memoryview(out[i]))
        faults[i] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
        done.wait(timeout=30)

    running = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    return faults


def test_first_reads_of_fresh_threads_take_buffers_made_when_pages_were_written(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 30, readers=2)
    tier.open()
    keys = [key(i) for i in range(2)]
    for k in keys:  # in layer groups, as the daemon stores them: a read goes through a buffer
        assert tier.put(k, None, NS, page_bytes(k, PAGE), 2, groups=[PAGE // 2, PAGE])
    assert all(f < 100 for f in first_read_faults(tier, keys, 2))
    tier.close()


def test_after_a_restart_first_reads_take_buffers_made_at_open(tmp_path: Path) -> None:
    # fp32-like noise in layer groups, stored raw range by range (SmolLM2's KV in the daemon)
    keys = [key(i) for i in range(2)]
    tier = DiskTier(tmp_path, 1 << 30, min_ratio=1.25)
    tier.open()
    for k in keys:
        assert tier.put(k, None, NS, fp32_noise(k), 4, groups=[PAGE // 2, PAGE])
    tier.close()
    reopened = DiskTier(tmp_path, 1 << 30, readers=2)  # pages on disk, none written since the start
    reopened.open()
    assert all(f < 100 for f in first_read_faults(reopened, keys, 2))
    # a third thread finds no buffer left, and needs none: raw ranges go straight into the slot
    assert first_read_faults(reopened, keys, 3)[2] < 100
    reopened.close()


def fp32_noise(k: bytes) -> bytes:
    """fp32-like noise: it does not compress by 1.25x, so it is stored raw range by range (SmolLM2's
    KV in the daemon)."""
    return np.random.default_rng(k[0]).bytes(PAGE)


def test_a_page_stored_raw_in_groups_reads_back_exactly(tmp_path: Path) -> None:
    keys = [key(i) for i in range(2)]
    tier = DiskTier(tmp_path, 1 << 30, min_ratio=1.25)
    tier.open()
    for k in keys:
        assert tier.put(k, None, NS, fp32_noise(k), 4, groups=[PAGE // 4, PAGE // 2, PAGE])
    out = bytearray(PAGE)
    tier.get_into(keys[1], memoryview(out))
    assert bytes(out) == fp32_noise(keys[1])
    tier.close()


def test_a_raw_stored_page_with_a_flipped_byte_is_dropped_as_corrupt(tmp_path: Path) -> None:
    from polarkvd.errors import PageCorrupt

    k = key(7)
    tier = DiskTier(tmp_path, 1 << 30, min_ratio=1.25)
    tier.open()
    assert tier.put(k, None, NS, fp32_noise(k), 4, groups=[PAGE // 2, PAGE])
    (path,) = [p for p in tmp_path.rglob("*.pkv")]
    with open(path, "r+b") as f:  # a byte in the second range's bytes
        f.seek(-100, 2)
        b = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(PageCorrupt, match="checksum mismatch"):
        tier.get_into(k, memoryview(bytearray(PAGE)))
    assert tier.entry(k) is None  # dropped, file and index
    assert not path.exists()
    tier.close()

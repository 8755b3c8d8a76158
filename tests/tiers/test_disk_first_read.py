"""A page's first read on a fresh I/O thread takes buffers made ahead, rather than faulting in new
ones inside a promotion (the disk tier's `readers`, `codec.Scratch`)."""

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
        assert tier.put(k, None, NS, np.random.default_rng(k[0]).bytes(PAGE), 4, groups=[PAGE // 2, PAGE])
    tier.close()
    reopened = DiskTier(tmp_path, 1 << 30, readers=2)  # pages on disk, none written since the start
    reopened.open()
    assert all(f < 100 for f in first_read_faults(reopened, keys, 2))
    # a third thread finds no buffer left: it makes its own (what every first read did before)
    assert first_read_faults(reopened, keys, 3)[2] > 500
    reopened.close()

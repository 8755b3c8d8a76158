"""L4 disk tier: real files, real bytes, restarts, corruption, capacity and a SIGKILLed writer."""

from __future__ import annotations

import gc
import os
import random
import signal
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import xxhash

from polarkvd.errors import PageCorrupt, PageNotFound, ResourceError
from polarkvd.tiers.disk import HEADER_SIZE, DiskTier

NS = xxhash.xxh3_128_digest(b"namespace: smollm2 bf16")
OTHER_NS = xxhash.xxh3_128_digest(b"namespace: another model")
PAGE = 16 * 1024  # bytes per test page
POLICIES = ["lru", "s3fifo"]
REPO = Path(__file__).resolve().parents[2]


def key(i: int) -> bytes:
    return xxhash.xxh3_128_digest(f"page {i}".encode())


def page_bytes(k: bytes, size: int = PAGE) -> bytes:
    """Deterministic bf16 KV-like bytes for a key, so any process can recompute them."""
    rng = np.random.default_rng(int.from_bytes(k[:8], "little"))
    f = rng.standard_normal(size // 2, dtype=np.float32) * 0.5
    return (f.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def read(tier: DiskTier, k: bytes) -> bytes:
    e = tier.entry(k)
    assert e is not None
    out = bytearray(e.raw_bytes)
    tier.get_into(k, memoryview(out))
    return bytes(out)


def page_file(root: Path, k: bytes) -> Path:
    return root / k.hex()[:2] / f"{k.hex()}.pkv"


def counted(file: Path) -> int:
    """A page file's size as the tier counts it (rounded up to 512 bytes: see `disk_format.stored_size`)."""
    return -(-file.stat().st_size // 512) * 512


def files_on_disk(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("??/*") if p.is_file())


def open_tier(root: Path, capacity: int = 1 << 30, policy: str = "lru") -> DiskTier:
    tier = DiskTier(root, capacity, policy=policy)
    tier.open()
    return tier


def put_chain(tier: DiskTier, start: int, n: int, ns: bytes = NS) -> list[bytes]:
    """Put pages start..start+n-1 as one token chain (each the parent of the next)."""
    keys = [key(i) for i in range(start, start + n)]
    for i, k in enumerate(keys):
        assert tier.put(k, keys[i - 1] if i else None, ns, page_bytes(k), 2)
    return keys


# ---------------------------------------------------------------- round trip and restart


def test_put_get_round_trip_is_exact_and_compressed(tmp_path: Path) -> None:
    tier = open_tier(tmp_path / "l4")
    keys = put_chain(tier, 0, 10)
    for k in keys:
        assert read(tier, k) == page_bytes(k)
    s = tier.stats()
    assert (s.pages, s.puts, s.gets) == (10, 10, 10)
    assert s.raw_bytes == 10 * PAGE
    assert s.stored_bytes < s.raw_bytes / 1.3  # bf16 pages are stored compressed
    assert s.stored_bytes == sum(counted(p) for p in files_on_disk(tmp_path / "l4"))
    e = tier.entry(keys[3])
    assert e is not None and e.parent == keys[2] and e.ns == NS and e.children == 1
    assert tier.entry(keys[-1]).children == 0  # type: ignore[union-attr]
    tier.close()


def test_pages_that_compress_less_than_min_ratio_are_stored_raw(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path / "l4", 1 << 30, min_ratio=1.25)
    tier.open()
    fp32 = (np.random.default_rng(5).standard_normal(PAGE // 4, dtype=np.float32) * 0.5).tobytes()  # ~1.2x
    bf16 = key(1)
    assert tier.put(key(0), None, NS, fp32, 4, groups=[PAGE // 2, PAGE])
    assert tier.put(bf16, None, NS, page_bytes(bf16), 2)
    raw_file, packed_file = (tier.entry(k).stored_bytes for k in (key(0), bf16))  # type: ignore[union-attr]
    assert raw_file >= PAGE  # stored raw: a hit reads it without decompressing
    assert packed_file < PAGE / 1.3  # bf16 compresses enough to stay compressed
    assert read(tier, key(0)) == fp32 and read(tier, bf16) == page_bytes(bf16)
    g = tier.open_grouped(key(0))  # still readable layer group by layer group
    out = bytearray(PAGE)
    for i in range(len(g.ranges)):
        g.decode(i, memoryview(out))
    g.close()
    assert bytes(out) == fp32
    tier.close()


@pytest.mark.parametrize(
    "data, itemsize",
    [(b"", 2), (b"x", 1), (np.random.default_rng(3).bytes(5001), 4), (bytes(4096), 4), (b"ab" * 999, 2)],
    ids=["empty", "one-byte", "random-odd", "zeros", "repetitive"],
)
def test_any_bytes_round_trip(tmp_path: Path, data: bytes, itemsize: int) -> None:
    tier = open_tier(tmp_path)
    assert tier.put(key(1), None, NS, memoryview(data), itemsize)
    assert read(tier, key(1)) == data
    tier.close()


def test_pages_stored_in_layer_groups_read_group_by_group(tmp_path: Path) -> None:
    """A page stored with its layer groups (what the daemon does on demotion) reads back whole with
    `get_into`, and group by group with `open_grouped`, which reads only that group's bytes; a page
    stored whole is one group; a page whose file went is not found, and dropped."""
    tier = open_tier(tmp_path)
    grouped, whole, gone = key(1), key(2), key(3)
    ends = [2048, 6144, 10240, PAGE]
    assert tier.put(grouped, None, NS, page_bytes(grouped), 2, groups=ends)
    assert tier.put(whole, None, NS, page_bytes(whole), 2)
    assert tier.put(gone, None, NS, page_bytes(gone), 2, groups=ends)
    assert read(tier, grouped) == page_bytes(grouped)
    g = tier.open_grouped(grouped)
    assert g.ranges == list(zip([0, *ends[:-1]], ends))
    out = bytearray(PAGE)
    for i in reversed(range(len(ends))):
        g.decode(i, memoryview(out))
    assert bytes(out) == page_bytes(grouped)
    w = tier.open_grouped(whole)
    assert w.ranges == [(0, PAGE)]
    w.decode(0, memoryview(out))
    assert bytes(out) == page_bytes(whole)
    page_file(tmp_path, gone).unlink()
    with pytest.raises(PageNotFound):
        tier.open_grouped(gone)
    assert tier.entry(gone) is None
    # a group cut through by a flipped byte: the others still decode, that one is corrupt (dropped)
    raw = bytearray(page_file(tmp_path, grouped).read_bytes())
    raw[-10] ^= 0xFF  # inside the last group's blob
    page_file(tmp_path, grouped).write_bytes(raw)
    g = tier.open_grouped(grouped)
    g.decode(0, memoryview(out))
    with pytest.raises(PageCorrupt):
        g.decode(len(ends) - 1, memoryview(out))
    assert tier.entry(grouped) is None and not page_file(tmp_path, grouped).exists()


def test_put_of_a_stored_key_is_a_touch(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    k = key(1)
    assert tier.put(k, None, NS, page_bytes(k), 2)
    before = tier.stats()
    assert tier.put(k, None, NS, page_bytes(k), 2)
    after = tier.stats()
    assert (after.pages, after.puts, after.stored_bytes) == (before.pages, before.puts, before.stored_bytes)
    tier.close()


def test_get_of_a_missing_page_raises_not_found(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    with pytest.raises(PageNotFound):
        tier.get_into(key(404), memoryview(bytearray(PAGE)))
    tier.close()


def test_get_into_a_buffer_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    put_chain(tier, 0, 1)
    with pytest.raises(ValueError):
        tier.get_into(key(0), memoryview(bytearray(PAGE - 2)))
    assert read(tier, key(0)) == page_bytes(key(0))  # the page is still fine
    tier.close()


def test_get_into_writes_straight_into_an_arena_slot(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    keys = put_chain(tier, 0, 3)
    arena = np.zeros(3 * PAGE, dtype=np.uint8)
    for i, k in enumerate(keys):
        tier.get_into(k, memoryview(arena)[i * PAGE : (i + 1) * PAGE])
    assert arena.tobytes() == b"".join(page_bytes(k) for k in keys)
    tier.close()


def test_restart_keeps_every_page_and_its_metadata(tmp_path: Path) -> None:
    root = tmp_path / "l4"
    tier = open_tier(root)
    chain = put_chain(tier, 0, 20)
    other = put_chain(tier, 100, 5, ns=OTHER_NS)
    tier.close()

    tier = DiskTier(root, 1 << 30)
    report = tier.open()
    assert (report.pages, report.recovered, report.dropped, report.evicted) == (25, 0, 0, 0)
    assert report.index_loaded
    assert report.stored_bytes == sum(counted(p) for p in files_on_disk(root))
    assert sorted(tier.keys()) == sorted(chain + other)
    for k in chain + other:
        assert read(tier, k) == page_bytes(k)
    assert tier.entry(other[0]).ns == OTHER_NS  # type: ignore[union-attr]
    assert tier.entry(chain[5]).parent == chain[4]  # type: ignore[union-attr]
    assert tier.entry(chain[5]).children == 1  # type: ignore[union-attr]
    tier.close()


def test_missing_index_recovers_everything_from_page_headers(tmp_path: Path) -> None:
    root = tmp_path / "l4"
    tier = open_tier(root)
    chain = put_chain(tier, 0, 12)
    tier.close()
    (root / "index.msgpack").unlink()

    tier = DiskTier(root, 1 << 30)
    report = tier.open()
    assert (report.pages, report.recovered, report.dropped) == (12, 12, 0)
    assert not report.index_loaded
    for i, k in enumerate(chain):
        assert read(tier, k) == page_bytes(k)
        e = tier.entry(k)
        assert e is not None and e.ns == NS and e.parent == (chain[i - 1] if i else None)
        assert e.children == (0 if i == len(chain) - 1 else 1)
    tier.close()
    assert DiskTier(root, 1 << 30).open().index_loaded  # open wrote a fresh snapshot


def test_garbage_index_is_ignored_and_pages_recovered(tmp_path: Path) -> None:
    root = tmp_path / "l4"
    tier = open_tier(root)
    chain = put_chain(tier, 0, 4)
    tier.close()
    (root / "index.msgpack").write_bytes(b"PKVIDX01" + os.urandom(64))
    tier = DiskTier(root, 1 << 30)
    report = tier.open()
    assert (report.pages, report.recovered, report.index_loaded) == (4, 4, False)
    assert [read(tier, k) == page_bytes(k) for k in chain] == [True] * 4
    tier.close()


# ---------------------------------------------------------------- the page-key seed

SEED_A, SEED_B = "0123456789abcdef", "fedcba9876543210"  # fingerprints (keys.seed_fingerprint)


def test_pages_of_another_seed_are_refused_at_open_never_served(tmp_path: Path, caplog) -> None:
    """Keys of another seed are never computed again: their pages are deleted at open, counted."""
    root = tmp_path / "l4"
    tier = DiskTier(root, 1 << 30, seed_fingerprint=SEED_A)
    assert tier.open().refused == 0
    keys = put_chain(tier, 0, 12)
    tier.close()
    assert (root / "seed-fingerprint").read_text().strip() == SEED_A
    same = DiskTier(root, 1 << 30, seed_fingerprint=SEED_A)  # the same seed: everything is kept
    assert same.open().refused == 0 and len(same) == 12
    assert read(same, keys[3]) == page_bytes(keys[3])
    same.close()

    caplog.set_level("INFO", logger="polarkvd.tiers.disk")
    other = DiskTier(root, 1 << 30, seed_fingerprint=SEED_B)
    report = other.open()
    assert report.refused == 12 and report.pages == 0 and report.dropped == 0
    assert other.stats().seed_refused == 12 and other.stats().stored_bytes == 0
    for k in keys:
        assert other.entry(k) is None
        with pytest.raises(PageNotFound):
            other.get_into(k, memoryview(bytearray(PAGE)))
    assert files_on_disk(root) == []
    refusals = [r for r in caplog.records if "keyed with" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelname == "ERROR"  # one clear line, not one per page
    assert SEED_A in refusals[0].getMessage() and "12 pages" in refusals[0].getMessage()
    assert (root / "seed-fingerprint").read_text().strip() == SEED_B
    new = put_chain(other, 100, 3)  # the tier works on under the new seed
    other.close()
    again = DiskTier(root, 1 << 30, seed_fingerprint=SEED_B)
    assert again.open().refused == 0 and sorted(again.keys()) == sorted(new)
    again.close()


def test_pages_without_a_recorded_seed_are_refused(tmp_path: Path) -> None:
    """Pages written before the tier recorded seeds (or with the record lost) have unknown keys."""
    root = tmp_path / "l4"
    old = open_tier(root)  # no seed: as a polarkvd before keyed page hashing
    put_chain(old, 0, 5)
    old.close()
    assert not (root / "seed-fingerprint").exists()
    tier = DiskTier(root, 1 << 30, seed_fingerprint=SEED_A)
    assert tier.open().refused == 5 and len(tier) == 0
    tier.close()
    # an empty directory is simply claimed: nothing to refuse
    fresh = DiskTier(tmp_path / "fresh", 1 << 30, seed_fingerprint=SEED_A)
    assert fresh.open().refused == 0
    fresh.close()
    assert (tmp_path / "fresh" / "seed-fingerprint").read_text().strip() == SEED_A


def test_a_malformed_seed_fingerprint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="16 hex"):
        DiskTier(tmp_path, 1 << 20, seed_fingerprint="not-hex")


def test_a_second_tier_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    with pytest.raises(ResourceError):
        DiskTier(tmp_path, 1 << 30).open()
    tier.close()
    open_tier(tmp_path).close()  # released on close


def test_operations_before_open_are_refused(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 1 << 30)
    with pytest.raises(RuntimeError):
        tier.put(key(0), None, NS, b"x", 1)


def test_bad_keys_are_refused(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    with pytest.raises(ValueError):
        tier.put(b"short", None, NS, b"x", 1)
    with pytest.raises(ValueError):
        tier.put(key(0), b"short", NS, b"x", 1)
    with pytest.raises(ValueError):
        tier.put(key(0), None, b"ns", b"x", 1)
    tier.close()


# ---------------------------------------------------------------- corruption


def test_flipped_payload_byte_raises_corrupt_and_the_page_is_gone(tmp_path: Path) -> None:
    root = tmp_path / "l4"
    tier = open_tier(root)
    chain = put_chain(tier, 0, 3)
    bad = chain[1]
    f = page_file(root, bad)
    raw = bytearray(f.read_bytes())
    raw[HEADER_SIZE + len(raw[HEADER_SIZE:]) // 2] ^= 0x10
    f.write_bytes(raw)

    with pytest.raises(PageCorrupt):
        tier.get_into(bad, memoryview(bytearray(PAGE)))
    assert tier.entry(bad) is None
    assert bad not in tier.keys()
    assert not f.exists()
    assert tier.stats().corrupt_dropped == 1
    with pytest.raises(PageNotFound):
        tier.get_into(bad, memoryview(bytearray(PAGE)))
    assert tier.entry(chain[0]).children == 0  # type: ignore[union-attr]
    assert read(tier, chain[2]) == page_bytes(chain[2])  # neighbours unaffected
    tier.close()
    tier = open_tier(root)
    assert sorted(tier.keys()) == sorted([chain[0], chain[2]])
    tier.close()


@pytest.mark.parametrize("where", ["header", "last-byte"])
def test_other_flipped_bytes_are_caught_too(tmp_path: Path, where: str) -> None:
    root = tmp_path / "l4"
    tier = open_tier(root)
    (k,) = put_chain(tier, 0, 1)
    f = page_file(root, k)
    raw = bytearray(f.read_bytes())
    raw[40 if where == "header" else -1] ^= 0x01
    f.write_bytes(raw)
    with pytest.raises(PageCorrupt):
        tier.get_into(k, memoryview(bytearray(PAGE)))
    assert tier.entry(k) is None and not f.exists()
    tier.close()


def test_page_file_deleted_behind_the_tiers_back_is_not_found(tmp_path: Path) -> None:
    root = tmp_path / "l4"
    tier = open_tier(root)
    (k,) = put_chain(tier, 0, 1)
    page_file(root, k).unlink()
    with pytest.raises(PageNotFound):
        tier.get_into(k, memoryview(bytearray(PAGE)))
    assert tier.entry(k) is None
    tier.close()


def test_a_page_cut_within_its_size_unit_is_dropped_at_its_first_read(tmp_path: Path) -> None:
    """Sizes are counted in 512-byte units, so open() cannot see a file that lost a few bytes; its
    first read does (payload length and checksum), drops it and says so: never bad bytes."""
    root = tmp_path / "l4"
    tier = open_tier(root)
    chain = put_chain(tier, 0, 3)
    tier.close()
    f = page_file(root, chain[1])
    data = f.read_bytes()
    cut = (len(data) % 512) or 512  # stays within its unit when it can
    f.write_bytes(data[: -min(cut - 1, 100)] if cut > 1 else data[:-1])
    tier = DiskTier(root, 1 << 30)
    tier.open()
    with pytest.raises(PageCorrupt):
        read(tier, chain[1])
    assert tier.entry(chain[1]) is None and not f.exists()
    assert read(tier, chain[0]) == page_bytes(chain[0])
    tier.close()


def test_open_drops_truncated_garbage_and_temp_files(tmp_path: Path) -> None:
    root = tmp_path / "l4"
    tier = open_tier(root)
    chain = put_chain(tier, 0, 5)
    tier.close()
    truncated = page_file(root, chain[2])
    truncated.write_bytes(truncated.read_bytes()[:-1000])  # shorter by more than a 512-byte unit
    garbage = page_file(root, key(999))
    garbage.parent.mkdir(exist_ok=True)
    garbage.write_bytes(os.urandom(3000))
    temp = page_file(root, key(998)).with_suffix(".pkv.1234.5678.tmp")
    temp.parent.mkdir(exist_ok=True)
    temp.write_bytes(b"half a page")
    short = page_file(root, key(997))  # shorter than a header
    short.parent.mkdir(exist_ok=True)
    short.write_bytes(b"PKVP")
    index_temp = root / "index.msgpack.4321.tmp"  # a snapshot write cut short
    index_temp.write_bytes(b"PKVIDX01")

    tier = DiskTier(root, 1 << 30)
    report = tier.open()
    assert (report.pages, report.recovered, report.dropped) == (4, 0, 5)
    assert report.index_loaded
    for f in (truncated, garbage, temp, short, index_temp):
        assert not f.exists()
    assert sorted(tier.keys()) == sorted(chain[:2] + chain[3:])
    for k in tier.keys():
        assert read(tier, k) == page_bytes(k)
    assert tier.entry(chain[1]).children == 0  # type: ignore[union-attr]
    tier.close()


def test_truncated_file_without_index_entry_is_dropped(tmp_path: Path) -> None:
    root = tmp_path / "l4"
    tier = open_tier(root)
    chain = put_chain(tier, 0, 3)
    tier.close()
    (root / "index.msgpack").unlink()
    f = page_file(root, chain[0])
    f.write_bytes(f.read_bytes()[: HEADER_SIZE + 10])
    report = DiskTier(root, 1 << 30).open()
    assert (report.pages, report.recovered, report.dropped) == (2, 2, 1)
    assert not f.exists()


def test_index_entry_whose_file_is_missing_is_dropped(tmp_path: Path) -> None:
    root = tmp_path / "l4"
    tier = open_tier(root)
    chain = put_chain(tier, 0, 3)
    tier.close()
    page_file(root, chain[1]).unlink()
    tier = DiskTier(root, 1 << 30)
    report = tier.open()
    assert (report.pages, report.recovered, report.dropped) == (2, 0, 1)
    assert tier.entry(chain[0]).children == 0  # type: ignore[union-attr]
    tier.close()


# ---------------------------------------------------------------- capacity and eviction


@pytest.mark.parametrize("policy", POLICIES)
def test_capacity_is_never_exceeded(tmp_path: Path, policy: str) -> None:
    tier = open_tier(tmp_path, policy=policy)
    (k0,) = put_chain(tier, 0, 1)
    one = tier.stats().stored_bytes
    tier.close()
    capacity = 8 * one + one // 2
    tier = DiskTier(tmp_path, capacity, policy=policy)
    assert tier.open().evicted == 0
    for i in range(1, 40):
        k = key(i)
        assert tier.put(k, None, NS, page_bytes(k), 2)
        s = tier.stats()
        assert s.stored_bytes <= capacity
        assert s.stored_bytes == sum(counted(p) for p in files_on_disk(tmp_path))
    s = tier.stats()
    assert s.pages == 8 and s.evictions == 40 - 8
    for k in tier.keys():
        assert read(tier, k) == page_bytes(k)
    tier.close()


def test_open_over_capacity_evicts_down_to_it(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    put_chain(tier, 0, 10)
    total = tier.stats().stored_bytes
    tier.close()
    tier = DiskTier(tmp_path, total // 2)
    report = tier.open()
    assert report.evicted >= 5 and report.stored_bytes <= total // 2
    assert len(files_on_disk(tmp_path)) == report.pages
    tier.close()


def test_page_larger_than_the_tier_is_refused_without_evicting(tmp_path: Path) -> None:
    tier = open_tier(tmp_path, capacity=3 * PAGE)
    put_chain(tier, 0, 2)
    big = np.random.default_rng(5).bytes(4 * PAGE)
    assert not tier.put(key(50), None, NS, big, 1)
    assert tier.entry(key(50)) is None
    assert tier.stats().pages == 2 and tier.stats().evictions == 0
    tier.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_parent_with_a_child_on_disk_is_not_evicted_first(tmp_path: Path, policy: str) -> None:
    tier = open_tier(tmp_path, policy=policy)
    a, b, c = put_chain(tier, 0, 3)  # a <- b <- c; a is the oldest
    one = max(tier.entry(k).stored_bytes for k in (a, b, c))  # type: ignore[union-attr]
    tier.close()
    tier = DiskTier(tmp_path, 3 * one + one // 2, policy=policy)
    tier.open()
    d = key(10)
    assert tier.put(d, None, NS, page_bytes(d), 2)  # needs one page of room
    assert tier.entry(c) is None  # the leaf went, not the older parents
    assert tier.entry(a) is not None and tier.entry(b) is not None
    assert tier.entry(b).children == 0  # type: ignore[union-attr]
    assert tier.evict_bytes(1) > 0  # b is a leaf now; a still has b
    assert tier.entry(b) is None and tier.entry(a) is not None
    tier.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_children_stored_before_their_parent_still_protect_it(tmp_path: Path, policy: str) -> None:
    # DRAM demotes leaves first, so children usually reach disk before their parent.
    tier = open_tier(tmp_path, policy=policy)
    p, c1, c2 = key(0), key(1), key(2)
    for k in (c1, c2):
        assert tier.put(k, p, NS, page_bytes(k), 2)
    assert tier.put(p, None, NS, page_bytes(p), 2)
    assert tier.entry(p).children == 2  # type: ignore[union-attr]
    freed = tier.evict_bytes(1)
    assert freed > 0 and tier.entry(p) is not None
    tier.evict_bytes(1)
    assert tier.keys() == [p] and tier.entry(p).children == 0  # type: ignore[union-attr]
    tier.close()


def test_evict_bytes_frees_at_least_what_was_asked_leaf_first(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    chain = put_chain(tier, 0, 10)
    sizes = {k: tier.entry(k).stored_bytes for k in chain}  # type: ignore[union-attr]
    freed = tier.evict_bytes(sizes[chain[-1]] + sizes[chain[-2]] + 1)
    assert freed >= sizes[chain[-1]] + sizes[chain[-2]] + 1
    assert sorted(tier.keys()) == sorted(chain[:7])  # the three deepest pages went
    assert tier.evict_bytes(1 << 40) == sum(sizes[k] for k in chain[:7])
    assert tier.keys() == [] and files_on_disk(tmp_path) == []
    tier.close()


def test_lru_keeps_recently_read_pages(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    keys = [key(i) for i in range(4)]
    for k in keys:
        tier.put(k, None, NS, page_bytes(k), 2)
    read(tier, keys[0])
    tier.touch(keys[1])
    tier.evict_bytes(1)
    assert tier.entry(keys[2]) is None and tier.entry(keys[0]) and tier.entry(keys[1])
    tier.close()


def test_remove_deletes_file_and_entry(tmp_path: Path) -> None:
    tier = open_tier(tmp_path)
    a, b = put_chain(tier, 0, 2)
    assert tier.remove(a)
    assert not tier.remove(a)
    assert not page_file(tmp_path, a).exists()
    assert tier.entry(a) is None and tier.stats().pages == 1
    assert tier.put(a, None, NS, page_bytes(a), 2)  # re-put: b protects it again
    assert tier.entry(a).children == 1  # type: ignore[union-attr]
    assert read(tier, a) == page_bytes(a)
    tier.close()


def test_switching_policy_live_keeps_pages_and_leaf_first(tmp_path: Path) -> None:
    tier = open_tier(tmp_path, policy="lru")
    chain = put_chain(tier, 0, 6)
    tier.set_policy("s3fifo")
    assert tier.stats().policy == "s3fifo"
    tier.evict_bytes(1)
    assert sorted(tier.keys()) == sorted(chain[:5])
    tier.set_policy("lru")
    with pytest.raises(ValueError):
        tier.set_policy("fifo-ish")
    assert all(read(tier, k) == page_bytes(k) for k in chain[:5])
    tier.close()


# ---------------------------------------------------------------- concurrency


def test_four_threads_putting_and_reading_keep_bytes_exact(tmp_path: Path) -> None:
    one = PAGE  # a compressed page is smaller; half the 96 keys fit
    tier = open_tier(tmp_path, capacity=40 * one)
    errors: list[BaseException] = []
    delivered = [0]

    def work(t: int) -> None:
        rnd = random.Random(t)
        try:
            for _ in range(150):
                i = rnd.randrange(96)  # overlapping keys: threads race on the same pages
                k = key(i)
                tier.put(k, key(i - 1) if i % 8 else None, NS, page_bytes(k), 2)
                j = rnd.randrange(96)
                out = bytearray(PAGE)
                try:
                    tier.get_into(key(j), memoryview(out))
                except PageNotFound:
                    continue
                assert bytes(out) == page_bytes(key(j)), f"page {j} differs"
                delivered[0] += 1
                tier.stats()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    assert delivered[0] > 0
    s = tier.stats()
    assert s.stored_bytes <= 40 * one and s.corrupt_dropped == 0 and s.evictions > 0
    assert s.stored_bytes == sum(counted(p) for p in files_on_disk(tmp_path))
    assert sorted(p.name[:32] for p in files_on_disk(tmp_path)) == sorted(k.hex() for k in tier.keys())
    for k in tier.keys():
        assert read(tier, k) == page_bytes(k)
    tier.close()


# ---------------------------------------------------------------- crash


WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
sys.path.insert(0, sys.argv[3])
from test_disk import NS, key, page_bytes
from polarkvd.tiers.disk import DiskTier

tier = DiskTier(Path(sys.argv[1]), 1 << 30)
tier.open()
i = 0
while True:
    k = key(i)
    assert tier.put(k, key(i - 1) if i % 10 else None, NS, page_bytes(k), 2)
    if i % 25 == 24:
        tier.flush_index()
    print(i, flush=True)
    i += 1
"""


def test_sigkilled_writer_leaves_only_intact_pages(tmp_path: Path) -> None:
    root = tmp_path / "l4"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(REPO), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    last = -1
    try:
        for line in proc.stdout:
            last = int(line)
            if last >= 150:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert last >= 150, "the writer died before it was killed"

    tier = DiskTier(root, 1 << 30)
    report = tier.open()
    assert report.index_loaded  # a stale snapshot: the rest comes from headers
    keys = set(tier.keys())
    assert {key(i) for i in range(last + 1)} <= keys  # every put that returned survived
    assert keys <= {key(i) for i in range(last + 200)}
    for k in keys:
        assert read(tier, k) == page_bytes(k)
    assert not list(root.rglob("*.tmp"))
    assert report.pages == len(keys) and report.recovered > 0
    tier.close()


# ---------------------------------------------------------------- memory


def index_bytes_per_page(root: Path, n: int = 4000) -> float:
    """Python heap the tier holds per page: tracemalloc delta between n/2 and n small pages in chains
    of 10 (sizes above 256: no small-int sharing; stored sizes share objects per 512-byte unit)."""
    tier = open_tier(root)
    data = np.random.default_rng(7).bytes(512)

    def put_range(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            tier.put(key(i), key(i - 1) if i % 10 else None, NS, data, 2)

    put_range(0, n // 2)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        put_range(n // 2, n)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    tier.close()
    return (after - before) / (n - n // 2)


def test_index_memory_per_page(tmp_path: Path) -> None:
    per_page = index_bytes_per_page(tmp_path)
    print(f"disk tier index: {per_page:.0f} bytes per page")
    assert per_page <= 256  # the daemon's metadata bar, for pages on disk too


# ---------------------------------------------------------------- the cost policy


def test_the_cost_policy_keeps_deep_pages_and_their_depth_survives_a_restart(tmp_path: Path) -> None:
    """Under `cost` with a valuer that prices a page by its depth (as the manager's does), a tier
    over capacity drops shallow pages before deep ones, leaf-first still; the depths are in the
    index snapshot, so a reopened tier prices its pages the same."""
    root = tmp_path / "l4"
    stored = -(-(HEADER_SIZE + PAGE) // 512) * 512  # raw pages: they do not compress enough

    def by_depth(node) -> float:  # type: ignore[no-untyped-def]
        return (1 + node.depth) / node.stored_bytes

    tier = DiskTier(root, 40 * stored, policy="cost", min_ratio=100.0)  # min_ratio: stored raw
    tier.set_valuer(by_depth)
    tier.open()
    deep = [key(i) for i in range(20)]
    for d, k in enumerate(deep):  # one chain of 20, depths 0..19
        assert tier.put(k, deep[d - 1] if d else None, NS, page_bytes(k), 2, depth=d)
    shallow = [key(1000 + i) for i in range(20)]
    for k in shallow:  # 20 one-page prompts
        assert tier.put(k, None, NS, page_bytes(k), 2, depth=0)
    more = [key(2000 + i) for i in range(10)]
    for k in more:  # 10 more: 10 must go
        assert tier.put(k, None, NS, page_bytes(k), 2, depth=0)
    kept = set(tier.keys())
    assert set(deep) <= kept and len([k for k in shallow if k not in kept]) >= 10
    tier.close()

    again = DiskTier(root, 40 * stored, policy="cost", min_ratio=100.0)
    again.set_valuer(by_depth)
    assert again.open().index_loaded
    assert [again.entry(k).depth for k in deep] == list(range(20))  # type: ignore[union-attr]
    again.close()


def test_an_index_snapshot_without_depths_is_still_read(tmp_path: Path) -> None:
    """A snapshot written before pages had depths (format 1) is read, its pages at depth 0."""
    import msgpack

    from polarkvd.tiers import disk_format

    root = tmp_path / "l4"
    tier = open_tier(root)
    keys = put_chain(tier, 0, 3)
    tier.close()
    rows = [(k, keys[i - 1] if i else None, 0, PAGE, counted(page_file(root, k))) for i, k in enumerate(keys)]
    body = msgpack.packb({"format": 1, "namespaces": [NS], "pages": rows})
    head = disk_format._INDEX_HEAD.pack(disk_format._INDEX_MAGIC, xxhash.xxh3_64_intdigest(body))
    (root / disk_format.INDEX_NAME).write_bytes(head + body)
    again = DiskTier(root, 1 << 30)
    report = again.open()
    assert report.index_loaded and report.recovered == 0 and report.pages == 3
    assert [again.entry(k).depth for k in keys] == [0, 0, 0]  # type: ignore[union-attr]
    again.close()

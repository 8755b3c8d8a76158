"""Page keys: frozen golden vectors, agreement across processes, namespaces and the seed inside every key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import xxhash

from polarkvd.keys import ROOT_KEY, chunk_keys, chunk_root, namespace_digest, page_keys, seed_fingerprint
from polarkvd.types import Namespace
from tests.conftest import REPO_ROOT, TEST_NS, clean_env

SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))

# Computed once from the scheme in keys.py and frozen: if any of these change, every cache on every
# host silently stops hitting (or, worse, two schemes disagree between daemon versions of a cluster).
GOLDEN_NS_DIGEST = "b87972e1bcc2c088c93989360ab58829"
GOLDEN_KEYS_RANGE48 = [
    "6ee079454c620381fa49b8c8d295ba82",
    "4b9af2a8011a620e90861ab546668786",
    "af74a38e6d1858199d424584899df17e",
]
GOLDEN_FINGERPRINT = "92a474de9fa657c3"


def test_golden_vectors() -> None:
    digest = namespace_digest(TEST_NS, SEED)
    assert digest.hex() == GOLDEN_NS_DIGEST
    assert [k.hex() for k in page_keys(digest, list(range(48)), 16)] == GOLDEN_KEYS_RANGE48
    assert seed_fingerprint(SEED) == GOLDEN_FINGERPRINT


def test_the_digest_is_keyed_blake2b_of_the_documented_fields() -> None:
    fields = [getattr(TEST_NS, f.name) for f in dataclasses.fields(Namespace)]
    expected = hashlib.blake2b(msgpack.packb(fields), digest_size=16, key=SEED, person=b"polarkv-ns-v2")
    assert namespace_digest(TEST_NS, SEED) == expected.digest()


def test_another_seed_changes_the_digest_every_key_and_the_fingerprint() -> None:
    """Without the seed nobody can compute a key: a second seed shares no key with the first."""
    tokens = list(range(16 * 10))
    a = page_keys(namespace_digest(TEST_NS, SEED), tokens, 16)
    b = page_keys(namespace_digest(TEST_NS, OTHER_SEED), tokens, 16)
    assert len(a) == len(b) == 10 and not set(a) & set(b)
    assert seed_fingerprint(SEED) != seed_fingerprint(OTHER_SEED)
    # the fingerprint is not the digest of any namespace (it is published; digests are not)
    assert seed_fingerprint(SEED) not in namespace_digest(TEST_NS, SEED).hex()


@pytest.mark.parametrize("bad", [b"", bytes(16), bytes(33), "0" * 32, None])
def test_seeds_other_than_32_bytes_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        namespace_digest(TEST_NS, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32 bytes"):
        seed_fingerprint(bad)  # type: ignore[arg-type]


def test_keys_follow_the_documented_chain() -> None:
    """key[n] = xxh3_128(key[n-1] ‖ ns digest ‖ uint32le tokens), key[-1] = 16 zero bytes."""
    digest = namespace_digest(TEST_NS, SEED)
    tokens = np.arange(48, dtype="<u4")
    prev = bytes(16)
    expected = []
    for i in range(3):
        prev = xxhash.xxh3_128_digest(prev + digest + tokens[i * 16 : (i + 1) * 16].tobytes())
        expected.append(prev)
    assert page_keys(digest, range(48), 16) == expected
    # A chain continues from a parent: the keys of pages 2..3 given page 1's key are the same keys.
    assert page_keys(digest, range(16, 48), 16, parent=expected[0]) == expected[1:]
    # numpy arrays of any integer dtype give the same keys as lists
    assert page_keys(digest, np.arange(48, dtype=np.int64), 16) == expected


_CHILD = (
    "import json, sys; from polarkvd.keys import namespace_digest, page_keys; from tests.conftest import TEST_NS;"
    "d = namespace_digest(TEST_NS, bytes.fromhex(sys.argv[2]));"
    "print(json.dumps([d.hex()] + [k.hex() for k in page_keys(d, json.loads(sys.argv[1]), TEST_NS.page_tokens)]))"
)


def test_two_processes_compute_the_same_keys_for_the_same_seed() -> None:
    tokens = [int(t) for t in np.random.default_rng(7).integers(0, 2**32, 16 * 20, dtype=np.uint64)]
    # Different hash seeds: a scheme that leaned on Python's hash() would disagree here.
    runs = [(1, SEED), (2, SEED), (3, OTHER_SEED)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, json.dumps(tokens), seed.hex()],
            stdout=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=clean_env(PYTHONHASHSEED=str(hash_seed)),
        )
        for hash_seed, seed in runs
    ]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    digest = namespace_digest(TEST_NS, SEED)
    here = [digest.hex()] + [k.hex() for k in page_keys(digest, tokens, 16)]
    assert outs[0] == outs[1] == here
    assert len(here) == 21
    assert not set(outs[2]) & set(here)  # another seed: no digest or key in common


def test_partial_trailing_page_gets_no_key() -> None:
    digest = namespace_digest(TEST_NS, SEED)
    assert page_keys(digest, range(15), 16) == []
    assert page_keys(digest, [], 16) == []
    full = page_keys(digest, range(48), 16)
    for n in (33, 40, 47):
        assert page_keys(digest, range(n), 16) == full[:2]
    # tokens after the last full page never change the keys before them
    assert page_keys(digest, list(range(32)) + [999] * 15, 16) == full[:2]


def _variants() -> list[tuple[str, Namespace]]:
    changed = {
        "model": "test-model@1",
        "dtype": "float16",
        "layout": "test/v2",
        "num_layers": 5,
        "num_kv_heads": 4,
        "head_dim": 128,
        "page_tokens": 32,
        "tp_rank": 1,
        "tp_size": 2,
        "kv_parts": 1,
        "cache_salt": "tenant-a",
    }
    names = {f.name for f in dataclasses.fields(Namespace)}
    assert set(changed) == names, "a Namespace field was added: give it a variant here"
    out = []
    for name, value in changed.items():
        extra = {"tp_size": 2} if name == "tp_rank" else {}
        out.append((name, dataclasses.replace(TEST_NS, **{name: value}, **extra)))
    return out


@pytest.mark.parametrize(("field", "ns"), _variants(), ids=[n for n, _ in _variants()])
def test_every_namespace_field_changes_every_key(field: str, ns: Namespace) -> None:
    assert not ns.problems()
    tokens = list(range(128))
    base = page_keys(namespace_digest(TEST_NS, SEED), tokens, TEST_NS.page_tokens)
    other = page_keys(namespace_digest(ns, SEED), tokens, ns.page_tokens)
    assert namespace_digest(ns, SEED) != namespace_digest(TEST_NS, SEED)
    assert other and not set(base) & set(other)


def test_two_salts_never_share_a_key() -> None:
    a = namespace_digest(dataclasses.replace(TEST_NS, cache_salt="a"), SEED)
    b = namespace_digest(dataclasses.replace(TEST_NS, cache_salt="b"), SEED)
    assert not set(page_keys(a, range(160), 16)) & set(page_keys(b, range(160), 16))


@pytest.mark.parametrize(
    "bad",
    [
        [2**32] + [0] * 15,
        [0] * 15 + [2**32 + 5],
        [2**63 - 1] * 16,
        np.full(16, 2**32, dtype=np.uint64),
        [-1] + [0] * 15,
    ],
    ids=["2**32-first", "2**32-last", "2**63-1", "uint64-array", "negative"],
)
def test_token_ids_outside_uint32_are_rejected(bad: object) -> None:
    # Truncating to 32 bits would alias two different token sequences onto one key.
    with pytest.raises(ValueError, match="uint32"):
        page_keys(namespace_digest(TEST_NS, SEED), bad, 16)  # type: ignore[arg-type]


def test_largest_uint32_token_is_accepted() -> None:
    keys = page_keys(namespace_digest(TEST_NS, SEED), [2**32 - 1] * 16, 16)
    assert len(keys) == 1 and keys[0] != page_keys(namespace_digest(TEST_NS, SEED), [0] * 16, 16)[0]


def test_bad_digest_parent_or_page_size_rejected() -> None:
    digest = namespace_digest(TEST_NS, SEED)
    with pytest.raises(ValueError):
        page_keys(digest[:8], range(16), 16)
    with pytest.raises(ValueError):
        page_keys(digest, range(16), 16, parent=b"short")
    with pytest.raises(ValueError):
        page_keys(digest, range(16), 0)
    assert ROOT_KEY == bytes(16)


# ------------------------------------------------------------------------------ chunk pages (blend)


def test_chunk_keys_follow_the_documented_chain_and_key_a_partial_last_page() -> None:
    digest = namespace_digest(TEST_NS, SEED)
    tokens = list(range(40))  # two full pages of 16 and one of 8
    keys = chunk_keys(digest, tokens, 16)
    prev = ROOT_KEY
    for n, key in enumerate(keys):
        data = np.asarray(tokens[n * 16 : (n + 1) * 16], dtype="<u4").tobytes()
        prev = xxhash.xxh3_128_digest(b"\xc4\x01" + prev + digest + data)
        assert key == prev
    assert len(keys) == 3


def test_chunk_keys_never_equal_prefix_keys_of_the_same_or_any_tokens() -> None:
    """The same token sequences keyed both ways, whole and as every prefix of a few: no key in common."""
    digest = namespace_digest(TEST_NS, SEED)
    rng = np.random.default_rng(7)
    prefix, chunk = set(), set()
    for n in range(1, 200):
        tokens = rng.integers(0, 50_000, n).tolist()
        prefix.update(page_keys(digest, tokens, 16))
        chunk.update(chunk_keys(digest, tokens, 16))
        # a chunk's pages never stand for the prefix that starts with the same tokens, either
        assert not set(chunk_keys(digest, tokens, 16)) & set(page_keys(digest, tokens, 16))
    assert prefix and chunk and not prefix & chunk


def test_two_salts_never_share_a_chunk() -> None:
    tokens = list(range(100))
    a = chunk_keys(namespace_digest(dataclasses.replace(TEST_NS, cache_salt="alice"), SEED), tokens, 16)
    b = chunk_keys(namespace_digest(dataclasses.replace(TEST_NS, cache_salt="bob"), SEED), tokens, 16)
    c = chunk_keys(namespace_digest(TEST_NS, SEED), tokens, 16)
    assert len(a) == len(b) == len(c) == 7
    assert not set(a) & set(b) and not set(a) & set(c) and not set(b) & set(c)


def test_a_chunk_of_other_length_shares_only_its_full_leading_pages() -> None:
    """The partial last page's key carries the chunk's length: a longer chunk never loads it."""
    digest = namespace_digest(TEST_NS, SEED)
    short, long_ = chunk_keys(digest, list(range(40)), 16), chunk_keys(digest, list(range(44)), 16)
    assert short[:2] == long_[:2] and short[2] != long_[2]


# -------------------------------------------------------- chunks computed behind a header (context)


def test_a_chunk_behind_a_context_chains_from_the_contexts_root() -> None:
    digest = namespace_digest(TEST_NS, SEED)
    header, tokens = [7, 8, 9], list(range(40))
    root = xxhash.xxh3_128_digest(b"\xc4\x02" + digest + np.asarray(header, dtype="<u4").tobytes())
    assert chunk_root(digest, header) == root and chunk_root(digest, []) == ROOT_KEY
    prev = root
    for n, key in enumerate(chunk_keys(digest, tokens, 16, context=header)):
        data = np.asarray(tokens[n * 16 : (n + 1) * 16], dtype="<u4").tobytes()
        prev = xxhash.xxh3_128_digest(b"\xc4\x01" + prev + digest + data)
        assert key == prev
    # no context: the chunk from position 0, keyed as before contexts existed
    assert chunk_keys(digest, tokens, 16, context=[]) == chunk_keys(digest, tokens, 16)


def test_chunks_behind_a_context_never_share_a_key_with_prefixes_other_contexts_or_position_zero() -> None:
    """Every key of a chunk behind each of a few headers, against: the prefix pages of the header and
    the chunk as one prompt (the tokens they stand for), the same chunk from position 0, and the same
    chunk behind every other header (one a prefix of another among them)."""
    digest = namespace_digest(TEST_NS, SEED)
    rng = np.random.default_rng(11)
    headers = [[], [1], [1, 2], [2, 1], rng.integers(0, 50_000, 33).tolist(), list(range(16))]
    for n in (1, 15, 16, 17, 100):
        tokens = rng.integers(0, 50_000, n).tolist()
        families = [set(chunk_keys(digest, tokens, 16, context=h)) for h in headers]
        for h, keys in zip(headers, families):
            assert len(keys) == -(-n // 16)
            assert not keys & set(page_keys(digest, h + tokens, 16))
            assert not keys & set(page_keys(digest, tokens, 16))
        for a in range(len(families)):
            for b in range(a + 1, len(families)):
                assert not families[a] & families[b], (headers[a], headers[b])


def test_a_chunk_behind_a_header_under_another_salt_shares_nothing() -> None:
    header, tokens = list(range(20)), list(range(100, 200))
    a = chunk_keys(
        namespace_digest(dataclasses.replace(TEST_NS, cache_salt="alice"), SEED), tokens, 16, header
    )
    b = chunk_keys(namespace_digest(dataclasses.replace(TEST_NS, cache_salt="bob"), SEED), tokens, 16, header)
    assert len(a) == len(b) == 7 and not set(a) & set(b)


@pytest.mark.parametrize("bad", [[-1], [2**32]])
def test_a_context_outside_uint32_is_rejected(bad: list[int]) -> None:
    with pytest.raises(ValueError, match="uint32"):
        chunk_keys(namespace_digest(TEST_NS, SEED), [1, 2], 16, context=bad)

"""`where` on one daemon: how many leading tokens of a prompt are cached here, by tier, answered
from the maps (no page touched), and a clear error for every kind of bad request."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from polarkvd.errors import PolarKVError
from tests.conftest import TEST_NS, DaemonProc, chain_tokens, store_chain

PT = TEST_NS.page_tokens


@pytest.fixture(scope="module")
def stored(module_daemon_factory) -> tuple[DaemonProc, list[int], list[bytes], str]:
    """Ten pages of a prompt's first eight stored; pages 5.. of them demoted to disk."""
    d = module_daemon_factory({"dram.high_watermark": "1.0"})
    tokens = chain_tokens(1, 10)
    with d.engine() as kv:
        keys = store_chain(kv, tokens[: 8 * PT])
        digest = kv.ns_digest.hex()
    with d.control() as c:
        c.evict_keys([keys[5]])
    return d, tokens, keys, digest


def test_leading_tokens_by_tier(stored) -> None:
    d, tokens, keys, digest = stored
    with d.engine(lookup_table=False) as kv:
        kv.lookup(keys)  # one engine lookup, counted: the counters below exist
    with d.control() as c:
        before = d.stats()["counters"]
        out = c.where({"namespace": digest, "tokens": tokens + [7] * (PT - 1)})  # a partial page too
        assert out["here"] == {"tokens": 8 * PT, "l1": 0, "dram": 5 * PT, "disk": 3 * PT}
        assert out["tokens"] == 10 * PT and out["page_tokens"] == PT and out["namespace"] == digest
        assert "cluster" not in out  # a daemon without a cluster
        # the same with the ids packed as uint32 little-endian bytes
        packed = np.asarray(tokens, "<u4").tobytes()
        assert c.where({"namespace": digest, "tokens": packed})["here"] == out["here"]
        # the same by model name and page keys
        by_model = c.where({"model": TEST_NS.model, "salt": "", "keys": keys[:6]})
        assert by_model["here"] == {"tokens": 6 * PT, "l1": 0, "dram": 5 * PT, "disk": PT}
        # another prompt that shares only the first page
        other = tokens[:PT] + chain_tokens(2, 3)
        assert c.where({"namespace": digest, "tokens": other})["here"]["tokens"] == PT
    after = d.stats()["counters"]
    assert "lookup_pages" in before  # the names below are the daemon's
    # answered from the maps: no lookup counted, nothing promoted from disk
    for name in (
        "lookups",
        "lookup_pages",
        "hit_pages_dram",
        "hit_pages_disk",
        "miss_pages",
        "promoted_pages",
    ):
        assert after.get(name, 0) == before.get(name, 0), name


BAD = [
    ({"tokens": [1, 2]}, "give either namespace"),
    ({"namespace": "ab" * 16, "model": "m", "tokens": [1]}, "give either namespace"),
    ({"namespace": "zz", "tokens": [1]}, "32 hex digits"),
    ({"namespace": "00" * 16, "tokens": [1]}, "not known here"),
    ({"model": "no-such-model", "tokens": [1]}, "no namespace of model"),
    ({"model": TEST_NS.model, "salt": 3, "tokens": [1]}, "salt a string"),
    ({"model": TEST_NS.model}, "give either tokens"),
    ({"model": TEST_NS.model, "tokens": "1 2 3"}, "array of token ids"),
    ({"model": TEST_NS.model, "tokens": [1, "x"]}, "integers from 0"),
    ({"model": TEST_NS.model, "tokens": [1, -5]}, "integers from 0"),
    ({"model": TEST_NS.model, "tokens": [1, 2**40]}, "integers from 0"),
    ({"model": TEST_NS.model, "tokens": [1.5, 2.5]}, "integers from 0"),
    ({"model": TEST_NS.model, "tokens": [[1], [2]]}, "integers from 0"),
    ({"model": TEST_NS.model, "keys": [b"short"]}, "16 bytes"),
    ({"model": TEST_NS.model, "tokens": b"\x01\x02\x03"}, "multiple of 4 bytes"),
    ({"model": TEST_NS.model, "tokens": [0] * (((1 << 16) + 1) * PT)}, "exceed the limit"),
    ({"model": TEST_NS.model, "tokens": [1], "page": 3}, "unknown arguments"),
]


@pytest.mark.parametrize(("args", "why"), BAD, ids=[w for _, w in BAD])
def test_bad_requests_get_a_clear_error(stored, args, why) -> None:
    d, tokens, _, digest = stored
    with d.control() as c:
        with pytest.raises(PolarKVError, match=why):
            c.where(args)
        assert c.where({"namespace": digest, "tokens": tokens[:PT]})["here"]["tokens"] == PT  # still serving


def test_cli_prints_tokens_by_tier(stored) -> None:
    d, tokens, _, digest = stored
    out = subprocess.run(
        [sys.executable, "-m", "polarkvd", "where", "--socket", str(d.control_socket), "--namespace", digest,
         "--tokens", ",".join(map(str, tokens))],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert f"{8 * PT} of {10 * PT} tokens here" in out.stdout
    assert f"DRAM {5 * PT}" in out.stdout and f"disk {3 * PT}" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "polarkvd", "where", "--socket", str(d.control_socket), "--model", "nope", "--tokens", "1,2"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0 and "no namespace of model" in bad.stderr

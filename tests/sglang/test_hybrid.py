"""Hybrid models (SGLang's v2 calls): SGLang's Mamba2 state pool and its host pool beside the KV pool,
registered through the HybridCacheController; states stored by one process are loaded byte-identical
by another, and `batch_exists_v2` answers exactly as SGLang's own HiCacheFile does, hit policies
included."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.sglang.conftest import Rig, unique

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(600)]

#: (seed, KV pages stored, pages whose Mamba state is stored)
CASES = [(101, 8, [3, 7]), (102, 8, list(range(8))), (103, 8, []), (104, 8, [5, 6]), (105, 6, [1, 5])]


def test_mamba_states_across_processes_and_hit_policies_as_hicachefile(
    daemon_factory, tmp_path: Path, a: Rig, b: Rig
) -> None:
    d = daemon_factory()
    w, r, ref = unique("hw"), unique("hr"), unique("hf")
    a.stack(w, d.engine_socket, mamba={})
    b.stack(r, d.engine_socket, mamba={})
    b.send("stack", name=ref, spec={"mamba": {}, "backend": "file", "path": str(tmp_path / "hicache")})

    for seed, pages, states in CASES:
        put = a.send("hybrid", name=w, fn="set", seed=seed, pages=pages, states=states)
        assert put["kv"] == [True] * pages and put["states"] == ([[True] * len(states)] if states else [])
        b.send("hybrid", name=ref, fn="set", seed=seed, pages=pages, states=states)

    got = b.send("hybrid", name=r, fn="get", seed=101, pages=8, states=[3, 7])
    assert got["states"] == [True, True] and got["match"] and got["type"] == "dict"
    assert b.send("hybrid", name=r, fn="get", seed=101, pages=8, states=[4])["states"] == [False]

    for seed, pages, _ in CASES:
        for query in (pages, pages + 2):
            for policy, trailing in (("all_pages", 1), ("trailing_pages", 1), ("trailing_pages", 2)):
                ask = {"fn": "exists", "seed": seed, "pages": query, "policy": policy, "trailing": trailing}
                ours = b.send("hybrid", name=r, **ask)
                theirs = b.send("hybrid", name=ref, **ask)
                ours.pop("event"), theirs.pop("event")
                assert ours == theirs, (seed, query, policy, trailing)
    # one case spelled out: states at pages 3 and 7 restore prefixes of 4 and 8 pages
    one = b.send("hybrid", name=r, fn="exists", seed=101, pages=8, policy="trailing_pages", trailing=1)
    assert (
        one["kv_hit_pages"] == 8 and one["restorable"] == [4, 8] and one["pool_hits"] == {"kv": 8, "mamba": 8}
    )


def test_hybrid_calls_with_the_daemon_down_are_misses(tmp_path: Path, a: Rig) -> None:
    name = unique("hdown")
    a.stack(name, tmp_path / "nothing" / "engine.sock", mamba={})
    ex = a.send("hybrid", name=name, fn="exists", seed=111, pages=4)
    assert ex["type"] == "PoolTransferResult" and ex["kv_hit_pages"] == 0 and ex["restorable"] == []
    put = a.send("hybrid", name=name, fn="set", seed=111, pages=4, states=[1, 3])
    assert put["states"] == [[False, False]]
    got = a.send("hybrid", name=name, fn="get", seed=111, pages=4, states=[1, 3])
    assert got["states"] == [False, False] and got["type"] == "dict"

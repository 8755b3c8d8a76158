"""Pages never cross models, TP ranks, page sizes or layouts, even under the very same SGLang keys
(SGLang's keys hold neither model nor rank): the namespace is in every polarkvd key. And tenants
stay apart through SGLang's own key chain (`cache_salt`, the extra key of LoRA adapters)."""

from __future__ import annotations

import hashlib

import pytest

from tests.sglang.conftest import Rig, unique

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(600)]


def _keys(tag: str, n: int) -> list[str]:
    """n SGLang-like keys (64 hex characters), the same in every stack that asks."""
    return [hashlib.sha256(f"{tag}/{i}".encode()).hexdigest() for i in range(n)]


def test_models_ranks_page_sizes_and_layouts_never_share_pages(daemon_factory, a: Rig, b: Rig) -> None:
    d = daemon_factory()
    base = {"model": "org/model-a", "tp_rank": 0, "tp_size": 2, "page": 16, "layout": "page_first"}
    others = {
        "another model": {**base, "model": "org/model-b"},
        "another TP rank": {**base, "tp_rank": 1},
        "another TP size": {**base, "tp_size": 4},
        "another page size": {**base, "page": 32},
        "another layout": {**base, "layout": "layer_first"},
        "another dtype": {**base, "dtype": "float16"},
    }
    keys = _keys(unique("ns"), 6)
    writer = unique("base")
    a.stack(writer, d.engine_socket, **base)
    put = a.send("raw", name=writer, fn="batch_set_v1", seed=51, pages=6, keys=keys)
    assert put["result"] == [True] * 6

    same = unique("same")
    b.stack(same, d.engine_socket, **base)  # the control: same namespace, another process
    assert b.send("raw", name=same, fn="batch_exists", seed=51, pages=6, keys=keys)["result"] == 6
    got = b.send("raw", name=same, fn="batch_get_v1", seed=51, pages=6, keys=keys)
    assert got["ok"] == 6 and got["match"]

    for what, spec in others.items():
        name = unique("other")
        b.stack(name, d.engine_socket, **spec)
        pages = 6 * 16 // spec["page"]
        assert b.send("raw", name=name, fn="batch_exists", seed=51, pages=pages, keys=keys)["result"] == 0, (
            what
        )
        res = b.send("raw", name=name, fn="batch_get_v1", seed=51, pages=6, keys=keys[:pages])
        assert res["result"] == [False] * pages, what
        b.send("close", name=name)


def test_cache_salt_and_extra_keys_keep_tenants_apart(daemon_factory, a: Rig, b: Rig) -> None:
    """SGLang folds a request's cache_salt and extra key (a LoRA adapter) into the start of its key
    chain; through the real controller, another tenant's identical prompt misses."""
    d = daemon_factory()
    w, r = unique("tw"), unique("tr")
    a.stack(w, d.engine_socket)
    b.stack(r, d.engine_socket)
    assert a.send("write", name=w, seed=61, pages=5, salt="tenant-1")["stored_tokens"] == 80
    assert a.send("write", name=w, seed=62, pages=5, extra_key="lora-a")["stored_tokens"] == 80

    hit = b.send("read", name=r, seed=61, pages=5, salt="tenant-1")
    assert hit["loaded_tokens"] == 80 and hit["match"]
    assert b.send("read", name=r, seed=61, pages=5, salt="tenant-2")["hit_tokens"] == 0
    assert b.send("read", name=r, seed=61, pages=5)["hit_tokens"] == 0
    assert b.send("read", name=r, seed=62, pages=5, extra_key="lora-a")["loaded_tokens"] == 80
    assert b.send("read", name=r, seed=62, pages=5, extra_key="lora-b")["hit_tokens"] == 0
    assert b.send("read", name=r, seed=62, pages=5)["hit_tokens"] == 0

"""What goes into the connector's namespace, and its options (no engine: imports the connector only)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from polarkvd.errors import ConfigError
from polarkvd.keys import namespace_digest, page_keys

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

connector = pytest.importorskip("polarkvd.connectors.vllm", reason="needs vllm")


class FakeHFConfig:
    def __init__(self, **kw: object) -> None:
        self.kw = {"model_type": "llama", "num_hidden_layers": 30, "_name_or_path": "/somewhere", **kw}

    def to_dict(self) -> dict[str, object]:
        return dict(self.kw)


def model_config(path: Path, dtype: str = "torch.float32", **hf: object) -> SimpleNamespace:
    return SimpleNamespace(
        model=str(path), hf_config=FakeHFConfig(**hf), dtype=dtype, quantization=None, revision=None
    )


def make_model(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_fingerprint_names_the_weights_not_the_path(tmp_path: Path) -> None:
    weights = bytes(range(256)) * 40_000  # 10 MB: sampled, not read whole
    a = make_model(tmp_path / "a" / "smol", weights)
    b = tmp_path / "b" / "smol"
    shutil.copytree(a, b)
    tuned = make_model(tmp_path / "c" / "smol", bytes(reversed(weights)))
    fp = connector.model_fingerprint
    assert fp(model_config(a)) == fp(model_config(b))  # same files elsewhere: pages are shared
    assert fp(model_config(a)).startswith("smol@")
    assert fp(model_config(tuned)) != fp(model_config(a))  # a fine-tune with the same config: never
    assert fp(model_config(a, dtype="torch.bfloat16")) != fp(model_config(a))
    assert fp(model_config(a, rope_theta=1e6)) != fp(model_config(a))


def geometry(**kw: object) -> object:
    base = dict(
        model="smol@x", dtype="float32", layout="vllm-cpu-lbhnc-vec/v1", layer_names=("l0", "l1"),
        num_kv_heads=3, head_dim=64, kv_parts=2, block_size=128, page_blocks=1, block_bytes=196608,
        num_blocks=10, tp_size=2,
    )  # fmt: skip
    base.update(kw)
    return connector.Geometry(**base)


def test_salt_and_tp_rank_change_every_key_and_page_size_matches_vllm_blocks() -> None:
    g = geometry()
    tokens = list(range(1000, 1256))
    keys = {
        (salt, rank): page_keys(namespace_digest(g.namespace(salt, rank), bytes(32)), tokens, g.page_tokens)
        for salt in ("", "alice", "bob")
        for rank in (0, 1)
    }
    assert len({k[0] for k in keys.values()}) == 6  # every (salt, rank) pair has its own first key
    assert g.namespace("", 0).page_bytes == g.num_layers * g.page_blocks * g.block_bytes
    assert geometry(page_blocks=2).namespace("", 0).page_tokens == 256


def test_the_scheduler_keys_are_the_daemons_and_follow_a_new_seed(daemon_factory) -> None:
    """The connector chains its keys from the digests the daemon returns (it cannot compute them: the
    seed stays in the daemon); a daemon back with another seed gives new digests and new keys."""
    from polarkvd.client import EngineClient

    d = daemon_factory()
    g = geometry()  # TP 2: one session per rank, each with its own digest
    now = [0.0]
    sched = connector.SchedulerSide(g, connector.Options(socket=str(d.engine_socket)))
    sched.link._clock = lambda: now[0]  # reconnection backoff without waiting
    tokens = list(range(1000, 1000 + 3 * g.page_tokens))
    req = SimpleNamespace(request_id="r", cache_salt="alice", all_token_ids=tokens, num_tokens=len(tokens))

    def store_both_ranks() -> list[list[bytes]]:
        out = []
        for rank in range(g.tp_size):
            with EngineClient(g.namespace("alice", rank), "test", d.engine_socket) as kv:
                keys = kv.page_keys(tokens)[:2]
                kv.store(keys, [bytes(kv.page_bytes)] * 2)
                out.append(keys)
        return out

    try:
        before = store_both_ranks()
        # 3 pages of prompt, one token left to compute: 2 pages (256 tokens) come from the daemon
        assert sched.get_num_new_matched_tokens(req, 0) == (2 * g.page_tokens, False)
        assert sched._reqs["r"].keys == before

        d.stop()
        (d.root / "state" / "page-seed").unlink()  # the operator replaced the seed
        d.start()
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # finds the daemon gone
        now[0] += 60.0
        after = store_both_ranks()
        assert not {k for ks in after for k in ks} & {k for ks in before for k in ks}
        assert sched.get_num_new_matched_tokens(req, 0) == (2 * g.page_tokens, False)
        assert sched._reqs["r"].keys == after
    finally:
        sched.close()


def test_options_refuse_unknown_keys_and_bad_values() -> None:
    assert connector.Options.from_extra(None) == connector.Options()
    assert connector.Options.from_extra({"page_blocks": 2, "timeout": 1}).timeout == 1.0
    with pytest.raises(ConfigError) as e:
        connector.Options.from_extra(
            {"sokcet": "/x", "page_blocks": 0, "load_mode": "fast", "save_decode": "yes"}
        )
    text = str(e.value)
    for key in ("sokcet", "page_blocks", "load_mode", "save_decode"):
        assert f"kv_connector_extra_config.{key}" in text


def test_copy_modes_default_to_layer_on_gpus_and_step_on_cpus() -> None:
    opts = connector.Options()
    assert (opts.load_mode, opts.save_mode) == ("auto", "auto")
    assert connector.copy_mode(opts.load_mode, cuda=True) == "layer"  # copies overlap the GPU's compute
    assert connector.copy_mode(opts.load_mode, cuda=False) == "step"  # they would compete with the model
    for mode in ("layer", "step"):  # an explicit choice stands on both
        assert connector.copy_mode(mode, cuda=True) == connector.copy_mode(mode, cuda=False) == mode
    assert connector.Options.from_extra({"load_mode": "layer", "save_mode": "step"}).load_mode == "layer"

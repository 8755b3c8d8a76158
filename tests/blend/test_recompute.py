"""Selective recompute on the real SmolLM2: r = 1 is a full prefill, one chunk at position 0 is prefix
reuse, re-rotation moves keys exactly, recompute beats plain reuse, and unsupported models are refused."""

from __future__ import annotations

from typing import Any

import pytest

from polarkvd.blend import Segment, UnsupportedModel, blend, compute_chunk, model_parts, rotate
from tests.blend.conftest import DOCS, PREFIX, QUESTION

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow


def _tokens(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _full(model: Any, ids: list[int]) -> tuple[Any, Any, Any]:
    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True)
    layers = out.past_key_values.layers
    return (
        torch.stack([lay.keys[0] for lay in layers]),
        torch.stack([lay.values[0] for lay in layers]),
        out.logits[0, -1],
    )


def _segments(model: Any, tok: Any) -> list[Segment]:
    chunks = [_tokens(tok, d) for d in DOCS]
    cached = [Segment(c, compute_chunk(model, c)) for c in chunks]
    return [Segment(_tokens(tok, PREFIX)), *cached, Segment(_tokens(tok, QUESTION))]


def test_r_one_gives_a_full_prefills_kv_and_the_same_greedy_answer(smollm2: tuple[Any, Any]) -> None:
    model, tok = smollm2
    segments = _segments(model, tok)
    ids = [t for s in segments for t in s.token_ids]
    keys, values, logits = _full(model, ids)
    b = blend(model, segments, r=1.0)
    assert b.recomputed == b.reused == sum(len(s.token_ids) for s in segments[1:-1])
    torch.testing.assert_close(b.keys, keys, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(b.values, values, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(b.logits, logits, atol=2e-4, rtol=1e-4)

    from polarkvd.connectors.hf import Prefill

    p = Prefill(ids, b.keys, b.values, b.logits)
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        want = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False
        )
        got = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            past_key_values=p.cache(model, len(ids) - 1),
            max_new_tokens=24,
            do_sample=False,
        )
    assert got.tolist() == want.tolist()
    assert "Nile" in tok.decode(want[0, len(ids) :])


def test_one_chunk_at_position_zero_equals_prefix_reuse(smollm2: tuple[Any, Any]) -> None:
    """A chunk first in the prompt was computed exactly where it lands: blending it (any r) gives what
    prefix caching gives, the question computed over the chunk's cached KV."""
    from transformers import DynamicCache

    model, tok = smollm2
    chunk, question = _tokens(tok, DOCS[0]), _tokens(tok, QUESTION)
    kv = compute_chunk(model, chunk)
    past = DynamicCache(config=model.config)
    for i in range(kv.keys.shape[0]):
        past.update(kv.keys[i][None].clone(), kv.values[i][None].clone(), i)
    with torch.inference_mode():
        out = model(torch.tensor([question]), past_key_values=past, use_cache=True)
    want_k = torch.stack([lay.keys[0] for lay in out.past_key_values.layers])
    for r in (0.0, 0.15, 1.0):
        b = blend(model, [Segment(chunk, kv), Segment(question)], r=r)
        torch.testing.assert_close(b.keys, want_k, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(b.logits, out.logits[0, -1], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("offset", [1, 37, 1000])
def test_rerotated_keys_equal_keys_computed_at_the_offset(smollm2: tuple[Any, Any], offset: int) -> None:
    model, tok = smollm2
    chunk = _tokens(tok, DOCS[1])
    kv = compute_chunk(model, chunk)
    positions = torch.arange(offset, offset + len(chunk))[None]
    with torch.inference_mode():
        out = model(torch.tensor([chunk]), position_ids=positions, use_cache=True)
    at_offset = torch.stack([lay.keys[0] for lay in out.past_key_values.layers])
    moved = rotate(kv.keys, offset, model_parts(model).inv_freq)
    torch.testing.assert_close(moved, at_offset, atol=5e-4, rtol=1e-4)
    assert not torch.allclose(kv.keys, at_offset, atol=1e-2)  # the move is not a no-op


def test_recompute_brings_the_kv_closer_to_a_full_prefill_than_plain_reuse(smollm2: tuple[Any, Any]) -> None:
    model, tok = smollm2
    segments = _segments(model, tok)
    keys, _, logits = _full(model, [t for s in segments for t in s.token_ids])
    errs = {r: (blend(model, segments, r=r).keys - keys).norm().item() for r in (0.0, 0.15, 0.5)}
    assert errs[0.5] < errs[0.15] < errs[0.0]


def test_bad_options_are_refused(smollm2: tuple[Any, Any]) -> None:
    model, tok = smollm2
    segments = _segments(model, tok)
    with pytest.raises(ValueError, match="r must be"):
        blend(model, segments, r=1.5)
    with pytest.raises(ValueError, match="check layers"):
        blend(model, segments, check_layers=[99])
    with pytest.raises(ValueError, match="question"):
        blend(model, segments[:-1])


def _tiny_llama(**overrides: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def test_a_model_without_rotary_embeddings_is_refused_with_the_reason() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModel, match="no rotary position embedding"):
        model_parts(model)


def test_an_unknown_architecture_is_refused_with_the_reason() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(UnsupportedModel, match="'qwen2'.*architecture is not known"):
        model_parts(model)
    with pytest.raises(UnsupportedModel, match="not a transformers model"):
        model_parts(object())


def test_a_rope_type_that_is_not_one_rotation_is_refused() -> None:
    model = _tiny_llama(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedModel, match="rope type 'dynamic'"):
        model_parts(model)
    model_parts(_tiny_llama())  # the same model with plain rotary embeddings is accepted

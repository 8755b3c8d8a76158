"""Selective recompute on the real SmolLM2: r = 1 is a full prefill, one chunk at position 0 is prefix
reuse, re-rotation moves keys exactly, recompute beats plain reuse, and unsupported models are refused."""

from __future__ import annotations

import math
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


def test_a_chunk_computed_behind_the_prefix_and_placed_right_after_it_is_the_full_prefill(
    smollm2: tuple[Any, Any],
) -> None:
    """Chunks computed behind the prompts' shared header (the prefix): the first one placed right
    after it sits exactly where it was computed, so even plain reuse (r = 0) gives the full prefill's
    KV there; the next one moves by the first one's length (its position from the header on)."""
    model, tok = smollm2
    prefix = _tokens(tok, PREFIX)
    chunks = [_tokens(tok, d) for d in DOCS[:2]]
    kvs = [compute_chunk(model, c, prefix) for c in chunks]
    assert [kv.start for kv in kvs] == [len(prefix)] * 2
    question = _tokens(tok, QUESTION)
    keys, values, logits = _full(model, prefix + chunks[0] + chunks[1] + question)
    segments = [Segment(prefix), Segment(chunks[0], kvs[0]), Segment(chunks[1], kvs[1]), Segment(question)]
    first = slice(len(prefix), len(prefix) + len(chunks[0]))
    b = blend(model, segments, r=0.0)
    torch.testing.assert_close(b.keys[:, :, first], keys[:, :, first], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(b.values[:, :, first], values[:, :, first], atol=2e-4, rtol=1e-4)
    # layer 0 of the second chunk: its keys moved by the first chunk's length are the full prefill's
    second = slice(first.stop, first.stop + len(chunks[1]))
    torch.testing.assert_close(b.keys[0, :, second], keys[0, :, second], atol=5e-4, rtol=1e-4)
    torch.testing.assert_close(blend(model, segments, r=1.0).logits, logits, atol=2e-4, rtol=1e-4)


def test_the_selection_holds_each_chunks_first_tokens_and_those_before_the_question(
    smollm2: tuple[Any, Any],
) -> None:
    model, tok = smollm2
    segments = _segments(model, tok)
    starts, at = [], 0
    for s in segments:
        if s.kv is not None:
            starts.append(at)
            end = at + len(s.token_ids)
        at += len(s.token_ids)
    n_reused = sum(len(s.token_ids) for s in segments if s.kv is not None)
    plain = blend(model, segments, r=0.05, keep_first=0, keep_last=0)
    assert len(plain.selected) == plain.recomputed == math.ceil(0.05 * n_reused)
    b = blend(model, segments, r=0.05, keep_first=2, keep_last=24)
    must = {p for s in starts for p in (s, s + 1)} | set(range(end - 24, end))
    assert must <= set(b.selected)
    assert len(b.selected) == len(must)  # the rule's tokens outnumber 5%: the budget grows to them
    b = blend(model, segments, r=0.3, keep_first=1, keep_last=8)
    assert set(starts) | set(range(end - 8, end)) <= set(b.selected)
    assert len(b.selected) == math.ceil(0.3 * n_reused)  # inside the budget: r of the reused tokens
    assert blend(model, segments, r=0.0).selected == []  # naive reuse recomputes nothing, rule or not


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
    # keep_last = 0: these chunks are short, the last 64 tokens alone would be half of them
    errs = {r: (blend(model, segments, r=r, keep_last=0).keys - keys).norm().item() for r in (0.0, 0.15, 0.5)}
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
    with pytest.raises(ValueError, match="token counts"):
        blend(model, segments, keep_last=-1)


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

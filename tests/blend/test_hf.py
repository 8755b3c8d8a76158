"""The transformers integration against a real daemon: prefix pages around generate, chunk pages that
never meet prefix pages or another salt's chunks, blending from stored chunks, refusal of other models."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from polarkvd.blend import UnsupportedModel
from polarkvd.connectors.hf import PolarKVGenerator
from tests.blend.conftest import DOCS, PREFIX, QUESTION

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.slow

GREEDY = dict(max_new_tokens=16, do_sample=False)


def _gen(daemon: Any, smollm2: tuple[Any, Any], **kw: Any) -> PolarKVGenerator:
    model, tok = smollm2
    return PolarKVGenerator(model, tok, socket_path=daemon.engine_socket, page_tokens=16, **kw)


def test_prefix_pages_load_on_the_second_generate_with_the_same_answer(daemon: Any, smollm2: Any) -> None:
    model, tok = smollm2
    prompt = PREFIX + "".join(DOCS) + QUESTION
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    with _gen(daemon, smollm2) as g:
        cold = g.prefill(ids)
        assert cold.loaded_tokens == 0
        warm = g.prefill(ids)
        assert warm.loaded_tokens == (len(ids) - 1) // 16 * 16 > 0
        torch.testing.assert_close(warm.keys, cold.keys, atol=1e-4, rtol=1e-4)
        assert warm.logits.argmax() == cold.logits.argmax()
        out = g.generate(prompt, **GREEDY)
    with torch.inference_mode():
        x = torch.tensor([ids])
        want = model.generate(x, attention_mask=torch.ones_like(x), **GREEDY)
    assert out.tolist() == want.tolist()


def test_stored_chunks_are_loaded_and_blend_to_the_full_prefills_answer(daemon: Any, smollm2: Any) -> None:
    model, tok = smollm2
    with _gen(daemon, smollm2) as g:
        chunks = [g._tokens(d) for d in DOCS]
        assert g.lookup_chunks(chunks) == [False, False, False]
        computed = [g.chunk(c) for c in chunks]  # computed on their own, stored
        assert g.lookup_chunks(chunks) == [True, True, True]
        for c, kv in zip(chunks, computed):
            loaded = g.chunk(c, compute=False)
            assert loaded is not None and loaded.tokens == len(c)
            assert torch.equal(loaded.keys, kv.keys) and torch.equal(loaded.values, kv.values)
        order = [chunks[2], chunks[0], chunks[1]]  # another order than any prefix seen
        p = g.blend(order, QUESTION, r=1.0, prefix=PREFIX, behind_prefix=False)  # chunks from position 0
        assert p.reused == sum(map(len, chunks)) and p.recomputed == p.reused
        out = g.generate_from(p, **GREEDY)
        ids = torch.tensor([p.input_ids])
        with torch.inference_mode():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), **GREEDY)
        assert out.tolist() == want.tolist()
        # the same through the one-call API, split at a separator, at the default r
        text = PREFIX + "\n\n".join(DOCS) + "\n\n" + QUESTION
        g.generate(text, separator="\n\n", **GREEDY)


def test_chunk_pages_and_prefix_pages_never_meet_in_the_daemon(daemon: Any, smollm2: Any) -> None:
    with _gen(daemon, smollm2) as g:
        tokens = g._tokens(DOCS[0] + DOCS[1])
        g.chunk(tokens)  # stored as a chunk
        assert g.lookup_chunks([tokens]) == [True]
        assert g.client.lookup(g.client.page_keys(tokens)).hits == 0  # not a prefix hit
        g.prefill(tokens)  # stored as a prefix
    with _gen(daemon, smollm2, store=False) as g:
        other = g._tokens(DOCS[2] + DOCS[1])
        g2 = g.prefill(other)
        assert g2.loaded_tokens == 0
        assert g.lookup_chunks([other]) == [False]


def test_chunks_are_kept_behind_the_prefix_they_were_computed_behind(daemon: Any, smollm2: Any) -> None:
    """A blend behind a prefix computes and stores its chunks behind that prefix: the next blend
    behind it loads them (and gives the same answer); behind another prefix, or from position 0,
    they are not there."""
    with _gen(daemon, smollm2) as g:
        chunks = [g._tokens(d) for d in DOCS]
        pre, other = g._tokens(PREFIX), g._tokens("<|im_start|>user\nRead these other notes.\n")
        first = g.blend(chunks, QUESTION, prefix=PREFIX, compute_missing=True)
        assert g.lookup_chunks(chunks, context=pre) == [True, True, True]
        assert g.lookup_chunks(chunks) == [False, False, False]
        assert g.lookup_chunks(chunks, context=other) == [False, False, False]
        again = g.blend(chunks, QUESTION, prefix=PREFIX)
        assert again.reused == sum(map(len, chunks))
        torch.testing.assert_close(again.logits, first.logits, atol=1e-4, rtol=1e-4)
        elsewhere = g.blend(chunks, QUESTION, prefix=other)
        assert elsewhere.reused == 0  # computed in full with the prompt: nothing behind that prefix
        assert g.blend(chunks, QUESTION, prefix=PREFIX, behind_prefix=False).reused == 0


def test_another_salt_never_sees_a_chunk(daemon: Any, smollm2: Any) -> None:
    with _gen(daemon, smollm2, salt="alice") as alice, _gen(daemon, smollm2, salt="bob") as bob:
        tokens = alice._tokens(DOCS[0])
        alice.chunk(tokens)
        assert alice.lookup_chunks([tokens]) == [True]
        assert bob.lookup_chunks([tokens]) == [False]
        assert bob.chunk(tokens, compute=False) is None
        assert dataclasses.replace(alice.namespace, cache_salt="bob") == bob.namespace


def test_a_model_it_cannot_blend_is_refused_before_connecting(tmp_path: Any) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModel, match="no rotary position embedding"):
        PolarKVGenerator(model, socket_path=tmp_path / "nothing.sock")

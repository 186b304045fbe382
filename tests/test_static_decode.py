"""The fixed-shape decode step (and its compiled form) gives the same tokens as the ordinary step."""

from __future__ import annotations

import pytest
import torch
from greedy import greedy_tokens

from melt_core import load_model
from melt_core.errors import InvalidArgumentError
from melt_core.inference import GenerationSettings, generate_text
from melt_core.inference.decode import prefill
from melt_core.inference.static_decode import StaticDecoder
from melt_core.models.adaptive import AdaptiveDepth


def padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = mask[2, :8] = 0
    return ids, mask


@pytest.mark.parametrize("name", ["tiny_ckpt", "melt_ckpt"])
def test_static_step_matches_the_ordinary_step(name, request):
    model = load_model(request.getfixturevalue(name))
    ids, mask = padded_batch(model.config.vocab_size)
    expected = greedy_tokens(model, ids, mask, max_new_tokens=8)
    assert torch.equal(greedy_tokens(model, ids, mask, max_new_tokens=8, static=True), expected)
    for b in range(3):  # and each row alone
        row = ids[b : b + 1, int((mask[b] == 0).sum()) :]
        assert torch.equal(greedy_tokens(model, row, max_new_tokens=8, static=True), expected[b : b + 1])
    # logits: equal to float rounding (attention over the masked, not-yet-written positions)
    cache, static_cache = model.new_cache(3, 12), model.new_cache(3, 12)
    last = prefill(model, ids, mask, cache, last_only=True).argmax(-1)[:, None]
    prefill(model, ids, mask, static_cache, last_only=True)
    plain = model(last, cache=cache).logits[:, -1]
    torch.testing.assert_close(StaticDecoder(model, static_cache)(last), plain, atol=1e-5, rtol=1e-5)


def test_static_step_keeps_exit_options(tiny_ckpt):
    model = load_model(tiny_ckpt)
    ids, mask = padded_batch(model.config.vocab_size)
    for kwargs in ({"exit_at_step": 0}, {"exit_threshold": 0.3}, {"loops": 2}):
        expected = greedy_tokens(model, ids, mask, max_new_tokens=5, **kwargs)
        assert torch.equal(greedy_tokens(model, ids, mask, max_new_tokens=5, static=True, **kwargs), expected), kwargs


def test_static_step_refuses_what_it_cannot_do(melt_ckpt):
    model = load_model(melt_ckpt)
    with pytest.raises(InvalidArgumentError, match="float-row cache"):
        StaticDecoder(model, _int8(model))
    ids = torch.randint(3, model.config.vocab_size, (1, 4))
    with pytest.raises(InvalidArgumentError, match="adaptive depth"):
        greedy_tokens(model, ids, max_new_tokens=3, static=True, depth=AdaptiveDepth(threshold=0.5))
    with pytest.raises(InvalidArgumentError, match="excludes --kv-dtype"):
        GenerationSettings(compile=True, kv_dtype="int8", kv_group_size=4)


def _int8(model):
    from melt_core.models.quantized import kv_format

    return model.new_cache(1, 8, kv_dtype=kv_format("int8", group_size=4))


def test_compiled_decoding_gives_the_same_text(melt_ckpt):
    """torch.compile of the step (about half a minute to compile here): the same greedy tokens,
    batched, through generate_text."""
    model = load_model(melt_ckpt)
    from melt_core import load_tokenizer

    tokenizer = load_tokenizer(melt_ckpt)
    prompts = ["Once upon a time", "The capital of France is a city"]
    plain = generate_text(model, tokenizer, prompts, GenerationSettings(max_new_tokens=6, stop_token_ids=()))
    compiled = generate_text(
        model, tokenizer, prompts, GenerationSettings(max_new_tokens=6, stop_token_ids=(), compile=True)
    )
    assert [r.token_ids for r in compiled.results] == [r.token_ids for r in plain.results]
    # the first compiled step compiles: timed apart, not as decoding
    assert compiled.stats.compile_seconds > 0 and plain.stats.compile_seconds == 0
    assert compiled.stats.decode_tokens_per_s > 0

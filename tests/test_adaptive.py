"""Adaptive depth for MELT: tokens leave the loop early and their remaining loops are skipped."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from cli_helpers import one_red_line
from greedy import greedy_tokens, prefill_logits
from typer.testing import CliRunner

from melt_cli.app import app
from melt_core import load_model
from melt_core.cache.quantized import kv_format
from melt_core.errors import InvalidArgumentError
from melt_core.models.adaptive import AdaptiveDepth

runner = CliRunner()


def random_ids(model, shape, seed=0):
    return torch.randint(3, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 4])
def test_threshold_one_is_bit_identical_to_full_depth(melt_ckpt, chunk):
    model = load_model(melt_ckpt)
    ids = random_ids(model, (3, 13))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, :5] = mask[2, :2] = 0  # left padding
    full = prefill_logits(model, ids, mask, model.new_cache(3, 13), chunk_size=chunk)
    depth = AdaptiveDepth(threshold=1.0)
    adaptive = prefill_logits(model, ids, mask, model.new_cache(3, 13), chunk_size=chunk, depth=depth)
    real = mask.bool()  # padding stops after loop 1: its logits are nobody's
    assert torch.equal(full[real], adaptive[real])
    assert depth.stats.mean_loops == model.config.total_ut_steps
    assert depth.stats.tokens == int(mask.sum())
    tokens = greedy_tokens(model, ids, mask, max_new_tokens=6)
    assert torch.equal(tokens, greedy_tokens(model, ids, mask, max_new_tokens=6, depth=AdaptiveDepth(threshold=1.0)))


def exit_loop_of_one_token(model, cache, token, threshold) -> tuple[int, torch.Tensor]:
    depth = AdaptiveDepth(threshold=threshold)
    logits = model(token, cache=cache, depth=depth).logits
    return depth.stats.loops_used - 1, logits


def test_an_exited_token_keeps_its_exit_loop_row(melt_ckpt):
    """A decode step that exits at loop s leaves exactly the rows (and logits) of running s + 1
    loops; the loops after s are not computed."""
    model = load_model(melt_ckpt)
    T = model.config.total_ut_steps
    prompt, token = random_ids(model, (1, 9)), random_ids(model, (1, 1), seed=1)
    cache = model.new_cache(1, 10)
    prefill_logits(model, prompt, None, cache, chunk_size=4)
    exits = {}
    for threshold in (0.0, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99):
        adaptive = copy.deepcopy(cache)
        calls = []
        hook = model.model.layers[0].register_forward_hook(lambda *_, calls=calls: calls.append(1))
        s, logits = exit_loop_of_one_token(model, adaptive, token, threshold)
        hook.remove()
        assert len(calls) == s + 1  # the remaining loops never ran
        exits[threshold] = s
        fixed = copy.deepcopy(cache)
        expected = model(token, cache=fixed, loops=s + 1).logits
        assert torch.equal(logits, expected)
        assert torch.equal(adaptive.store.keys, fixed.store.keys)
        assert torch.equal(adaptive.store.values, fixed.store.values)
    assert exits[0.0] == 0 and len(set(exits.values())) >= 2  # the thresholds reach different loops
    assert all(s <= T - 1 for s in exits.values())


def test_batched_adaptive_decoding_equals_each_prompt_alone(melt_ckpt):
    """Rows exit at different loops: only the rows still looping are computed, and every row gets
    what it gets alone (left padding included), for the gate and the KL criteria."""
    model = load_model(melt_ckpt)
    lengths = [11, 6, 3]
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    prompts = [random_ids(model, (1, n), seed=n) for n in lengths]
    for b, p in enumerate(prompts):
        ids[b, 11 - p.shape[1] :], mask[b, 11 - p.shape[1] :] = p[0], 1
    for depth in (dict(threshold=0.6), dict(kl=0.05), dict(threshold=0.8, kl=0.01)):
        batched_depth = AdaptiveDepth(**depth)
        batched = greedy_tokens(model, ids, mask, max_new_tokens=8, depth=batched_depth)
        alone_loops = 0
        for b, p in enumerate(prompts):
            alone_depth = AdaptiveDepth(**depth)
            assert torch.equal(batched[b : b + 1], greedy_tokens(model, p, max_new_tokens=8, depth=alone_depth))
            alone_loops += alone_depth.stats.loops_used
        assert batched_depth.stats.loops_used == alone_loops  # the same exit loop for every token
        assert 1.0 < batched_depth.stats.mean_loops < model.config.total_ut_steps
        assert batched_depth.stats.compute_saved > 0.0


def test_quantised_cache_and_adaptive_depth_work_together(melt_ckpt):
    model = load_model(melt_ckpt)
    ids = random_ids(model, (2, 12))
    full = prefill_logits(model, ids, None, model.new_cache(2, 12), chunk_size=1, depth=AdaptiveDepth(threshold=0.7))
    int8 = model.new_cache(2, 12, kv_dtype=kv_format("int8", group_size=4, residual=3))
    quant = prefill_logits(model, ids, None, int8, chunk_size=1, depth=AdaptiveDepth(threshold=0.7))
    assert (full - quant).abs().max().item() < 0.05


def test_adaptive_depth_is_checked(melt_ckpt):
    model = load_model(melt_ckpt)
    ids = random_ids(model, (1, 4))
    with pytest.raises(InvalidArgumentError, match="threshold or an exit KL"):
        AdaptiveDepth()
    with pytest.raises(InvalidArgumentError, match=r"\[0, 1\]"):
        AdaptiveDepth(threshold=1.5)
    with pytest.raises(InvalidArgumentError, match="> 0 nats"):
        AdaptiveDepth(kl=0.0)
    with pytest.raises(InvalidArgumentError, match="needs a KV cache|with a KV cache"):
        model(ids, depth=AdaptiveDepth(threshold=0.5))
    with pytest.raises(InvalidArgumentError, match="exit_at_step"):
        model(ids, cache=model.new_cache(1, 4), depth=AdaptiveDepth(threshold=0.5), exit_at_step=0)


def test_generate_reports_mean_loops(melt_ckpt, tiny_ckpt):
    base = ["generate", "-p", "Once upon a time", "--max-new-tokens", "6", "--json"]
    full = json.loads(runner.invoke(app, [base[0], str(melt_ckpt), *base[1:]]).stdout)
    assert full["mean_loops"] == full["loops"] and full["compute_saved"] == 0.0
    result = runner.invoke(app, [base[0], str(melt_ckpt), *base[1:], "--exit-threshold", "0.5"])
    adaptive = json.loads(result.stdout)
    assert 1.0 <= adaptive["mean_loops"] < adaptive["loops"] and 0.0 < adaptive["compute_saved"] < 1.0
    assert 1.0 <= adaptive["decode_mean_loops"] < adaptive["loops"]
    text = runner.invoke(app, [base[0], str(melt_ckpt), *base[1:-1], "--exit-kl", "0.05"])
    assert text.exit_code == 0 and "adaptive depth:" in text.stderr
    # Ouro: the threshold picks logits, every loop runs; exit-kl would skip loops: refused
    ouro = json.loads(runner.invoke(app, [base[0], str(tiny_ckpt), *base[1:], "--exit-threshold", "0.5"]).stdout)
    assert ouro["mean_loops"] == ouro["loops"]
    error = one_red_line(runner.invoke(app, [base[0], str(tiny_ckpt), *base[1:], "--exit-kl", "0.05"]))
    assert "MELT's shared cache" in error

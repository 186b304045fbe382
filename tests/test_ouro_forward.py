"""Ouro forward semantics: reference parity, chunking, caching, padding, exit paths.

The forward is described in docs/ouro-format.md; these are the Ouro rows of docs/melt-method.md,
"Invariants melt's tests hold".
"""

from __future__ import annotations

import pytest
import torch
from greedy import greedy_tokens, prefill_logits
from reference_ouro import reference_forward

from melt_core import load_model
from melt_core.checkpoints.io import read_config_dict
from melt_core.errors import InvalidArgumentError
from melt_core.models.ouro import exit_pdf

ATOL = 1e-5


def _ids(model, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=g)


@pytest.mark.parametrize("loops", [None, 1, 6])
def test_matches_independent_reference(model, ckpt, loops):
    ids = _ids(model, 2, 11)
    out = model(ids, loops=loops, return_loop_logits=True)
    sd = {k: v.float() for k, v in model.state_dict().items()}
    for b in range(2):
        ref = reference_forward(sd, read_config_dict(ckpt), ids[b], loops)
        assert len(out.loop_logits) == len(ref["loop_logits"]) == (loops or model.config.total_ut_steps)
        for mine, theirs in zip(out.loop_logits, ref["loop_logits"]):
            torch.testing.assert_close(mine[b], theirs, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(out.exit_pdf[b], ref["pdf"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.logits[b], ref["loop_logits"][-1], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 3, 7, None])
def test_chunked_forward_equals_full_forward(model, chunk):
    ids = _ids(model, 2, 13)
    full = model(ids).logits
    cache = model.new_cache(2, 13)
    chunked = prefill_logits(model, ids, None, cache, chunk_size=chunk)
    torch.testing.assert_close(chunked, full, atol=ATOL, rtol=1e-4)
    assert cache.length == 13


def test_cached_decode_equals_full_recompute(model):
    prompt = _ids(model, 1, 5)
    result = greedy_tokens(model, prompt, max_new_tokens=12)
    # full recompute: the whole sequence from scratch at every step, argmax of the last position
    seq = prompt
    for _ in range(12):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(result, seq[:, 5:])
    # and the cached logits at every step agree with the recomputed ones
    cache = model.new_cache(1, seq.shape[1])
    stepwise = prefill_logits(model, seq, None, cache, chunk_size=1)
    torch.testing.assert_close(stepwise, model(seq).logits, atol=ATOL, rtol=1e-4)


def test_batched_left_padding_equals_each_prompt_alone(model):
    prompts = [_ids(model, 1, n, seed=n)[0] for n in (3, 9, 6)]
    S = max(len(p) for p in prompts)
    ids = torch.zeros(3, S, dtype=torch.long)
    mask = torch.zeros(3, S, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, S - len(p) :] = p
        mask[b, S - len(p) :] = 1
    batched = greedy_tokens(model, ids, mask, max_new_tokens=8)
    full = model(ids, mask).logits
    for b, p in enumerate(prompts):
        alone = greedy_tokens(model, p[None], max_new_tokens=8)
        assert torch.equal(batched[b], alone[0]), f"row {b} differs from its prompt alone"
        torch.testing.assert_close(full[b, S - len(p) :], model(p[None]).logits[0], atol=ATOL, rtol=1e-4)


def test_padded_chunked_prefill_equals_full(model):
    ids = _ids(model, 2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    full = model(ids, mask).logits
    chunked = prefill_logits(model, ids, mask, model.new_cache(2, 10), chunk_size=3)
    torch.testing.assert_close(chunked[mask.bool()], full[mask.bool()], atol=ATOL, rtol=1e-4)


def test_exit_at_step_returns_that_loops_logits(model):
    ids = _ids(model, 2, 7)
    out = model(ids, return_loop_logits=True)
    for s in range(model.config.total_ut_steps):
        torch.testing.assert_close(model(ids, exit_at_step=s).logits, out.loop_logits[s])
    with pytest.raises(InvalidArgumentError):
        model(ids, exit_at_step=model.config.total_ut_steps)


def test_threshold_one_picks_last_loop_in_fp32(model):
    ids = _ids(model, 2, 7)
    out = model(ids, exit_threshold=1.0, return_loop_logits=True)
    assert torch.equal(out.logits, out.loop_logits[-1])
    assert model.config.early_exit_threshold == 1.0
    torch.testing.assert_close(model(ids).logits, out.loop_logits[-1])


def test_threshold_selects_first_step_whose_cdf_reaches_it(model):
    ids = _ids(model, 1, 9)
    out = model(ids, exit_threshold=0.6, return_loop_logits=True, return_hidden_states=True)
    cdf = out.exit_pdf.cumsum(-1)[0]  # (S, T)
    for s in range(9):
        hits = (cdf[s] >= 0.6).nonzero()
        step = int(hits[0]) if len(hits) else model.config.total_ut_steps - 1
        torch.testing.assert_close(out.logits[0, s], out.loop_logits[step][0, s])


def test_weighted_exit_matches_hand_computation(model):
    ids = _ids(model, 2, 5)
    out = model(ids, weighted_exit=True, return_loop_logits=True)
    gates = [
        torch.sigmoid(model.model.early_exit_gate(h)).squeeze(-1)
        for h in model(ids, return_hidden_states=True).hidden_states
    ]
    T = len(gates)
    pdf = [gates[0]]
    for t in range(1, T):
        survive = torch.prod(torch.stack([1 - g for g in gates[:t]]), 0)
        pdf.append(gates[t] * survive if t < T - 1 else survive)
    expected = sum(p[..., None] * lg for p, lg in zip(pdf, out.loop_logits))
    torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.exit_pdf.sum(-1), torch.ones(2, 5), atol=1e-6, rtol=0)


def test_exit_pdf_is_computed_in_the_model_dtype():
    logits = [torch.randn(2, 3, dtype=torch.bfloat16) for _ in range(4)]
    assert exit_pdf(logits).dtype == torch.bfloat16


def test_loop_count_override_and_cache_loops(model):
    ids = _ids(model, 1, 6)
    for loops in (1, 2, 8):
        full = model(ids, loops=loops)
        assert full.exit_pdf.shape[-1] == loops
        cache = model.new_cache(1, 6, loops=loops)
        torch.testing.assert_close(
            prefill_logits(model, ids, None, cache, chunk_size=2, loops=loops), full.logits, atol=ATOL, rtol=1e-4
        )
        assert cache.nbytes() == loops * model.new_cache(1, 6, loops=1).nbytes()


def test_bf16_forward_runs_and_tracks_fp32(ckpt):
    m32 = load_model(ckpt, dtype="fp32")
    m16 = load_model(ckpt, dtype="bf16")
    ids = _ids(m32, 1, 8)
    out = m16(ids)
    assert out.logits.dtype == torch.bfloat16 and out.exit_pdf.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits.float(), m32(ids).logits, atol=5e-2, rtol=5e-2)


def test_a_chunk_without_padding_gets_a_lower_right_causal_bias_on_cuda():
    """On CUDA, MELT's prefill and training chunks (earlier positions, no padding) attend through a
    causal bias that the fused attention kernels take as it is; it is the boolean mask it replaces
    (the one a CPU gets). No tensor is made for it, so this runs without a GPU."""
    from torch.nn.attention.bias import CausalBias

    from melt_core.models.ouro import attention_mask_for

    bias = attention_mask_for(None, 6, 4, torch.device("cuda"))
    assert isinstance(bias, CausalBias)
    q_pos, k_pos = torch.arange(6, 10)[:, None], torch.arange(10)[None, :]
    assert torch.equal(bias._materialize(torch.device("cpu")), k_pos <= q_pos)
    assert torch.equal(attention_mask_for(None, 6, 4, torch.device("cpu"))[0, 0], k_pos <= q_pos)
    assert attention_mask_for(None, 0, 4, torch.device("cpu")) is None  # plain causal
    assert attention_mask_for(None, 6, 1, torch.device("cpu")) is None  # one query sees every key
    padded = attention_mask_for(torch.tensor([[False] + [True] * 9]), 6, 4, torch.device("cpu"))
    assert padded.dtype == torch.bool and padded.shape == (1, 1, 4, 10)

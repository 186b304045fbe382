"""MELT model invariants (MELT.md §6.3-6): chunk-wise forward, decoding, interpolation, policies."""

from __future__ import annotations

import pytest
import torch

from melt_core import load_model
from melt_core.config import MeltConfig, MeltSettings
from melt_core.convert import convert_ouro_to_melt
from melt_core.generation import greedy_generate, prefill

ATOL = 1e-5


def _ids(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def _randomize_gates(model, seed: int = 0, std: float = 0.3) -> None:
    """Give the gates token-dependent values so that tests exercise them (convert starts at W = U = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def melt_dirs(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("melt")
    return {policy: convert_ouro_to_melt(tiny_ckpt, root / policy, MeltSettings(policy=policy, chunk_size=4))
            for policy in ("gate", "scalar", "last", "mean", "ema")}


@pytest.fixture
def melt(melt_dirs):
    model = load_model(melt_dirs["gate"], dtype="fp32")
    _randomize_gates(model)
    return model


@pytest.fixture
def ouro(tiny_ckpt):
    return load_model(tiny_ckpt, dtype="fp32")


def test_chunk_size_one_equals_token_by_token_decode(melt):
    V = melt.config.vocab_size
    prompt = _ids(V, 1, 4)
    gen = greedy_generate(melt, prompt, max_new_tokens=10, chunk_size=1)
    seq = torch.cat([prompt, gen.tokens], 1)
    # the training-mode forward with C = 1 over the whole sequence gives the same logits...
    training = melt(seq, chunk_size=1).logits
    cache = melt.new_cache(1, seq.shape[1])
    decoded = prefill(melt, seq, None, cache, chunk_size=1)
    torch.testing.assert_close(decoded, training, atol=ATOL, rtol=1e-4)
    # ...and the same greedy tokens
    assert torch.equal(training[:, 3:-1].argmax(-1), gen.tokens)


def test_prefill_with_chunk_then_decode_matches_training_forward(melt):
    V, C = melt.config.vocab_size, 4
    prompt = _ids(V, 2, 10, seed=3)
    cache = melt.new_cache(2, 16)
    prefill_logits = melt(prompt, cache=cache).logits  # the config's chunk size, 4
    torch.testing.assert_close(prefill_logits, melt(prompt, chunk_size=C).logits, atol=ATOL, rtol=1e-4)
    new = _ids(V, 2, 6, seed=4)
    decoded = torch.cat([melt(new[:, i:i + 1], cache=cache).logits for i in range(6)], 1)
    reference = melt(torch.cat([prompt, new], 1), chunk_size=[4, 4, 2] + [1] * 6).logits[:, 10:]
    torch.testing.assert_close(decoded, reference, atol=ATOL, rtol=1e-4)
    # deterministic: a second run gives identical logits
    cache2 = melt.new_cache(2, 16)
    melt(prompt, cache=cache2)
    again = torch.cat([melt(new[:, i:i + 1], cache=cache2).logits for i in range(6)], 1)
    assert torch.equal(decoded, again)


def test_chunking_matters_for_melt(melt):
    """Unlike Ouro, MELT is not chunk-size invariant: later chunks see earlier tokens' final rows."""
    ids = _ids(melt.config.vocab_size, 1, 12)
    assert not torch.allclose(melt(ids, chunk_size=1).logits, melt(ids, chunk_size=12).logits, atol=1e-4)


def test_alpha_zero_is_the_ouro_teacher(melt, ouro):
    ids = _ids(melt.config.vocab_size, 2, 11, seed=5)
    teacher = ouro(ids, return_loop_logits=True)
    student = melt(ids, alpha=0.0, chunk_size=3, return_loop_logits=True)
    for s, t in zip(student.loop_logits, teacher.loop_logits):
        torch.testing.assert_close(s, t, atol=ATOL, rtol=1e-4)


def test_alpha_one_is_pure_melt(melt):
    ids = _ids(melt.config.vocab_size, 2, 11, seed=6)
    pure = melt(ids, chunk_size=3).logits
    cache = melt.new_cache(2, 11)
    torch.testing.assert_close(prefill(melt, ids, None, cache, 3), pure, atol=ATOL, rtol=1e-4)
    assert torch.equal(melt(ids, chunk_size=3, alpha=1.0).logits, pure)
    # the interpolation is continuous at alpha -> 1 (base rows computed and weighted by ~0)
    torch.testing.assert_close(melt(ids, chunk_size=3, alpha=1 - 1e-6).logits, pure, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(melt(ids, chunk_size=3, alpha=0.5).logits, pure, atol=1e-4)


def test_last_policy_equals_gate_with_z_zero(melt_dirs):
    last = load_model(melt_dirs["last"], dtype="fp32")
    gate = load_model(melt_dirs["gate"], dtype="fp32")
    with torch.no_grad():
        for layer in gate.model.layers:
            layer.kv_gate.input_proj.weight.zero_()
            layer.kv_gate.state_proj.weight.zero_()
            layer.kv_gate.bias.fill_(-1e4)  # sigmoid(-1e4) == 0 exactly
    ids = _ids(gate.config.vocab_size, 2, 9, seed=7)
    assert torch.equal(last(ids, chunk_size=2).logits, gate(ids, chunk_size=2).logits)


@pytest.mark.parametrize("policy", ["gate", "scalar", "last", "mean", "ema"])
def test_one_loop_melt_is_one_loop_ouro(melt_dirs, ouro, policy):
    """Loop 1 writes exactly Ouro's loop-1 row (h0 = first_input), so with one loop MELT == Ouro."""
    model = load_model(melt_dirs[policy], dtype="fp32")
    if policy in ("gate", "scalar"):
        _randomize_gates(model)
    ids = _ids(model.config.vocab_size, 2, 9, seed=8)
    torch.testing.assert_close(model(ids, loops=1, chunk_size=2).logits, ouro(ids, loops=1).logits,
                               atol=ATOL, rtol=1e-4)


def test_mean_and_ema_rows_follow_their_definitions(melt_dirs):
    """Row of the last loop = mean (EMA) over loops of Ouro's per-loop k/v: checked on the latent."""
    from melt_core.melt import MeltKV
    for policy, weights in (("mean", [1 / 3, 1 / 3, 1 / 3]), ("ema", [0.64, 0.16, 0.2])):
        model = load_model(melt_dirs[policy], dtype="fp32")
        kv = MeltKV(model.config.melt, 1, rows=None)
        layer = model.model.layers[0]
        us = [torch.randn(1, 2, model.config.hidden_size) for _ in range(3)]
        for loop, u in enumerate(us):
            h = kv.update_latent(layer, 0, loop, u)
        torch.testing.assert_close(h, sum(w * u for w, u in zip(weights, us)))


def test_h0_zeros_changes_loop_one(melt_dirs, ouro):
    model = load_model(melt_dirs["gate"], dtype="fp32")
    model.config.melt.h0 = "zeros"
    ids = _ids(model.config.vocab_size, 1, 6)
    # untrained gate, z = z0 = 0.1 everywhere: loop 1 rows are (1 - 0.1) * Ouro's
    assert not torch.allclose(model(ids, loops=1).logits, ouro(ids, loops=1).logits, atol=1e-4)


def test_cache_bytes_independent_of_loops(melt, ouro):
    melt_bytes = [melt.new_cache(1, 64, loops).nbytes() for loops in (1, 2, 4, 8)]
    ouro_bytes = [ouro.new_cache(1, 64, loops).nbytes() for loops in (1, 2, 4, 8)]
    assert len(set(melt_bytes)) == 1
    assert ouro_bytes == [ouro_bytes[0] * t for t in (1, 2, 4, 8)]
    assert melt_bytes[0] == ouro_bytes[0]  # one loop of Ouro == MELT at any loop count
    c = melt.config
    assert melt_bytes[0] == 64 * c.kv_bytes_per_token(torch.float32)


def test_more_loops_than_trained_with_shared_cache(melt):
    ids = _ids(melt.config.vocab_size, 1, 7)
    cache = melt.new_cache(1, 7)
    torch.testing.assert_close(prefill(melt, ids, None, cache, 1, loops=8), melt(ids, loops=8, chunk_size=1).logits,
                               atol=ATOL, rtol=1e-4)


def test_padded_batch_equals_prompts_alone(melt):
    V = melt.config.vocab_size
    prompts = [_ids(V, 1, n, seed=n)[0] for n in (3, 7)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 7 - len(p):], mask[b, 7 - len(p):] = p, 1
    batched = greedy_generate(melt, ids, mask, max_new_tokens=6, chunk_size=1)
    for b, p in enumerate(prompts):
        alone = greedy_generate(melt, p[None], max_new_tokens=6, chunk_size=1)
        assert torch.equal(batched.tokens[b], alone.tokens[0])


def test_gradients_reach_gates_and_base_through_chunks(melt):
    melt.train()
    ids = _ids(melt.config.vocab_size, 2, 9, seed=9)
    out = melt(ids, chunk_size=3)
    # a loss on the LAST chunk only: gradient reaches earlier chunks only through their rows
    out.logits[:, 6:].logsumexp(-1).sum().backward()
    for name, p in melt.named_parameters():
        if ".kv_gate." in name or name.endswith("k_proj.weight") or name.endswith("mlp.up_proj.weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    grads = {n: p.grad.clone() for n, p in melt.named_parameters() if p.grad is not None}

    # checkpointed chunks: the same gradients
    melt.zero_grad()
    melt(ids, chunk_size=3, checkpoint_chunks=True).logits[:, 6:].logsumexp(-1).sum().backward()
    for n, p in melt.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)

    # detached history: earlier chunks' rows get no gradient, so the embeddings of chunk 1 get none
    melt.zero_grad()
    melt(ids, chunk_size=3, detach_history=True).logits[:, 6:].logsumexp(-1).sum().backward()
    emb_grad = melt.model.embed_tokens.weight.grad
    only_first = set(ids[:, :3].flatten().tolist()) - set(ids[:, 3:].flatten().tolist())
    assert only_first and all(emb_grad[t].abs().sum() == 0 for t in only_first)
    assert all(grads["model.embed_tokens.weight"][t].abs().sum() > 0 for t in only_first)


def test_attention_taps(melt, ouro):
    ids = _ids(melt.config.vocab_size, 1, 8)
    N, T = melt.config.num_hidden_layers, melt.config.total_ut_steps
    s = melt(ids, alpha=0.0, chunk_size=3, return_attn_outputs=True)
    t = ouro(ids, return_attn_outputs=True)
    assert len(s.attn_outputs) == len(t.attn_outputs) == N * T
    for a, b in zip(s.attn_outputs, t.attn_outputs):
        assert a.shape == (1, 8, melt.config.hidden_size)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)
    assert melt(ids).attn_outputs is None


def test_melt_config_round_trip_and_validation():
    cfg = MeltConfig(hidden_size=32, num_attention_heads=4, melt=MeltSettings(policy="ema", chunk_size=7))
    again = MeltConfig.from_dict(cfg.to_dict())
    assert again.melt == cfg.melt and again.to_dict() == cfg.to_dict()
    from melt_core.errors import ConfigError
    with pytest.raises(ConfigError, match="melt.policy"):
        MeltSettings(policy="gru")
    with pytest.raises(ConfigError, match="unknown key"):
        MeltConfig.from_dict({**cfg.to_dict(), "melt": {"policy": "gate", "colour": 1}})

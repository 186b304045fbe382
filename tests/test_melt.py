"""MELT model invariants (docs/melt-method.md, "Invariants melt's tests hold"): chunk-wise forward,
decoding, interpolation, policies, checked against each other and against an independent naive
forward (``reference_melt``)."""

from __future__ import annotations

import pytest
import torch
from greedy import greedy_tokens, prefill_logits
from reference_melt import reference_melt_forward
from reference_ouro import reference_forward

from melt_core import load_model
from melt_core.checkpoints import convert_ouro_to_melt
from melt_core.errors import ConfigError
from melt_core.models.config import MeltConfig, MeltSettings
from melt_core.models.kv import SharedKV
from melt_core.models.update_rules import UPDATE_RULES, KVGate, is_gate_parameter

ATOL = 1e-5
POLICIES = tuple(UPDATE_RULES)


def _ids(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def _randomize_gates(model, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def melt_dirs(tiny_ckpt, tmp_path_factory):
    """One conversion per training-free policy, and the scalar gate."""
    root = tmp_path_factory.mktemp("melt")
    return {
        policy: convert_ouro_to_melt(tiny_ckpt, root / policy, MeltSettings(policy=policy, chunk_size=4))
        for policy in POLICIES
        if policy != "gate"
    }


def _model(policy, melt_ckpt, melt_dirs, h0="first_input"):
    model = load_model(melt_ckpt if policy == "gate" else melt_dirs[policy], dtype="fp32")
    if policy == "scalar":
        _randomize_gates(model)
    model.config.melt.h0 = h0
    return model


@pytest.fixture
def melt(melt_ckpt):
    return load_model(melt_ckpt, dtype="fp32")


@pytest.fixture
def ouro(tiny_ckpt):
    return load_model(tiny_ckpt, dtype="fp32")


def _reference(model, ids, chunk_sizes, loops=None, alpha=1.0):
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    return reference_melt_forward(sd, model.config.to_dict(), ids, chunk_sizes=chunk_sizes, loops=loops, alpha=alpha)[
        "loop_logits"
    ]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("chunks", [[11], [1] * 11, [4, 4, 3], [2, 5, 1, 3]])
def test_matches_the_naive_reference(melt_ckpt, melt_dirs, policy, chunks):
    """Every policy, with learned gates randomised, several chunkings: the per-loop logits of the
    chunk-wise forward equal the naive forward's (which chunking changes, unlike Ouro's)."""
    model = _model(policy, melt_ckpt, melt_dirs)
    ids = _ids(model.config.vocab_size, 1, 11, seed=1)
    ours = model(ids, chunk_size=chunks, return_loop_logits=True).loop_logits
    expected = _reference(model, ids[0], chunks)
    assert len(ours) == len(expected) == model.config.total_ut_steps
    for t, (a, b) in enumerate(zip(ours, expected, strict=True)):
        torch.testing.assert_close(a[0], b, atol=1e-4, rtol=1e-4, msg=f"loop {t + 1}")


@pytest.mark.parametrize("policy", ["gate", "scalar"])
def test_h0_zeros_and_other_loop_counts_match_the_reference(melt_ckpt, melt_dirs, policy):
    model = _model(policy, melt_ckpt, melt_dirs, h0="zeros")
    ids = _ids(model.config.vocab_size, 1, 9, seed=2)
    for loops in (1, 6):
        ours = model(ids, chunk_size=[3, 3, 3], loops=loops, return_loop_logits=True).loop_logits
        for a, b in zip(ours, _reference(model, ids[0], [3, 3, 3], loops=loops), strict=True):
            torch.testing.assert_close(a[0], b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_interpolation_matches_the_reference(melt, alpha):
    ids = _ids(melt.config.vocab_size, 1, 10, seed=3)
    hidden, _ = melt.forward_chunkwise(ids, chunk_size=[4, 4, 2], alpha=alpha)
    ours = melt.head(hidden, return_loop_logits=True).loop_logits
    for a, b in zip(ours, _reference(melt, ids[0], [4, 4, 2], alpha=alpha), strict=True):
        torch.testing.assert_close(a[0], b, atol=1e-4, rtol=1e-4)


def test_chunk_size_one_equals_token_by_token_decode(melt):
    V = melt.config.vocab_size
    prompt = _ids(V, 1, 4)
    gen = greedy_tokens(melt, prompt, max_new_tokens=10, chunk_size=1)
    seq = torch.cat([prompt, gen], 1)
    # the training-mode forward with C = 1 over the whole sequence gives the same logits...
    training = melt(seq, chunk_size=1).logits
    cache = melt.new_cache(1, seq.shape[1])
    decoded = prefill_logits(melt, seq, None, cache, chunk_size=1)
    torch.testing.assert_close(decoded, training, atol=ATOL, rtol=1e-4)
    # ...and the same greedy tokens
    assert torch.equal(training[:, 3:-1].argmax(-1), gen)


def test_prefill_with_chunk_then_decode_matches_training_forward(melt):
    V, C = melt.config.vocab_size, 4
    prompt = _ids(V, 2, 10, seed=3)
    cache = melt.new_cache(2, 16)
    # the config's chunk size, 4, aligned to the prompt's end (generation's chunking): 2, 4, 4
    prefilled = melt(prompt, cache=cache).logits
    torch.testing.assert_close(prefilled, melt(prompt, chunk_size=[2, C, C]).logits, atol=ATOL, rtol=1e-4)
    new = _ids(V, 2, 6, seed=4)
    decoded = torch.cat([melt(new[:, i : i + 1], cache=cache).logits for i in range(6)], 1)
    reference = melt(torch.cat([prompt, new], 1), chunk_size=[2, 4, 4] + [1] * 6).logits[:, 10:]
    torch.testing.assert_close(decoded, reference, atol=ATOL, rtol=1e-4)
    # deterministic: a second run gives identical logits
    cache2 = melt.new_cache(2, 16)
    melt(prompt, cache=cache2)
    again = torch.cat([melt(new[:, i : i + 1], cache=cache2).logits for i in range(6)], 1)
    assert torch.equal(decoded, again)


def test_alpha_zero_is_the_ouro_teacher(melt, ouro):
    ids = _ids(melt.config.vocab_size, 2, 11, seed=5)
    teacher = ouro(ids, return_loop_logits=True)
    student = melt.head(melt.forward_chunkwise(ids, alpha=0.0, chunk_size=3)[0], return_loop_logits=True)
    for s, t in zip(student.loop_logits, teacher.loop_logits, strict=True):
        torch.testing.assert_close(s, t, atol=ATOL, rtol=1e-4)
    sd = {k: v for k, v in ouro.state_dict().items()}
    naive = reference_forward(sd, ouro.config.to_dict(), ids[0])["loop_logits"]
    torch.testing.assert_close(student.loop_logits[-1][0], naive[-1], atol=1e-4, rtol=1e-4)


def test_alpha_one_is_pure_melt(melt):
    ids = _ids(melt.config.vocab_size, 2, 11, seed=6)
    pure = melt(ids, chunk_size=3).logits
    cache = melt.new_cache(2, 11)
    # the engine's chunks end with the prompt: 2, 3, 3, 3
    end_aligned = melt(ids, chunk_size=[2, 3, 3, 3]).logits
    torch.testing.assert_close(prefill_logits(melt, ids, None, cache, chunk_size=3), end_aligned, atol=ATOL, rtol=1e-4)
    assert torch.equal(melt.head(melt.forward_chunkwise(ids, chunk_size=3, alpha=1.0)[0]).logits, pure)
    # the interpolation is continuous at alpha -> 1 (base rows computed and weighted by ~0)
    near = melt.head(melt.forward_chunkwise(ids, chunk_size=3, alpha=1 - 1e-6)[0]).logits
    torch.testing.assert_close(near, pure, atol=1e-4, rtol=1e-3)


def test_last_policy_equals_gate_with_z_zero(melt_ckpt, melt_dirs):
    last = load_model(melt_dirs["last"], dtype="fp32")
    gate = load_model(melt_ckpt, dtype="fp32")
    with torch.no_grad():
        for layer in gate.model.layers:
            layer.kv_gate.input_proj.weight.zero_()
            layer.kv_gate.state_proj.weight.zero_()
            layer.kv_gate.bias.fill_(-1e4)  # sigmoid(-1e4) == 0 exactly
    ids = _ids(gate.config.vocab_size, 2, 9, seed=7)
    assert torch.equal(last(ids, chunk_size=2).logits, gate(ids, chunk_size=2).logits)


@pytest.mark.parametrize("policy", POLICIES)
def test_one_loop_melt_is_one_loop_ouro(melt_ckpt, melt_dirs, ouro, policy):
    """Loop 1 writes exactly Ouro's loop-1 row (h0 = first_input), so with one loop MELT == Ouro."""
    model = _model(policy, melt_ckpt, melt_dirs)
    ids = _ids(model.config.vocab_size, 2, 9, seed=8)
    torch.testing.assert_close(
        model(ids, loops=1, chunk_size=2).logits, ouro(ids, loops=1).logits, atol=ATOL, rtol=1e-4
    )


def test_mean_and_ema_rows_follow_their_definitions(melt_dirs):
    """Row of the last loop = mean (EMA, first) over loops of Ouro's per-loop k/v: checked on the latent."""
    for policy, weights in (("mean", [1 / 3, 1 / 3, 1 / 3]), ("ema", [0.64, 0.16, 0.2]), ("first", [1, 0, 0])):
        model = load_model(melt_dirs[policy], dtype="fp32")
        kv = SharedKV(model.update_rule(), store=None, layout=model.config.cache_layout(), start=0)
        layer = model.model.layers[0]
        us = [torch.randn(1, 2, model.config.hidden_size) for _ in range(3)]
        for loop, u in enumerate(us):
            h = kv.update_latent(layer, 0, loop, u)
        torch.testing.assert_close(h, sum(w * u for w, u in zip(weights, us, strict=True)))


def test_gate_runs_in_fp32_in_a_bf16_model():
    """In bf16, sigmoid(6) rounds to 0.996 and sigmoid(7) to exactly 1, so ``1 - z`` would be off by
    58 % and 100 %; melt computes the gate and the mix in fp32."""
    H = 8
    gate = KVGate(H, H).to(torch.bfloat16)
    u, h_prev = torch.randn(2, H).to(torch.bfloat16), torch.randn(2, H).to(torch.bfloat16)
    for b in (5.0, 6.0, 7.0):
        gate.reset(torch.sigmoid(torch.tensor(b)).item())
        z = gate(u, h_prev)
        assert z.dtype == torch.float32
        torch.testing.assert_close(
            1 - z, torch.full_like(z, 1 - torch.sigmoid(torch.tensor(b)).item()), rtol=1e-2, atol=0
        )
    h = UPDATE_RULES["gate"](MeltSettings()).next(1, u, h_prev, gate)
    expected = (z * h_prev.float() + (1 - z) * u.float()).to(torch.bfloat16)
    assert h.dtype == torch.bfloat16 and torch.equal(h, expected)


def test_cache_bytes_independent_of_loops(melt, ouro):
    melt_bytes = [melt.new_cache(1, 64, loops).nbytes() for loops in (1, 2, 4, 8)]
    ouro_bytes = [ouro.new_cache(1, 64, loops).nbytes() for loops in (1, 2, 4, 8)]
    assert len(set(melt_bytes)) == 1
    assert ouro_bytes == [ouro_bytes[0] * t for t in (1, 2, 4, 8)]
    assert melt_bytes[0] == ouro_bytes[0]  # one loop of Ouro == MELT at any loop count
    c = melt.config
    assert melt_bytes[0] == 64 * c.kv_bytes_per_token(torch.float32) == 64 * 2 * 3 * 2 * 8 * 4
    assert melt.new_cache(1, 64, 4).nbytes_per_loop() == [melt_bytes[0], 0, 0, 0]
    assert ouro.new_cache(1, 64, 4).nbytes_per_loop() == [ouro_bytes[0]] * 4


def test_more_loops_than_trained_with_shared_cache(melt):
    ids = _ids(melt.config.vocab_size, 1, 7)
    cache = melt.new_cache(1, 7)
    torch.testing.assert_close(
        prefill_logits(melt, ids, None, cache, chunk_size=1, loops=8),
        melt(ids, loops=8, chunk_size=1).logits,
        atol=ATOL,
        rtol=1e-4,
    )


def test_padded_batch_equals_prompts_alone(melt):
    V = melt.config.vocab_size
    prompts = [_ids(V, 1, n, seed=n)[0] for n in (3, 7)]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 7 - len(p) :], mask[b, 7 - len(p) :] = p, 1
    batched = greedy_tokens(melt, ids, mask, max_new_tokens=6, chunk_size=1)
    for b, p in enumerate(prompts):
        alone = greedy_tokens(melt, p[None], max_new_tokens=6, chunk_size=1)
        assert torch.equal(batched[b], alone[0])


@pytest.mark.parametrize("chunk", [3, 4])
def test_scoring_a_padded_batch_chunks_every_row_as_alone(melt, chunk):
    """model(ids, mask) on a left-padded batch: chunks start at each row's first real token, so a
    row whose padding is not a multiple of the chunk size is scored as it is alone (counted from
    the start of the padded row, 4 pad + 9 real tokens in chunks of 3 were off by 0.3 logits on a
    tiny random MELT)."""
    V = melt.config.vocab_size
    prompts = [_ids(V, 1, n, seed=n)[0] for n in (13, 9, 6, 1)]
    ids = torch.zeros(4, 13, dtype=torch.long)
    mask = torch.zeros(4, 13, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 13 - len(p) :], mask[b, 13 - len(p) :] = p, 1
    with torch.no_grad():
        batched = melt(ids, mask, chunk_size=chunk, return_loop_logits=True)
        for b, p in enumerate(prompts):
            alone = melt(p[None], chunk_size=chunk, return_loop_logits=True)
            n = len(p)
            torch.testing.assert_close(batched.logits[b, 13 - n :], alone.logits[0], atol=ATOL, rtol=1e-4)
            for t in range(len(alone.loop_logits)):
                torch.testing.assert_close(
                    batched.loop_logits[t][b, 13 - n :], alone.loop_logits[t][0], atol=ATOL, rtol=1e-4
                )


def test_gradients_reach_gates_and_base_through_chunks(melt):
    melt.train()
    ids = _ids(melt.config.vocab_size, 2, 9, seed=9)

    def last_chunk_loss(**kw):
        # a loss on the LAST chunk only: gradient reaches earlier chunks only through their rows
        hidden, _ = melt.forward_chunkwise(ids, chunk_size=3, **kw)
        return melt.lm_head(hidden[-1][:, 6:]).logsumexp(-1).sum()

    last_chunk_loss().backward()
    for name, p in melt.named_parameters():
        if is_gate_parameter(name) or name.endswith("k_proj.weight") or name.endswith("mlp.up_proj.weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    grads = {n: p.grad.clone() for n, p in melt.named_parameters() if p.grad is not None}

    # checkpointed chunks: the same gradients
    melt.zero_grad()
    last_chunk_loss(checkpoint_chunks=True).backward()
    for n, p in melt.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)

    # detached history: earlier chunks' rows get no gradient, so the embeddings of chunk 1 get none
    melt.zero_grad()
    last_chunk_loss(detach_history=True).backward()
    emb_grad = melt.model.embed_tokens.weight.grad
    only_first = set(ids[:, :3].flatten().tolist()) - set(ids[:, 3:].flatten().tolist())
    assert only_first and all(emb_grad[t].abs().sum() == 0 for t in only_first)
    assert all(grads["model.embed_tokens.weight"][t].abs().sum() > 0 for t in only_first)


def test_attention_taps(melt, ouro):
    ids = _ids(melt.config.vocab_size, 1, 8)
    N, T = melt.config.num_hidden_layers, melt.config.total_ut_steps
    _, student = melt.forward_chunkwise(ids, alpha=0.0, chunk_size=3, return_attn_outputs=True)
    t = ouro(ids, return_attn_outputs=True)
    assert len(student) == len(t.attn_outputs) == N * T
    for a, b in zip(student, t.attn_outputs, strict=True):
        assert a.shape == (1, 8, melt.config.hidden_size)
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)
    assert melt(ids).attn_outputs is None


def test_melt_config_round_trip_and_validation():
    cfg = MeltConfig(hidden_size=32, num_attention_heads=4, melt=MeltSettings(policy="ema", chunk_size=7))
    again = MeltConfig.from_dict(cfg.to_dict())
    assert again.melt == cfg.melt and again.to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="melt.policy"):
        MeltSettings(policy="gru")
    with pytest.raises(ConfigError, match="unknown key"):
        MeltConfig.from_dict({**cfg.to_dict(), "melt": {"policy": "gate", "colour": 1}})
    for policy in ("last", "first", "mean", "ema"):
        with pytest.raises(ConfigError, match="applies to learned gates"):
            MeltSettings(policy=policy, h0="zeros")
    assert MeltSettings(policy="scalar", h0="zeros").learned

"""Bounded memory of the differentiable chunk-wise forward: each chunk's rows are made once and shared
by every later chunk (O(S) row memory), never copied into one longer tensor per chunk (O(S^2 / C))."""

from __future__ import annotations

import pytest
import torch

from melt_core import load_model
from melt_core.cache import rows as rows_module
from melt_core.cache.rows import GrowingRows

S, C = 18, 4  # 5 chunks, the last one short


@pytest.fixture
def melt(melt_ckpt):
    return load_model(melt_ckpt, dtype="fp32").train()


def _states(melt, monkeypatch, **kw) -> list:
    """The RowState every chunk starts from (MELT's and, in phase 1, Ouro's per-loop rows)."""
    seen, recording = [], [True]
    real = GrowingRows.__init__

    def spy(self, frozen):
        if recording[0]:  # the forward's stores, not those of a checkpointed chunk's recomputation
            seen.append(frozen)
        real(self, frozen)

    monkeypatch.setattr(rows_module.GrowingRows, "__init__", spy)
    ids = torch.randint(3, melt.config.vocab_size, (2, S), generator=torch.Generator().manual_seed(0))
    hidden, _ = melt.forward_chunkwise(ids, chunk_size=C, **kw)
    recording[0] = False
    sum(h.square().mean() for h in hidden).backward()
    return seen


@pytest.mark.parametrize("checkpoint_chunks", [False, True])
def test_rows_of_earlier_chunks_are_shared_not_copied(melt, monkeypatch, checkpoint_chunks):
    states = _states(melt, monkeypatch, alpha=0.5, checkpoint_chunks=checkpoint_chunks)
    melt_states, base_states = states[0::2], states[1::2]  # each chunk: MELT's store, then the base store
    config = melt.config
    for states_, slots in ((melt_states, config.num_hidden_layers), (base_states, config.num_hidden_layers * 4)):
        assert len(states_) == 5 and all(len(s.keys) == slots for s in states_)
        for before, after in zip(states_, states_[1:]):
            for slot in range(slots):
                # the next chunk's state holds the same tensors plus one new chunk
                assert len(after.keys[slot]) == len(before.keys[slot]) + 1
                assert all(a is b for a, b in zip(after.keys[slot], before.keys[slot]))
                assert all(a is b for a, b in zip(after.values[slot], before.values[slot]))
        # every tensor the states hold, counted once: one row per position and slot, not S^2 / C
        unique = {id(t): t for s in states_ for slot in s.keys + s.values for t in slot}
        row_bytes = 2 * config.num_key_value_heads * config.head_dim * 4  # K and V of one batch row, fp32
        last = states_[-1]
        assert sum(t.nbytes for t in unique.values()) == slots * last.length * 2 * row_bytes  # batch of 2
        assert last.length == S - 2  # the last chunk's own rows are in no later state


def test_checkpointed_chunks_give_the_same_forward_and_gradients(melt):
    ids = torch.randint(3, melt.config.vocab_size, (2, S), generator=torch.Generator().manual_seed(1))
    results = []
    for checkpoint_chunks in (False, True):
        melt.zero_grad(set_to_none=True)
        hidden, taps = melt.forward_chunkwise(
            ids, chunk_size=C, alpha=0.3, checkpoint_chunks=checkpoint_chunks, return_attn_outputs=True
        )
        (sum(h.square().mean() for h in hidden) + sum(t.square().mean() for t in taps)).backward()
        grads = {n: p.grad.clone() for n, p in melt.named_parameters() if p.grad is not None}
        results.append(([h.detach() for h in hidden], grads))
    (h0, g0), (h1, g1) = results
    assert all(torch.equal(a, b) for a, b in zip(h0, h1))  # the same operations on the same inputs
    assert g0.keys() == g1.keys() and any("kv_gate" in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7)


def test_detached_history_cuts_every_shared_chunk(melt, monkeypatch):
    states = _states(melt, monkeypatch, alpha=0.5, detach_history=True)
    for state in states[2:]:  # from the second chunk on, earlier rows carry no graph
        assert all(not t.requires_grad for slot in state.keys + state.values for t in slot)

"""Cache layouts: the slot of each (loop, layer), the sizes they imply, and first-then-shared's
semantics (loop 1 attends over exactly Ouro's loop-1 rows; later loops over one shared slot)."""

from __future__ import annotations

import pytest
import torch

from melt_core import load_model
from melt_core.cache import CACHE_LAYOUTS, cache_layout
from melt_core.checkpoints import convert_ouro_to_melt
from melt_core.errors import ConfigError, InvalidArgumentError
from melt_core.inference.static_decode import StaticDecoder
from melt_core.models import MeltSettings
from melt_core.models.adaptive import AdaptiveDepth


@pytest.mark.parametrize("name", CACHE_LAYOUTS)
@pytest.mark.parametrize("loops", [1, 2, 4])
def test_every_loop_and_layer_has_a_slot_within_the_cache(name, loops):
    layout = cache_layout(name, 3)
    slots = {(t, i): layout.slot(t, i) for t in range(loops) for i in range(3)}
    assert set(slots.values()) == set(range(layout.num_slots(loops)))
    for t in range(loops):  # a loop writes only slots that exist by then
        assert max(slots[t, i] for i in range(3)) < sum(layout.slots_per_loop(loops)[: t + 1])
    assert {i: slots[0, i] for i in range(3)} == {0: 0, 1: 1, 2: 2}  # loop 1 always in the first stack


def test_the_layouts_sizes():
    assert cache_layout("per_loop", 3).slots_per_loop(4) == [3, 3, 3, 3]
    assert cache_layout("shared", 3).slots_per_loop(4) == [3, 0, 0, 0]
    assert cache_layout("first_then_shared", 3).slots_per_loop(4) == [3, 3, 0, 0]
    assert cache_layout("first_then_shared", 3).slots_per_loop(1) == [3]
    ft = cache_layout("first_then_shared", 3)
    assert [ft.slot(t, 1) for t in range(4)] == [1, 4, 4, 4]
    with pytest.raises(InvalidArgumentError, match="unknown cache layout"):
        cache_layout("per_token", 3)


def test_a_melt_config_names_only_melt_layouts():
    assert MeltSettings(layout="first_then_shared").layout == "first_then_shared"
    with pytest.raises(ConfigError, match="melt.layout must be one of shared, first_then_shared"):
        MeltSettings(layout="per_loop")


@pytest.fixture(scope="module")
def first_then_shared(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("fts") / "m"
    return convert_ouro_to_melt(tiny_ckpt, out, MeltSettings(policy="last", layout="first_then_shared", chunk_size=3))


def _per_loop_logits(model, ids, cache):
    """Every loop's logits (T x (B, S, V)) of ``ids`` fed one token at a time through ``cache``."""
    steps = [model(ids[:, i : i + 1], cache=cache, return_loop_logits=True).loop_logits for i in range(ids.shape[1])]
    return [torch.cat([s[t] for s in steps], 1) for t in range(len(steps[0]))]


def test_first_then_shared_keeps_ouros_first_loop_and_shares_the_rest(tiny_ckpt, first_then_shared):
    ouro = load_model(tiny_ckpt, dtype="fp32")
    fts = load_model(first_then_shared, dtype="fp32")
    ids = torch.randint(3, ouro.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    T, N = ouro.config.total_ut_steps, ouro.config.num_hidden_layers
    cache = fts.new_cache(2, 9)
    assert cache.num_slots == 2 * N and cache.nbytes() == 2 * load_model(tiny_ckpt).new_cache(2, 9, 1).nbytes()
    reference = _per_loop_logits(ouro, ids, ouro.new_cache(2, 9))
    got = _per_loop_logits(fts, ids, cache)
    torch.testing.assert_close(got[0], reference[0], atol=1e-5, rtol=1e-5)  # loop 1: Ouro's own rows
    assert not torch.allclose(got[-1], reference[-1], atol=1e-3)  # later loops read one shared row
    # the shared slot holds each token's last loop's rows: loop 1's slot and it differ
    assert not torch.allclose(cache.store.keys[:N, :, :, :9], cache.store.keys[N:, :, :, :9])
    # the training forward (chunks of 1) writes the same slots: the cached path's last loop
    hidden, _ = fts.forward_chunkwise(ids, chunk_size=1, loops=T)
    torch.testing.assert_close(fts.lm_head(hidden[-1]), got[-1], atol=1e-5, rtol=1e-5)


def test_first_then_shared_static_step_and_chunks_match_the_eager_path(first_then_shared):
    model = load_model(first_then_shared, dtype="fp32")
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    expected = model(ids, cache=model.new_cache(2, 8), chunk_size=[1, 3, 3]).logits[:, -1]
    step = StaticDecoder(model, model.new_cache(2, 8))
    step(ids[:, :1])
    step(ids[:, 1:4])
    torch.testing.assert_close(step(ids[:, 4:7]), expected)


def test_adaptive_depth_refuses_a_layout_that_would_leave_rows_unwritten(first_then_shared):
    model = load_model(first_then_shared, dtype="fp32")
    with pytest.raises(InvalidArgumentError, match="adaptive depth needs the shared cache layout"):
        model(torch.tensor([[5, 6]]), cache=model.new_cache(1, 2), depth=AdaptiveDepth(threshold=0.5))

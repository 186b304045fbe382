"""The fixed-shape decode step (and its compiled form) gives the same tokens as the ordinary step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from greedy import engine, greedy_tokens

from melt_core import load_model
from melt_core.errors import InvalidArgumentError
from melt_core.inference import GenerationSettings, Sampler, SamplingSettings, generate_text
from melt_core.inference.engine import EngineOptions
from melt_core.inference.static_decode import StaticDecoder
from melt_core.models.adaptive import AdaptiveDepth


def stepped_greedy(model, ids, mask, step: StaticDecoder, max_new_tokens: int, chunk_size: int = 3) -> torch.Tensor:
    """Greedy tokens with the prompt prefilled eagerly into ``step``'s cache and every decode step
    run by ``step`` (a fixed-shape step built by hand: fused, compiled ...)."""
    logits = engine(model, chunk_size=chunk_size).prefill(step.cache, ids, mask)
    tokens = []
    for _ in range(max_new_tokens):
        tokens.append(logits.argmax(-1))
        logits = step(tokens[-1][:, None])
    return torch.stack(tokens, dim=1)


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
    assert torch.equal(greedy_tokens(model, ids, mask, max_new_tokens=8, decode="static"), expected)
    for b in range(3):  # and each row alone
        row = ids[b : b + 1, int((mask[b] == 0).sum()) :]
        assert torch.equal(greedy_tokens(model, row, max_new_tokens=8, decode="static"), expected[b : b + 1])
    # logits: equal to float rounding (attention over the masked, not-yet-written positions)
    cache, static_cache = model.new_cache(3, 12), model.new_cache(3, 12)
    last = engine(model).prefill(cache, ids, mask).argmax(-1)[:, None]
    engine(model).prefill(static_cache, ids, mask)
    plain = model(last, cache=cache).logits[:, -1]
    torch.testing.assert_close(StaticDecoder(model, static_cache)(last), plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny_ckpt", "melt_ckpt"])
def test_fused_static_step_matches_the_ordinary_step(name, request):
    """Fused projections (the default on CUDA), forced on here: the same greedy tokens, prefill
    chunks and decode steps, and logits equal to float rounding."""
    model = load_model(request.getfixturevalue(name))
    ids, mask = padded_batch(model.config.vocab_size)
    expected = greedy_tokens(model, ids, mask, max_new_tokens=8, chunk_size=3)
    fused = StaticDecoder(model, model.new_cache(3, 18), fuse=True)
    assert torch.equal(stepped_greedy(model, ids, mask, fused, 8), expected)
    cache, fused_cache = model.new_cache(3, 12), model.new_cache(3, 12)
    last = engine(model).prefill(cache, ids, mask).argmax(-1)[:, None]
    engine(model).prefill(fused_cache, ids, mask)
    plain = model(last, cache=cache).logits[:, -1]
    torch.testing.assert_close(StaticDecoder(model, fused_cache, fuse=True)(last), plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny_ckpt", "melt_ckpt"])
def test_static_prefill_chunks_match_the_ordinary_prefill(name, request):
    """Full prefill chunks run as fixed-shape steps (the remainder chunk as an ordinary forward):
    the same tokens, padded batch and each row alone, and the same cache rows."""
    model = load_model(request.getfixturevalue(name))
    ids, mask = padded_batch(model.config.vocab_size)
    expected = greedy_tokens(model, ids, mask, max_new_tokens=6, chunk_size=3)
    assert torch.equal(greedy_tokens(model, ids, mask, max_new_tokens=6, chunk_size=3, decode="static"), expected)
    for b in range(3):
        row = ids[b : b + 1, int((mask[b] == 0).sum()) :]
        assert torch.equal(
            greedy_tokens(model, row, max_new_tokens=6, chunk_size=3, decode="static"), expected[b : b + 1]
        )
    cache, static_cache = model.new_cache(3, 12), model.new_cache(3, 12)
    plain = engine(model, chunk_size=3).prefill(cache, ids, mask)
    fixed = engine(model, chunk_size=3, decode="static").prefill(static_cache, ids, mask)
    torch.testing.assert_close(fixed, plain, atol=1e-5, rtol=1e-5)
    real = mask.bool()[:, None, :, None]  # rows of padding positions are never read
    for plain_rows, static_rows in (
        (cache.store.keys, static_cache.store.keys),
        (cache.store.values, static_cache.store.values),
    ):
        torch.testing.assert_close(
            static_rows[..., :10, :] * real, plain_rows[..., :10, :] * real, atol=1e-5, rtol=1e-5
        )
    # every loop's logits of the last position, as the eager path gives them (melt eval problems)
    for path in ("eager", "static"):
        runner = engine(model, chunk_size=3, decode=path)
        cache = runner.new_cache(3, 13)
        per_loop = runner.prefill(cache, ids, mask, per_loop=True)
        if path == "eager":
            expected_loops = per_loop + runner.step(cache, ids[:, :1], per_loop=True)
        else:
            got = per_loop + runner.step(cache, ids[:, :1], per_loop=True)
    for a, b in zip(got, expected_loops, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_static_step_keeps_exit_options(tiny_ckpt):
    model = load_model(tiny_ckpt)
    ids, mask = padded_batch(model.config.vocab_size)
    for kwargs in ({"exit_at_step": 0}, {"exit_threshold": 0.3}, {"loops": 2}):
        expected = greedy_tokens(model, ids, mask, max_new_tokens=5, **kwargs)
        assert torch.equal(greedy_tokens(model, ids, mask, max_new_tokens=5, decode="static", **kwargs), expected), (
            kwargs
        )


def test_static_step_refuses_what_it_cannot_do(melt_ckpt):
    model = load_model(melt_ckpt)
    with pytest.raises(InvalidArgumentError, match="float-row cache"):
        StaticDecoder(model, _int8(model))
    ids = torch.randint(3, model.config.vocab_size, (1, 4))
    with pytest.raises(InvalidArgumentError, match="adaptive depth"):
        greedy_tokens(model, ids, max_new_tokens=3, decode="static", depth=AdaptiveDepth(threshold=0.5))
    with pytest.raises(InvalidArgumentError, match="excludes --kv-dtype"):
        GenerationSettings(decode="compiled", kv_dtype="int8", kv_group_size=4)
    with pytest.raises(InvalidArgumentError, match="excludes int8 / int4"):
        EngineOptions(decode="static", kv_dtype="int8")
    with pytest.raises(InvalidArgumentError, match="CUDA graphs need a CUDA device"):
        engine(model, decode="graph")
    # auto: eager on a CPU, and wherever a fixed-shape step cannot run
    assert engine(model).path == "eager" and engine(model, decode="auto").path == "eager"


def _int8(model):
    from melt_core.cache.quantized import kv_format

    return model.new_cache(1, 8, kv_dtype=kv_format("int8", group_size=4))


def test_compiled_decoding_gives_the_same_text(melt_ckpt):
    """torch.compile of one decoder block, which every layer and loop reuse: the same greedy tokens
    through generate_text, MELT (its first loop runs the same compiled block as the others), prompts
    of several lengths. One compiled graph for the decode step's 3 layers x 4 loops: compile time
    does not grow with depth, and no layer, loop or prompt length recompiles (a guard on a layer, a
    loop or a stride would). Prefill chunks and padded batches: the slow tests below."""
    from torch._dynamo.utils import counters

    from melt_core import load_tokenizer

    model = load_model(melt_ckpt)
    tokenizer = load_tokenizer(melt_ckpt)
    prompts = ["Once upon a time there was a", "The capital of France is a city", "Paris is a city by the river"]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1
    # one prefill chunk per prompt (an ordinary forward): only the decode step compiles
    settings = GenerationSettings(max_new_tokens=6, stop_token_ids=(), batch_size=1, chunk_size=64)
    plain = generate_text(model, tokenizer, prompts, settings)
    graphs = counters["stats"]["unique_graphs"]
    compiled = generate_text(model, tokenizer, prompts, replace(settings, decode="compiled"))
    # prompts of several lengths: caches rounded up to the same length
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert [r.token_ids for r in compiled.results] == [r.token_ids for r in plain.results]
    # the first compiled step compiles: timed apart, not as decoding
    assert compiled.stats.startup_seconds > 0 and plain.stats.startup_seconds == 0
    assert (compiled.stats.decode_path, plain.stats.decode_path) == ("compiled", "eager")
    assert compiled.stats.decode_tokens_per_s > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_ckpt", "melt_ckpt"])
def test_compiled_step_matches_eager_batched_and_alone(name, request):
    """The compiled block, Ouro and MELT: a left-padded batch and each row alone (full prefill
    chunks compiled too) give the eager path's greedy tokens; one graph per shape."""
    from torch._dynamo.utils import counters

    model = load_model(request.getfixturevalue(name))
    ids, mask = padded_batch(model.config.vocab_size)
    expected = greedy_tokens(model, ids, mask, max_new_tokens=6, chunk_size=3)
    graphs = counters["stats"]["unique_graphs"]

    def compiled(ids, mask=None):
        runner = engine(model, chunk_size=3, decode="compiled")
        cache = runner.new_cache(ids.shape[0], 16)  # one cache length: one shape per batch size
        return torch.stack(list(runner.generate(cache, ids, mask, Sampler(SamplingSettings()), 6)), dim=1)

    assert torch.equal(compiled(ids, mask), expected)
    for b in range(3):
        row = ids[b : b + 1, int((mask[b] == 0).sum()) :]
        assert torch.equal(compiled(row), expected[b : b + 1]), b
    # batch 3 and batch 1, each a 3-token prefill chunk and a decode step
    assert counters["stats"]["unique_graphs"] - graphs == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["tiny_ckpt", "melt_ckpt"])
def test_every_cuda_path_gives_the_eager_tokens(name, request):
    """On CUDA (fused projections): the static step, the CUDA graph (the default) and the compiled
    block give the eager path's greedy tokens, padded batch and each row alone; a graph is
    captured once per shape and replayed."""
    model = load_model(request.getfixturevalue(name), device="cuda")
    ids, mask = (t.cuda() for t in padded_batch(model.config.vocab_size))
    expected = greedy_tokens(model, ids, mask, max_new_tokens=8, chunk_size=3)
    assert engine(model, decode="auto").path == "graph"
    for path in ("static", "graph", "compiled"):
        assert torch.equal(greedy_tokens(model, ids, mask, max_new_tokens=8, chunk_size=3, decode=path), expected)
        for b in range(3):
            row = ids[b : b + 1, int((mask[b] == 0).sum()) :]
            got = greedy_tokens(model, row, max_new_tokens=8, chunk_size=3, decode=path)
            assert torch.equal(got, expected[b : b + 1]), (path, b)


@pytest.mark.parametrize("name", ["tiny_ckpt", "melt_ckpt"])
def test_fused_projections_store_each_weight_once(name, request, tmp_path):
    model = load_model(request.getfixturevalue(name))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = model(ids).logits
    model.fuse_projections()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    fused = attn.qkv if name == "tiny_ckpt" else attn.kv
    names = ["q_proj", "k_proj", "v_proj"] if name == "tiny_ckpt" else ["k_proj", "v_proj"]
    # the parameters are row blocks of the fused matrix: one storage, nothing copied
    assert fused.shape[0] == sum(getattr(attn, n).weight.shape[0] for n in names)
    assert {getattr(attn, n).weight.untyped_storage().data_ptr() for n in names} == {fused.untyped_storage().data_ptr()}
    assert mlp.gate_proj.weight.data_ptr() == mlp.gate_up.data_ptr()
    model.fuse_projections()  # fusing again reuses the matrices
    assert (attn.qkv if name == "tiny_ckpt" else attn.kv) is fused
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)  # the ordinary forward is unchanged
    # training still reaches every projection (the ordinary forward uses the parameters)
    model(ids).logits.sum().backward()
    assert all(getattr(attn, n).weight.grad is not None for n in names)
    # a fused model saves as separate tensors and loads back equal
    from melt_core.checkpoints.io import save_checkpoint

    out = save_checkpoint(model, tmp_path / "saved")
    for n, p in load_model(out).named_parameters():
        assert torch.equal(p, before[n]), n
    # a weight replaced after fusing is fused again, not read stale
    with torch.no_grad():
        attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight * 2)
    model.fuse_projections()
    assert (attn.qkv if name == "tiny_ckpt" else attn.kv) is not fused
    assert attn.k_proj.weight.data_ptr() != fused.data_ptr()


@pytest.mark.slow
def test_compiled_fused_step_gives_the_same_tokens(tiny_ckpt):
    """The compiled step with fused q/k/v (the CUDA default), on Ouro: the same greedy tokens."""
    model = load_model(tiny_ckpt)
    ids, mask = padded_batch(model.config.vocab_size)
    expected = greedy_tokens(model, ids, mask, max_new_tokens=6, chunk_size=3)
    step = StaticDecoder(model, model.new_cache(3, 16), compile=True, fuse=True)
    assert torch.equal(stepped_greedy(model, ids, mask, step, 6), expected)


def test_key_span_doubles_from_256_and_stops_at_the_cache():
    from melt_core.inference.static_decode import key_span

    assert [key_span(end, 2000) for end in (1, 256, 257, 600, 1500)] == [256, 256, 512, 1024, 2000]
    assert key_span(10, 16) == 16


@pytest.mark.parametrize("name", ["tiny_ckpt", "melt_ckpt"])
def test_static_step_across_key_spans_matches_the_eager_step(name, request):
    """A long cache: the fixed-shape step attends over 256, then 512 positions as the sequence
    crosses 256 (prefill chunks and decode steps), with the eager path's greedy tokens."""
    model = load_model(request.getfixturevalue(name))
    ids = torch.randint(3, model.config.vocab_size, (2, 250), generator=torch.Generator().manual_seed(5))
    expected = greedy_tokens(model, ids, max_new_tokens=12, chunk_size=64)
    runner = engine(model, chunk_size=64, decode="static")
    cache = runner.new_cache(2, 700)
    got = torch.stack(list(runner.generate(cache, ids, None, Sampler(SamplingSettings()), 12)), 1)
    assert torch.equal(got, expected)
    assert sorted(runner._fixed[1]._rows) == [256, 512]  # two spans, not the cache's 700


def test_a_failed_cuda_graph_capture_warns_and_decodes_on(tiny_ckpt, monkeypatch):
    """If capturing a shape fails, the step says so once and runs uncaptured: the same tokens."""
    from melt_core.errors import MeltWarning
    from melt_core.inference import static_decode

    class FailingCapture:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(static_decode, "CapturedStep", FailingCapture)
    model = load_model(tiny_ckpt)
    ids, mask = padded_batch(model.config.vocab_size)
    expected = greedy_tokens(model, ids, mask, max_new_tokens=6)
    step = StaticDecoder(model, model.new_cache(3, 16))
    step.cuda_graph = True  # as on CUDA (the capture itself is replaced above)
    with pytest.warns(MeltWarning, match="operation not permitted when stream is capturing\\); decoding on"):
        got = stepped_greedy(model, ids, mask, step, 6)
    assert torch.equal(got, expected) and not step.cuda_graph

"""melt's models through Hugging Face transformers: AutoModelForCausalLM, generate(), save_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from greedy import greedy_tokens
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TextStreamer

from melt_core import load_model
from melt_core.errors import InvalidArgumentError
from melt_core.integrations.hf import HFMeltForCausalLM, HFOuroForCausalLM


@pytest.fixture(params=["tiny_ckpt", "melt_ckpt"])
def checkpoint(request):
    return request.getfixturevalue(request.param)


def left_padded(vocab: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, S - n :] = torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n))
        mask[b, S - n :] = 1
    return ids, mask


def test_auto_classes_load_melt_models_with_the_same_logits(checkpoint):
    melt_model = load_model(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert isinstance(model, HFMeltForCausalLM if config.model_type == "melt" else HFOuroForCausalLM)
    ids, mask = left_padded(melt_model.config.vocab_size, [9, 6])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, melt_model(ids).logits)
        # a padded row scores as it does alone (MELT: chunks start at the row's first real token)
        alone = model(ids[1:, 3:]).logits[0]
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[1, 3:], alone, atol=1e-5, rtol=1e-4)
    bf16 = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, device_map="cpu")
    assert bf16.dtype == torch.bfloat16 and bf16.looped.dtype == torch.bfloat16


def test_generate_matches_melt_batched_and_alone(checkpoint):
    melt_model = load_model(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    ids, mask = left_padded(melt_model.config.vocab_size, [11, 6, 3])
    expected = greedy_tokens(melt_model, ids, mask, max_new_tokens=7)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out[:, ids.shape[1] :], expected)
    for b, n in enumerate([11, 6, 3]):
        row = ids[b : b + 1, ids.shape[1] - n :]
        alone = model.generate(row, max_new_tokens=7, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(alone[0, n:], expected[b])
    with pytest.raises(InvalidArgumentError, match="left-padded"):
        model.generate(ids.flip(1), attention_mask=mask.flip(1), max_new_tokens=2, do_sample=False)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=5, eos_token_id=None)
    assert sampled.shape == (3, ids.shape[1] + 4) and bool((sampled[:, : ids.shape[1]] == ids).all())


def test_generate_with_tokenizer_streamer_and_loops(melt_ckpt, capsys):
    tokenizer = AutoTokenizer.from_pretrained(melt_ckpt)
    model = AutoModelForCausalLM.from_pretrained(melt_ckpt)
    inputs = tokenizer(["Once upon a time"], return_tensors="pt")
    model.generate(**inputs, max_new_tokens=5, do_sample=False, streamer=TextStreamer(tokenizer))
    assert capsys.readouterr().out.strip()
    n = inputs["input_ids"].shape[1]
    one_loop = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=None, loops=1)
    expected = greedy_tokens(load_model(melt_ckpt), inputs["input_ids"], max_new_tokens=5, loops=1)
    assert torch.equal(one_loop[:, n:], expected)


def test_save_pretrained_round_trips_through_melt(checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = load_model(checkpoint)
    assert config["model_type"] == original.config.model_type
    assert config["architectures"] == [type(original).__name__]
    back = load_model(tmp_path / "saved")
    ids = torch.randint(3, original.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, original(ids).logits)


def test_a_melt_config_carries_no_ouro_auto_map(tiny_ckpt, melt_ckpt, tmp_path):
    """Loading a MELT directory with trust_remote_code=True must not build an Ouro model."""
    ouro = json.loads((tiny_ckpt / "config.json").read_text())
    ouro["auto_map"] = {"AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"}
    (tmp_path / "o").mkdir()
    for f in tiny_ckpt.iterdir():
        (tmp_path / "o" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "o" / "config.json").write_text(json.dumps(ouro))
    from melt_core.checkpoints import convert_ouro_to_melt

    converted = convert_ouro_to_melt(tmp_path / "o", tmp_path / "m")
    assert "auto_map" not in json.loads((converted / "config.json").read_text())
    assert "auto_map" not in json.loads((melt_ckpt / "config.json").read_text())


def _saved_bytes_and_grads(model, ids, labels):
    """A training step's loss gradients and the bytes autograd keeps for the backward pass."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=labels).loss
    loss.backward()
    return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_keeps_gradients_and_saves_less(checkpoint):
    """PEFT and TRL call gradient_checkpointing_enable() first: Ouro recomputes each block, MELT each chunk."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint).train()
    ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    plain_bytes, plain_grads = _saved_bytes_and_grads(model, ids, ids)
    with pytest.warns(FutureWarning):  # transformers 5 renamed it activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    assert model.is_activation_checkpointing
    ckpt_bytes, ckpt_grads = _saved_bytes_and_grads(model, ids, ids)
    assert ckpt_bytes < plain_bytes / 2
    assert plain_grads.keys() == ckpt_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing

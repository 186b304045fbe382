"""Checkpoint I/O: round trips, sharding, config keys, and every bad input's error."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from melt_core import load_model, save_checkpoint
from melt_core.checkpoints.io import INDEX_NAME, WEIGHTS_NAME, load_config, read_config_dict
from melt_core.checkpoints.tokenizer import load_tokenizer
from melt_core.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    OutputExistsError,
    UnsupportedModelError,
    WeightsMismatchError,
)
from melt_core.outputs import atomic_directory


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_save_load_round_trip_is_bit_exact(tiny_ckpt, tmp_path, dtype):
    model = load_model(tiny_ckpt, dtype=dtype)
    out = save_checkpoint(model, tmp_path / "out", tokenizer=tiny_ckpt)
    again = load_model(out)
    assert again.dtype == model.dtype
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    saved = json.loads((out / "config.json").read_text())["torch_dtype"]
    assert saved == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    assert load_tokenizer(out).encode("hello") == load_tokenizer(tiny_ckpt).encode("hello")


def test_sharded_load_equals_single_file_load(tiny_ckpt, tmp_path):
    model = load_model(tiny_ckpt)
    out = save_checkpoint(model, tmp_path / "sharded", max_shard_size=40_000)
    assert not (out / WEIGHTS_NAME).exists()
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2
    mask = os.umask(0)
    os.umask(mask)
    assert {(f.stat().st_mode & 0o777) for f in out.glob("*.safetensors")} == {0o666 & ~mask}  # not 0600
    sharded = load_model(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_into_dtype_and_meta(tiny_ckpt):
    assert load_model(tiny_ckpt, dtype="bf16").lm_head.weight.dtype == torch.bfloat16
    assert load_model(tiny_ckpt, dtype=torch.float16).lm_head.weight.dtype == torch.float16
    meta = load_model(tiny_ckpt, device="meta")
    assert meta.lm_head.weight.device.type == "meta"


def test_checkpoint_has_exact_hf_layout(tiny_ckpt):
    names = load_file(str(tiny_ckpt / WEIGHTS_NAME)).keys()
    cfg = read_config_dict(tiny_ckpt)
    assert len(names) == 11 * cfg["num_hidden_layers"] + 5
    assert cfg["model_type"] == "ouro" and cfg["architectures"] == ["OuroForCausalLM"]
    for key in ("total_ut_steps", "early_exit_threshold", "rope_theta", "use_sliding_window", "layer_types"):
        assert key in cfg
    tok = load_tokenizer(tiny_ckpt)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "generation_config.json"):
        assert (tiny_ckpt / f).is_file(), f


def test_unknown_config_keys_survive_a_round_trip(tiny_ckpt, tmp_path):
    src = _copy(tiny_ckpt, tmp_path / "src")
    cfg = read_config_dict(src)
    cfg.update({"my_custom_key": [1, 2], "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig"}})
    (src / "config.json").write_text(json.dumps(cfg))
    out = save_checkpoint(load_model(src), tmp_path / "out")
    again = read_config_dict(out)
    assert again["my_custom_key"] == [1, 2] and again["auto_map"] == cfg["auto_map"]


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(OutputExistsError), atomic_directory(out):
        pass
    with atomic_directory(out, force=True) as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in out.iterdir()] == ["new"]


# --- bad inputs -------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="config.json not found"):
        load_model(tmp_path)


def test_invalid_json_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)


def test_non_ouro_model_type(tiny_ckpt, tmp_path):
    src = _copy(tiny_ckpt, tmp_path / "llama")
    cfg = read_config_dict(src)
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="model_type 'llama'"):
        load_model(src)


def test_bad_config_field_is_named(tiny_ckpt, tmp_path):
    src = _copy(tiny_ckpt, tmp_path / "bad")
    cfg = read_config_dict(src)
    cfg["num_key_value_heads"] = 5
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        load_model(src)
    cfg["num_key_value_heads"] = 2
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="rope_scaling"):
        load_model(src)


def test_shape_mismatch_names_the_tensor(tiny_ckpt, tmp_path):
    src = _copy(tiny_ckpt, tmp_path / "shape")
    cfg = read_config_dict(src)
    cfg["intermediate_size"] += 8
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsMismatchError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
        load_model(src)


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_missing_or_unexpected_tensors(tiny_ckpt, tmp_path, change):
    src = _copy(tiny_ckpt, tmp_path / change)
    sd = load_file(str(src / WEIGHTS_NAME))
    if change == "missing":
        del sd["model.layers.1.mlp.up_proj.weight"]
    else:
        sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(48)
    save_file(sd, str(src / WEIGHTS_NAME))
    with pytest.raises(WeightsMismatchError, match=f"{change}.*model.layers"):
        load_model(src)


def test_truncated_safetensors(tiny_ckpt, tmp_path):
    src = _copy(tiny_ckpt, tmp_path / "trunc")
    data = (src / WEIGHTS_NAME).read_bytes()
    (src / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        load_model(src)


def test_garbage_safetensors(tiny_ckpt, tmp_path):
    src = _copy(tiny_ckpt, tmp_path / "garbage")
    (src / WEIGHTS_NAME).write_bytes(b"\x00" * 7)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_model(src)


def test_missing_shard(tiny_ckpt, tmp_path):
    out = save_checkpoint(load_model(tiny_ckpt), tmp_path / "sharded", max_shard_size=40_000)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointNotFoundError, match=shard.name):
        load_model(out)


def test_no_weights_is_an_error_except_on_meta(tiny_ckpt, tmp_path):
    (tmp_path / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    with pytest.raises(CheckpointNotFoundError, match="has no weights"):
        load_model(tmp_path)
    assert load_model(tmp_path, device="meta").lm_head.weight.is_meta


def test_loaded_weights_are_64_byte_aligned():
    """safetensors hands out tensors at any offset of the file; melt copies those that are unaligned."""
    from melt_core.checkpoints.io import ALIGNMENT

    model = load_model("example")
    assert all(t.data_ptr() % ALIGNMENT == 0 for t in model.state_dict().values())

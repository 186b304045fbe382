"""``melt convert``: bit-identical base tensors, gate init, config, errors, atomic output; MELT sizes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from melt_cli.app import app
from melt_core import load_model
from melt_core.checkpoints.convert import convert_ouro_to_melt
from melt_core.checkpoints.io import WEIGHTS_NAME, build_model, config_from_dict, read_config_dict
from melt_core.checkpoints.presets import preset_config
from melt_core.errors import OutputExistsError, UnsupportedModelError
from melt_core.models.config import MeltConfig, MeltSettings

runner = CliRunner()


@pytest.mark.parametrize(
    ("name", "added", "kv_melt"),
    [
        ("ouro-1.4b", 201_375_744, 196_608),
        ("ouro-2.6b", 402_751_488, 393_216),
    ],
)
def test_meta_sizes_of_real_models(name, added, kv_melt):
    ouro = config_from_dict(preset_config(name))
    melt = MeltConfig.from_ouro(ouro, MeltSettings())
    n_ouro = sum(p.numel() for p in build_model(ouro, "meta").parameters())
    melt_model = build_model(melt, "meta")
    assert sum(p.numel() for p in melt_model.parameters()) - n_ouro == added
    assert sum(p.numel() for p in melt_model.gate_parameters()) == added
    assert melt.kv_bytes_per_token(torch.bfloat16) == kv_melt
    assert ouro.kv_bytes_per_token(torch.bfloat16) == 4 * kv_melt
    assert melt.kv_bytes_per_token(torch.bfloat16, loops=16) == kv_melt


def test_round_trip_bit_identical(tiny_ckpt, tmp_path):
    out = convert_ouro_to_melt(tiny_ckpt, tmp_path / "melt", MeltSettings(z0=0.2, chunk_size=64))
    src = load_file(str(tiny_ckpt / WEIGHTS_NAME))
    dst = load_file(str(out / WEIGHTS_NAME))
    for name, t in src.items():
        assert dst[name].dtype == t.dtype and torch.equal(dst[name], t), name
    gates = {n: t for n, t in dst.items() if n not in src}
    cfg = read_config_dict(out)
    H, N = cfg["hidden_size"], cfg["num_hidden_layers"]
    assert len(gates) == 3 * N
    for i in range(N):
        p = f"model.layers.{i}.kv_gate."
        assert gates[p + "input_proj.weight"].shape == (H, H) and not gates[p + "input_proj.weight"].any()
        assert gates[p + "state_proj.weight"].shape == (H, H) and not gates[p + "state_proj.weight"].any()
        torch.testing.assert_close(gates[p + "bias"], torch.full((H,), math.log(0.2 / 0.8)))
    assert cfg["model_type"] == "melt" and cfg["architectures"] == ["MeltForCausalLM"]
    assert cfg["melt"]["policy"] == "gate" and cfg["melt"]["chunk_size"] == 64 and cfg["melt"]["z0"] == 0.2
    assert cfg["melt"]["source"] == str(tiny_ckpt.resolve())
    ouro_cfg = read_config_dict(tiny_ckpt)
    assert all(cfg[k] == v for k, v in ouro_cfg.items() if k not in ("model_type", "architectures"))
    assert (out / "tokenizer.json").read_bytes() == (tiny_ckpt / "tokenizer.json").read_bytes()
    model = load_model(out)
    assert type(model).__name__ == "MeltForCausalLM"
    # untrained gate: z = z0 everywhere
    z = model.model.layers[0].kv_gate(torch.randn(2, H), torch.randn(2, H))
    torch.testing.assert_close(z, torch.full((2, H), 0.2))


def test_bf16_conversion_and_training_free_policy(tiny_ckpt, tmp_path):
    out = convert_ouro_to_melt(tiny_ckpt, tmp_path / "last", MeltSettings(policy="last"), dtype="bf16")
    dst = load_file(str(out / WEIGHTS_NAME))
    src = load_file(str(tiny_ckpt / WEIGHTS_NAME))
    assert dst.keys() == src.keys()  # no gate tensors for a training-free policy
    assert all(t.dtype == torch.bfloat16 for t in dst.values())


def test_refuses_melt_source_non_ouro_and_existing_out(tiny_ckpt, tmp_path):
    melt = convert_ouro_to_melt(tiny_ckpt, tmp_path / "melt")
    with pytest.raises(UnsupportedModelError, match="already a MELT checkpoint"):
        convert_ouro_to_melt(melt, tmp_path / "again")
    with pytest.raises(OutputExistsError, match="--force"):
        convert_ouro_to_melt(tiny_ckpt, melt)
    before = (melt / WEIGHTS_NAME).stat().st_mtime_ns
    convert_ouro_to_melt(tiny_ckpt, melt, MeltSettings(policy="mean"), force=True)
    assert read_config_dict(melt)["melt"]["policy"] == "mean" and (melt / WEIGHTS_NAME).stat().st_mtime_ns != before


def test_interrupted_write_leaves_nothing(tiny_ckpt, tmp_path, monkeypatch):
    import melt_core.checkpoints.convert as convert_module

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "write_config", broken)
    with pytest.raises(KeyboardInterrupt):
        convert_ouro_to_melt(tiny_ckpt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_and_info(tiny_ckpt, tmp_path):
    out = tmp_path / "melt"
    result = runner.invoke(app, ["convert", str(tiny_ckpt), str(out), "--chunk-size", "8", "--z0", "0.05"])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    cfg = read_config_dict(out)
    H, N = cfg["hidden_size"], cfg["num_hidden_layers"]
    assert info["model_type"] == "melt"
    assert info["gate_parameters"] == N * (2 * H * H + H)
    assert info["kv_bytes_per_token"] == 2 * N * cfg["num_key_value_heads"] * cfg["head_dim"] * 4
    assert info["melt"]["chunk_size"] == 8
    again = runner.invoke(app, ["convert", str(tiny_ckpt), str(out)])
    assert again.exit_code == 1 and "not empty" in again.stderr and "--force" in again.stderr
    bad = runner.invoke(app, ["convert", str(out), str(tmp_path / "x")])
    assert bad.exit_code == 1 and "already a MELT checkpoint" in bad.stderr
    bad = runner.invoke(app, ["convert", str(tiny_ckpt), str(tmp_path / "y"), "--policy", "gru"])
    assert bad.exit_code == 1 and "melt.policy" in bad.stderr

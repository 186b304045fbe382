"""Sizes of the real Ouro models from their configs alone, on the meta device."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from melt_cli.app import app
from melt_core.checkpoints.io import build_model, config_from_dict
from melt_core.checkpoints.presets import preset_config


@pytest.mark.parametrize(
    ("name", "params", "tensors"),
    [
        ("ouro-1.4b", 1_434_652_673, 269),
        ("ouro-2.6b", 2_667_974_657, 533),
    ],
)
def test_real_parameter_counts_and_tensor_names(name, params, tensors):
    config = config_from_dict(preset_config(name))
    model = build_model(config, "meta")
    assert sum(p.numel() for p in model.parameters()) == params
    sd = model.state_dict()
    assert len(sd) == tensors
    H, I, V = 2048, 5632, 49152
    expected = {
        "model.embed_tokens.weight": (V, H),
        "lm_head.weight": (V, H),
        "model.norm.weight": (H,),
        "model.early_exit_gate.weight": (1, H),
        "model.early_exit_gate.bias": (1,),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        expected.update(
            {
                p + "self_attn.q_proj.weight": (2048, H),
                p + "self_attn.k_proj.weight": (2048, H),
                p + "self_attn.v_proj.weight": (2048, H),
                p + "self_attn.o_proj.weight": (H, 2048),
                p + "mlp.gate_proj.weight": (I, H),
                p + "mlp.up_proj.weight": (I, H),
                p + "mlp.down_proj.weight": (H, I),
                p + "input_layernorm.weight": (H,),
                p + "input_layernorm_2.weight": (H,),
                p + "post_attention_layernorm.weight": (H,),
                p + "post_attention_layernorm_2.weight": (H,),
            }
        )
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert all(p.device.type == "meta" for p in model.parameters())


def test_kv_bytes_per_token_of_ouro_1_4b():
    config = config_from_dict(preset_config("ouro-1.4b"))
    assert config.kv_bytes_per_token(torch.bfloat16) == 786_432
    assert config.kv_bytes_per_token(torch.bfloat16, loops=1) == 196_608


def test_melt_info_json_on_real_config_only(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(preset_config("ouro-1.4b")))
    result = CliRunner().invoke(app, ["info", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["model_type"] == "ouro"
    assert info["num_parameters"] == 1_434_652_673
    assert info["loops"] == 4
    assert info["kv_bytes_per_token"] == 786_432
    assert info["dtype"] == "bfloat16"
    assert info["weights_bytes"] == 2 * 1_434_652_673
    assert info["has_weights"] is False

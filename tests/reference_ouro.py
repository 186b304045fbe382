"""An independent, deliberately naive Ouro forward written from docs/ouro-format.md ("The forward pass",
"The exit gate and the returned logits") alone.

Functional over a raw state dict, eager attention with an explicit fp32 softmax, no caches, one
prompt at a time. melt's model is checked against it; nothing here is shared with melt_core.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    return w * (x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: Tensor, pos: Tensor, theta: float) -> Tensor:  # x (heads, S, d)
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = pos.float()[:, None] * inv[None, :]  # (S, d/2)
    cos, sin = torch.cat([ang, ang], -1).cos().to(x.dtype), torch.cat([ang, ang], -1).sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_forward(sd: dict[str, Tensor], cfg: dict, ids: Tensor, loops: int | None = None) -> dict:
    """ids (S,) -> {"loop_logits": [T x (S, V)], "pdf": (S, T), "hidden": [T x (S, H)]}."""
    T = loops or cfg["total_ut_steps"]
    n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // n
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    S = ids.shape[0]
    pos = torch.arange(S)
    x = sd["model.embed_tokens.weight"][ids]
    hidden, gates = [], []
    for _ in range(T):
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            u = _rms(x, sd[p + "input_layernorm.weight"], eps)
            q = (u @ sd[p + "self_attn.q_proj.weight"].T).view(S, n, d).transpose(0, 1)
            kk = (u @ sd[p + "self_attn.k_proj.weight"].T).view(S, k, d).transpose(0, 1)
            v = (u @ sd[p + "self_attn.v_proj.weight"].T).view(S, k, d).transpose(0, 1)
            q, kk = _rope(q, pos, theta), _rope(kk, pos, theta)
            kk, v = kk.repeat_interleave(n // k, 0), v.repeat_interleave(n // k, 0)
            scores = (q @ kk.transpose(1, 2)) / math.sqrt(d)
            scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
            attn = torch.softmax(scores.float(), -1).to(q.dtype) @ v  # (n, S, d)
            a = attn.transpose(0, 1).reshape(S, n * d) @ sd[p + "self_attn.o_proj.weight"].T
            x = x + _rms(a, sd[p + "input_layernorm_2.weight"], eps)
            m = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
            g = m @ sd[p + "mlp.gate_proj.weight"].T
            mlp = torch.nn.functional.silu(g) * (m @ sd[p + "mlp.up_proj.weight"].T)
            mlp = mlp @ sd[p + "mlp.down_proj.weight"].T
            x = x + _rms(mlp, sd[p + "post_attention_layernorm_2.weight"], eps)
        x = _rms(x, sd["model.norm.weight"], eps)
        hidden.append(x)
        gates.append(torch.sigmoid(x @ sd["model.early_exit_gate.weight"].T + sd["model.early_exit_gate.bias"])[:, 0])
    pdf, remaining = [], torch.ones_like(gates[0])
    for t, lam in enumerate(gates):
        pdf.append(lam * remaining if t < T - 1 else remaining)
        remaining = remaining * (1 - lam)
    return {"loop_logits": [h @ sd["lm_head.weight"].T for h in hidden], "pdf": torch.stack(pdf, -1), "hidden": hidden}

"""An independent, deliberately naive MELT forward written from docs/melt-method.md alone ("The MELT
layer", "Update rules", "Chunk-wise computation", phase 1 of "The two training
phases").

Functional over a raw state dict (Ouro's names plus ``model.layers.{i}.kv_gate.*``), eager attention
with an explicit fp32 softmax, no caches, one sequence at a time, chunks processed sequentially with
explicit Python loops and explicit masks. melt's MELT model is checked against it; nothing here is
shared with melt_core (only the RMSNorm / RoPE helpers of the naive Ouro reference are reused).
"""

from __future__ import annotations

import math

import torch
from reference_ouro import _rms, _rope
from torch import Tensor

LEARNED = ("gate", "scalar")


def _linear(x: Tensor, w: Tensor) -> Tensor:
    return x @ w.T


def _latent(sd: dict[str, Tensor], p: str, mc: dict, u: Tensor, h_prev: Tensor | None, tau: int) -> Tensor:
    """The latent state h of layer ``p`` after loop ``tau`` (1-based), mixed in fp32, cast to u's dtype."""
    policy, f = mc["policy"], float(mc.get("ema_factor", 0.2))
    learned = policy in LEARNED
    if h_prev is None:  # loop 1
        if not (learned and mc.get("h0", "first_input") == "zeros"):
            return u
        h_prev = torch.zeros_like(u)
    u32, h32 = u.float(), h_prev.float()
    if learned:
        z = torch.sigmoid(
            _linear(u32, sd[p + "kv_gate.input_proj.weight"].float())
            + _linear(h32, sd[p + "kv_gate.state_proj.weight"].float())
            + sd[p + "kv_gate.bias"].float()
        )  # (C, H) for "gate", (C, 1) for "scalar"
        h = z * h32 + (1 - z) * u32
    elif policy == "last":
        h = u32
    elif policy == "first":
        h = h32
    elif policy == "mean":
        h = ((tau - 1) / tau) * h32 + (1 / tau) * u32
    elif policy == "ema":
        h = (1 - f) * h32 + f * u32
    else:
        raise ValueError(f"unknown MELT policy {policy!r}")
    return h.to(u.dtype)


def reference_melt_forward(
    sd: dict[str, Tensor],
    cfg: dict,
    ids: Tensor,
    *,
    chunk_sizes: list[int],
    loops: int | None = None,
    alpha: float = 1.0,
) -> dict:
    """ids (S,) -> {"loop_logits": [T x (S, V)], "hidden": [T x (S, H)]}; keys/values at loop τ are
    ``alpha * KV_MELT + (1 - alpha) * KV_base`` (alpha = 1: pure MELT, alpha = 0: plain Ouro)."""
    T = loops or cfg["total_ut_steps"]
    n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // n
    eps, theta, N, mc = cfg["rms_norm_eps"], cfg["rope_theta"], cfg["num_hidden_layers"], cfg["melt"]
    S = ids.shape[0]
    assert all(c > 0 for c in chunk_sizes) and sum(chunk_sizes) == S, (chunk_sizes, S)
    melt_k: list[list[Tensor]] = [[] for _ in range(N)]  # per layer: final MELT rows of each finished chunk
    melt_v: list[list[Tensor]] = [[] for _ in range(N)]
    base_k: list[list[list[Tensor]]] = [[[] for _ in range(N)] for _ in range(T)]  # per (loop, layer): Ouro rows
    base_v: list[list[list[Tensor]]] = [[[] for _ in range(N)] for _ in range(T)]
    hidden: list[list[Tensor]] = [[] for _ in range(T)]
    start = 0
    for C in chunk_sizes:
        end = start + C
        pos = torch.arange(start, end)
        masked = torch.arange(end)[None, :] > pos[:, None]  # (C, end): key position after query position
        x = sd["model.embed_tokens.weight"][ids[start:end]]
        latent: list[Tensor | None] = [None] * N
        chunk_k: list[Tensor] = [torch.empty(0)] * N  # this chunk's MELT rows, overwritten every loop
        chunk_v: list[Tensor] = [torch.empty(0)] * N
        for t in range(T):
            for i in range(N):
                p = f"model.layers.{i}."
                u = _rms(x, sd[p + "input_layernorm.weight"], eps)
                h = _latent(sd, p, mc, u, latent[i], t + 1)
                latent[i] = h
                q = _rope(_linear(u, sd[p + "self_attn.q_proj.weight"]).view(C, n, d).transpose(0, 1), pos, theta)
                wk, wv = sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"]
                chunk_k[i] = _rope(_linear(h, wk).view(C, k, d).transpose(0, 1), pos, theta)  # (k, C, d)
                chunk_v[i] = _linear(h, wv).view(C, k, d).transpose(0, 1)
                kb = _rope(_linear(u, wk).view(C, k, d).transpose(0, 1), pos, theta)
                vb = _linear(u, wv).view(C, k, d).transpose(0, 1)
                keys_melt, vals_melt = torch.cat(melt_k[i] + [chunk_k[i]], 1), torch.cat(melt_v[i] + [chunk_v[i]], 1)
                keys_base, vals_base = torch.cat(base_k[t][i] + [kb], 1), torch.cat(base_v[t][i] + [vb], 1)
                base_k[t][i].append(kb)
                base_v[t][i].append(vb)
                kk = alpha * keys_melt + (1 - alpha) * keys_base  # (k, end, d)
                v = alpha * vals_melt + (1 - alpha) * vals_base
                kk, v = kk.repeat_interleave(n // k, 0), v.repeat_interleave(n // k, 0)
                scores = (q @ kk.transpose(1, 2)) / math.sqrt(d)  # (n, C, end)
                scores = scores.masked_fill(masked, float("-inf"))
                attn = torch.softmax(scores.float(), -1).to(q.dtype) @ v  # (n, C, d)
                a = _linear(attn.transpose(0, 1).reshape(C, n * d), sd[p + "self_attn.o_proj.weight"])
                x = x + _rms(a, sd[p + "input_layernorm_2.weight"], eps)
                m = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
                mlp = torch.nn.functional.silu(_linear(m, sd[p + "mlp.gate_proj.weight"]))
                mlp = _linear(mlp * _linear(m, sd[p + "mlp.up_proj.weight"]), sd[p + "mlp.down_proj.weight"])
                x = x + _rms(mlp, sd[p + "post_attention_layernorm_2.weight"], eps)
            x = _rms(x, sd["model.norm.weight"], eps)
            hidden[t].append(x)
        for i in range(N):  # the chunk's rows are final now: frozen for every later chunk
            melt_k[i].append(chunk_k[i])
            melt_v[i].append(chunk_v[i])
        start = end
    hid = [torch.cat(hs, 0) for hs in hidden]
    return {"loop_logits": [h @ sd["lm_head.weight"].T for h in hid], "hidden": hid}

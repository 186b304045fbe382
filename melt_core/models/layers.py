"""The transformer block shared by Ouro and MELT (OURO.md §4).

The block does not know where its keys and values come from: a KV policy (``models.kv``)
receives the normalised attention input ``u`` and returns the keys/values to attend over. Ouro's
per-loop rows and MELT's gated shared rows are two such policies; the block code is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import OuroConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled by ``weight`` (not 1 + weight)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm is one fused op for x * rsqrt(mean(x^2) + eps) (bit-identical here to the
        # unfused fp32 formula); a decode step runs 4 norms per layer and loop, so ops count
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Default (rotate-half) RoPE tables for ``positions`` [B, S] -> cos, sin [B, 1, S, head_dim].

    Computed in fp32 once per forward and shared by every layer and every loop.
    """
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (d/2,)
    freqs = positions.float()[..., None] * inv_freq  # (B, S, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, d)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


class MLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Multi-head attention with GQA; queries and keys/values are projected separately so that
    a KV policy can feed the K/V projections with something other than the query input."""

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def project_q(self, u: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """(B, S, H) -> rotated queries (B, heads, S, d)."""
        B, S, _ = u.shape
        q = self.q_proj(u).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, *rope)

    def project_kv(self, h: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """(B, S, H) -> rotated keys and values, each (B, kv_heads, S, d): the rows a cache stores."""
        B, S, _ = h.shape
        k = self.k_proj(h).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, *rope), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q (B, heads, S, d) over k, v (B, kv_heads, K, d) -> o_proj output (B, S, H).

        ``mask`` is a boolean (B, 1, S, K) "may attend" mask, or None for plain causal attention
        aligned so that the last query sees every key.
        """
        B, _, S, _ = q.shape
        is_causal = mask is None and S > 1
        if is_causal and k.shape[2] != S:
            raise ValueError("a causal attention without mask needs as many keys as queries")
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.num_kv_heads != self.num_heads
        )  # (B, heads, S, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class KVPolicy(Protocol):
    """Decides which keys/values layer ``layer_idx`` attends over at loop ``loop``."""

    def keys_values(
        self, layer: DecoderLayer, layer_idx: int, loop: int, u: Tensor, rope: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]: ...


@dataclass
class BlockInputs:
    """What every layer of one forward shares: RoPE tables, the attention mask, the KV policy,
    and an optional list collecting each attention sub-block output (distillation taps)."""

    rope: tuple[Tensor, Tensor]
    mask: Tensor | None
    kv: KVPolicy
    loop: int = 0
    attn_taps: list[Tensor] | None = None


class DecoderLayer(nn.Module):
    """Sandwich-norm block: x += norm2(attn(norm1(x))); x += norm4(mlp(norm3(x)))."""

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.input_layernorm_2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm_2 = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: Tensor, layer_idx: int, inputs: BlockInputs) -> Tensor:
        u = self.input_layernorm(x)  # (B, S, H)
        q = self.self_attn.project_q(u, inputs.rope)
        k, v = inputs.kv.keys_values(self, layer_idx, inputs.loop, u, inputs.rope)
        attn = self.input_layernorm_2(self.self_attn.attend(q, k, v, inputs.mask))
        if inputs.attn_taps is not None:
            inputs.attn_taps.append(attn)
        x = x + attn
        return x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))

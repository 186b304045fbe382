"""The transformer block shared by Ouro and MELT (docs/ouro-format.md, "The forward pass").

The block does not know where its keys and values come from: a KV policy (``models.kv``) says
what they are projected from (the normalised attention input ``u`` itself for Ouro, MELT's
latent state h) and stores the new rows, returning the keys/values to attend over. Ouro's
per-loop rows and MELT's gated shared rows are two such policies; the block code is the same.

Inference can fuse projections that read the same input into one matrix product (``fuse``: q/k/v
for Ouro, k/v for MELT, gate/up for the MLP); the parameters become slices of the fused matrix,
so no weight is stored twice, and a forward uses it only when its ``BlockInputs.fused`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dtypes import upcast
from .config import OuroConfig

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, cast back, then scaled by ``weight`` (not 1 + weight)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm is one fused op for x * rsqrt(mean(x^2) + eps) (bit-identical here to the
        # unfused fp32 formula); a decode step runs 4 norms per layer and loop, so ops count
        return self.weight * F.rms_norm(upcast(x), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Default (rotate-half) RoPE tables for ``positions`` [B, S] -> cos, sin [B, 1, S, head_dim].

    Computed in fp32 (fp64 for a float64 model) once per forward and shared by every layer and every loop.
    """
    work = torch.promote_types(dtype, torch.float32)
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).to(work) / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (d/2,)
    freqs = positions.to(work)[..., None] * inv_freq  # (B, S, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, d)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


def fused_weight(current: Tensor | None, linears: list[nn.Linear]) -> Tensor:
    """One (sum of out_features, in_features) matrix whose row blocks are the weights of
    ``linears``, which become views of it (no copy is kept). ``current``, a matrix fused earlier,
    is returned as it is while the weights are still its views (a ``.to()`` or an assignment
    replaces them: then they are fused again)."""
    weights = [linear.weight for linear in linears]
    if current is not None and _views_of(current, weights):
        return current
    with torch.no_grad():
        fused = torch.cat([w.detach() for w in weights])
    offset = 0
    for linear, w in zip(linears, weights, strict=True):
        linear.weight = nn.Parameter(fused[offset : offset + w.shape[0]], requires_grad=w.requires_grad)
        offset += w.shape[0]
    return fused


def _views_of(fused: Tensor, weights: list[Tensor]) -> bool:
    offset = 0
    for w in weights:
        if w.data_ptr() != fused[offset].data_ptr() or w.shape[1:] != fused.shape[1:]:
            return False
        offset += w.shape[0]
    return offset == fused.shape[0]


class MLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up: Tensor | None = None  # fused [gate_proj; up_proj] (``fuse``), inference only

    def fuse(self) -> None:
        self.gate_up = fused_weight(self.gate_up, [self.gate_proj, self.up_proj])

    def forward(self, x: Tensor, fused: bool = False) -> Tensor:
        if fused:
            gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Multi-head attention with GQA; keys/values may be projected from another input than the
    queries (MELT's latent state)."""

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
        # fused projections (``fuse``), inference only: [q; k; v] when keys/values come from the
        # query input (Ouro), else [k; v]
        self.qkv: Tensor | None = None
        self.kv: Tensor | None = None

    def fuse(self, queries: bool) -> None:
        """Fuse q/k/v (``queries``: keys/values are projected from the query input) or k/v."""
        if queries:
            self.qkv = fused_weight(self.qkv, [self.q_proj, self.k_proj, self.v_proj])
        else:
            self.kv = fused_weight(self.kv, [self.k_proj, self.v_proj])

    def project(
        self, u: Tensor, source: Tensor, rope: tuple[Tensor, Tensor], fused: bool = False
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries (B, heads, S, d) of ``u`` (B, S, H) and rotated keys and values (B,
        kv_heads, S, d each: the rows a cache stores) of ``source``; ``fused``: one matrix product
        for q/k/v when ``source`` is ``u``, else for k/v (the fused matrix ``fuse`` made)."""
        B, S, _ = u.shape
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if fused and source is u and self.qkv is not None:
            q, k, v = F.linear(u, self.qkv).split([q_size, kv_size, kv_size], dim=-1)
        elif fused:
            q = self.q_proj(u)
            k, v = F.linear(source, self.kv).split([kv_size, kv_size], dim=-1)
        else:
            q, k, v = self.q_proj(u), self.k_proj(source), self.v_proj(source)
        q = q.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def project_kv(self, h: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """(B, S, H) -> rotated keys and values, each (B, kv_heads, S, d)."""
        B, S, _ = h.shape
        k = self.k_proj(h).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, *rope), v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | CausalBias | None) -> Tensor:
        """q (B, heads, S, d) over k, v (B, kv_heads, K, d) -> o_proj output (B, S, H).

        ``mask`` is a boolean (B, 1, S, K) "may attend" mask, a causal bias (``attention_mask_for``),
        or None for plain causal attention with as many keys as queries.
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

    def source(self, layer: DecoderLayer, layer_idx: int, loop: int, u: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """What the new keys/values are projected from, given the attention input ``u``: ``u``
        itself (the same tensor) or another (B, S, H) state."""
        ...

    def rows(self, layer_idx: int, loop: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new rows k, v (B, kv_heads, S, d); return the keys/values to attend over."""
        ...


@dataclass
class BlockInputs:
    """What every layer of one forward shares: RoPE tables, the attention mask, the KV policy,
    an optional list collecting each attention sub-block output (distillation taps), and whether
    to use the fused projections (the model's ``fuse_projections`` made them)."""

    rope: tuple[Tensor, Tensor]
    mask: Tensor | CausalBias | None
    kv: KVPolicy
    loop: int = 0
    attn_taps: list[Tensor] | None = None
    fused: bool = False


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
        kv, loop = inputs.kv, inputs.loop
        q, k, v = self.self_attn.project(u, kv.source(self, layer_idx, loop, u, inputs.rope), inputs.rope, inputs.fused)
        keys, values = kv.rows(layer_idx, loop, k, v)
        attn = self.input_layernorm_2(self.self_attn.attend(q, keys, values, inputs.mask))
        if inputs.attn_taps is not None:
            inputs.attn_taps.append(attn)
        x = x + attn
        return x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x), inputs.fused))

    def fuse(self, queries: bool) -> None:
        """Fused projections for inference (``Attention.fuse``, ``MLP.fuse``)."""
        self.self_attn.fuse(queries)
        self.mlp.fuse()

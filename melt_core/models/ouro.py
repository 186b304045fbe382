"""Ouro (LoopLM): the same N-layer stack applied T times per token (docs/ouro-format.md, "The forward pass").

Forward semantics follow the reference exactly: sandwich-norm layers, RoPE positions shared by
all loops, ``norm`` after every loop (its output feeds the next loop and gives that loop's
logits), and the exit gate's pdf over loops deciding which loop's logits are returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from ..cache import KVCache
from ..cache.quantized import KVFormat
from ..errors import InvalidArgumentError
from ..words import plural
from .config import OuroConfig
from .kv import FullSequenceKV, PerLoopKV
from .layers import BlockInputs, DecoderLayer, KVPolicy, RMSNorm, rope_cos_sin

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

ConfigDefault = Literal["config"]


@dataclass
class LoopLMOutput:
    """What a looped model returns.

    logits: (B, S, V) — what the reference returns by default (exit-gate selection).
    loop_logits: per-loop logits, T x (B, S, V), when asked for.
    hidden_states: per-loop normed outputs h_t, T x (B, S, H), when asked for.
    exit_pdf: (B, S, T) exit probabilities over loops, in the model dtype.
    attn_outputs: attention sub-block outputs in (loop, layer) order, T*N x (B, S, H), when asked for.
    """

    logits: Tensor
    exit_pdf: Tensor
    loop_logits: list[Tensor] | None = None
    hidden_states: list[Tensor] | None = None
    attn_outputs: list[Tensor] | None = None


class OuroModel(nn.Module):
    """The ``model.`` part of the checkpoint: embeddings, layers, final norm, exit gate."""

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1, bias=True)


def attention_mask_for(
    key_valid: Tensor | None, start: int, num_queries: int, device: torch.device
) -> Tensor | CausalBias | None:
    """Boolean "may attend" mask (B or 1, 1, S, start + S) for queries at positions [start, start + S).

    Causal plus padding; every query may always see itself so that padding rows stay finite.
    None when plain causal attention (or, for one query, attending to everything) is exact. On CUDA,
    without padding, a chunk after earlier positions (MELT's prefill and training chunks) gets causal
    attention aligned to the last key (``causal_lower_right``): the same mask, which the fused
    attention kernels (flash, memory-efficient) run without materialising it; on a CPU it is
    materialised anyway (and measured no faster), so the boolean mask stays.
    """
    end = start + num_queries
    if key_valid is None and (start == 0 or num_queries == 1):
        return None
    if key_valid is None and device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right  # (imports torch._dynamo: not at start-up)

        return causal_lower_right(num_queries, end)
    q_pos = torch.arange(start, end, device=device)[:, None]
    k_pos = torch.arange(end, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, S, end)
    if key_valid is not None:
        mask = (mask & key_valid[:, None, None, :]) | (k_pos == q_pos)[None, None]
    return mask


def position_ids_for(
    key_valid: Tensor | None, start: int, batch_size: int, num_tokens: int, device: torch.device
) -> Tensor:
    """Position ids (B, S) of the new tokens: the count of real tokens before each one, so a
    left-padded row gets the same positions as the same prompt alone."""
    if key_valid is None:
        return torch.arange(start, start + num_tokens, device=device).expand(batch_size, -1)
    return (key_valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:]


def exit_pdf(gate_logits: list[Tensor]) -> Tensor:
    """Exit probabilities (B, S, T) from per-loop gate logits T x (B, S), in their dtype:
    p_t = lambda_t * prod_{j<t}(1 - lambda_j); the last loop takes what remains."""
    remaining = torch.ones_like(gate_logits[0])
    pdf = []
    for t, logit in enumerate(gate_logits):
        lam = torch.sigmoid(logit)
        if t < len(gate_logits) - 1:
            pdf.append(lam * remaining)
            remaining = remaining * (1.0 - lam)
        else:
            pdf.append(remaining)
    return torch.stack(pdf, dim=-1)


def exit_step(pdf: Tensor, threshold: float) -> Tensor:
    """(B, S) the first loop whose cumulative exit probability reaches ``threshold`` (none: the last)."""
    reached = torch.cumsum(pdf, dim=-1) >= threshold  # (B, S, T)
    return torch.where(reached.any(-1), reached.float().argmax(-1), pdf.shape[-1] - 1)


def hidden_at(hidden: list[Tensor], step: Tensor) -> Tensor:
    """(B, S, H): each token's hidden state at its loop ``step`` (B, S), one gather."""
    stacked = torch.stack(hidden, dim=2)  # (B, S, T, H)
    return torch.gather(stacked, 2, step[..., None, None].expand(-1, -1, 1, stacked.shape[-1])).squeeze(2)


class OuroForCausalLM(nn.Module):
    """Ouro LoopLM with HF tensor names (``model.*`` and ``lm_head``)."""

    def __init__(self, config: OuroConfig) -> None:
        super().__init__()
        self.config = config
        self.model = OuroModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def new_cache(
        self, batch_size: int, max_len: int, loops: int | None = None, kv_dtype: str | KVFormat | None = None
    ) -> KVCache:
        """A preallocated cache for incremental decoding (Ouro: a slot per (loop, layer)); ``kv_dtype``:
        ``auto`` (the model's), ``bf16``, ``fp16``, ``fp32``, ``int8``, ``int4``, or a ``KVFormat``."""
        return KVCache(self.config, batch_size, max_len, loops, dtype=self.dtype, device=self.device, kv_dtype=kv_dtype)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The KV-gate parameters (MELT's); Ouro has none."""
        return []

    def fuse_projections(self) -> None:
        """Fuse each layer's projections that read the same input (q/k/v: Ouro's keys and values
        come from the query input; the MLP's gate/up) for forwards with ``BlockInputs.fused``; the
        parameters become slices of the fused matrices (``layers.fused_weight``). Inference only."""
        for layer in self.model.layers:
            layer.fuse(queries=True)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        exit_at_step: int | None = None,
        exit_threshold: float | None | ConfigDefault = "config",
        weighted_exit: bool = False,
        return_loop_logits: bool = False,
        return_hidden_states: bool = False,
        return_attn_outputs: bool = False,
        num_logits_to_keep: int = 0,
        **body: Any,
    ) -> LoopLMOutput:
        """Run the looped stack over ``input_ids`` (B, S) and pick the returned logits.

        ``body`` goes to ``forward_hidden``: ``cache``, ``loops`` (default ``total_ut_steps``),
        and for MELT ``chunk_size``. ``attention_mask`` (B, S): 1 for real tokens, 0 for
        (left) padding; with a ``cache`` it covers the new tokens only.
        Returned logits, by priority: ``exit_at_step`` (0-based) > ``exit_threshold`` (default:
        the config's ``early_exit_threshold``; pass None to disable) > ``weighted_exit`` (the
        pdf-weighted mixture of per-loop logits) > the last loop. ``weighted_exit=True`` with the
        default threshold disables the threshold. ``num_logits_to_keep`` > 0 computes the exit
        gate and logits for the last positions only (prefill for generation).
        """
        hidden, taps = self.forward_hidden(input_ids, attention_mask, return_attn_outputs=return_attn_outputs, **body)
        return self.head(
            hidden,
            taps,
            exit_at_step=exit_at_step,
            exit_threshold=exit_threshold,
            weighted_exit=weighted_exit,
            return_loop_logits=return_loop_logits,
            return_hidden_states=return_hidden_states,
            num_logits_to_keep=num_logits_to_keep,
        )

    def forward_hidden(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        loops: int | None = None,
        return_attn_outputs: bool = False,
        checkpoint: Callable[..., Tensor] | None = None,
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """The per-loop normed hidden states T x (B, S, H) and, if asked, the attention taps
        (T*N x (B, S, H), (loop, layer) order) — no logits (training computes its own).
        ``checkpoint`` (``torch.utils.checkpoint.checkpoint`` or a partial of it): recompute each
        block's activations in the backward pass (activation checkpointing per (loop, layer));
        without a cache only, where a block is a pure function of its input."""
        loops = self.config.resolve_loops(loops)
        self.check_cache(cache, loops)
        S = input_ids.shape[1]
        if cache is None:
            key_valid = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
            inputs = self.block_inputs(input_ids, 0, key_valid, FullSequenceKV(), return_attn_outputs)
        else:
            if checkpoint is not None:
                raise InvalidArgumentError("activation checkpointing is for training forwards, without a KV cache")
            start, key_valid = cache.begin(S, attention_mask)
            kv = PerLoopKV(cache.store, cache.layout, start)
            inputs = self.block_inputs(input_ids, start, key_valid, kv, return_attn_outputs)
        return self.loop_stack(self.model.embed_tokens(input_ids), inputs, loops, checkpoint), inputs.attn_taps

    def check_cache(self, cache: KVCache | None, loops: int) -> None:
        if cache is not None and cache.layout != self.config.cache_layout():
            raise InvalidArgumentError(
                f"the cache has the {cache.layout.name} layout of another model; this one needs "
                f"{self.config.cache_layout().name} (model.new_cache)"
            )
        if cache is not None and cache.num_slots != sum(self.config.kv_slots_per_loop(loops)):
            raise InvalidArgumentError(
                f"the cache was built for {plural(cache.loops, 'loop')}, the forward asks for {loops}"
            )

    def block_inputs(
        self, input_ids: Tensor, start: int, key_valid: Tensor | None, kv: KVPolicy, collect_attn: bool
    ) -> BlockInputs:
        """RoPE tables, mask and KV policy for tokens at positions [start, start + S)."""
        B, S = input_ids.shape
        device = input_ids.device
        positions = position_ids_for(key_valid, start, B, S, device)
        return BlockInputs(
            rope=rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.dtype),
            mask=attention_mask_for(key_valid, start, S, device),
            kv=kv,
            attn_taps=[] if collect_attn else None,
        )

    def loop_stack(
        self, x: Tensor, inputs: BlockInputs, loops: int, checkpoint: Callable[..., Tensor] | None = None
    ) -> list[Tensor]:
        """The looped stack over embeddings x (B, S, H): the per-loop normed outputs h_t, T x (B, S, H).
        ``checkpoint``: run each block through it (activation checkpointing; stateless KV only)."""
        if checkpoint is not None and (not isinstance(inputs.kv, FullSequenceKV) or inputs.attn_taps is not None):
            raise InvalidArgumentError("per-block activation checkpointing needs a forward without KV rows or taps")
        hidden = []
        for loop in range(loops):
            inputs.loop = loop
            for i, layer in enumerate(self.model.layers):
                x = layer(x, i, inputs) if checkpoint is None else checkpoint(layer, x, i, inputs)
            x = self.model.norm(x)  # h_t: this loop's output and the next loop's input
            hidden.append(x)
        return hidden

    def head(
        self,
        hidden: list[Tensor],
        attn_taps: list[Tensor] | None = None,
        *,
        exit_at_step: int | None = None,
        exit_threshold: float | None | ConfigDefault = "config",
        weighted_exit: bool = False,
        return_loop_logits: bool = False,
        return_hidden_states: bool = False,
        num_logits_to_keep: int = 0,
    ) -> LoopLMOutput:
        """Exit gate, per-loop logits and the returned logits from the per-loop hidden states."""
        if num_logits_to_keep > 0:
            hidden = [h[:, -num_logits_to_keep:] for h in hidden]
        gate_logits = [self.model.early_exit_gate(h).squeeze(-1) for h in hidden]
        pdf = exit_pdf(gate_logits)  # (B, S, T)
        loop_logits = [self.lm_head(h) for h in hidden] if return_loop_logits else None
        if exit_threshold == "config":
            exit_threshold = None if weighted_exit else self.config.early_exit_threshold
        logits = self._select_logits(hidden, pdf, loop_logits, exit_at_step, exit_threshold, weighted_exit)
        return LoopLMOutput(
            logits=logits,
            exit_pdf=pdf,
            loop_logits=loop_logits,
            hidden_states=hidden if return_hidden_states else None,
            attn_outputs=attn_taps,
        )

    def _select_logits(
        self,
        hidden: list[Tensor],
        pdf: Tensor,
        loop_logits: list[Tensor] | None,
        exit_at_step: int | None,
        exit_threshold: float | None,
        weighted_exit: bool,
    ) -> Tensor:
        def logits_of(t: int) -> Tensor:
            return loop_logits[t] if loop_logits is not None else self.lm_head(hidden[t])

        if exit_at_step is not None:
            if not 0 <= exit_at_step < len(hidden):
                raise InvalidArgumentError(f"exit_at_step must be in [0, {len(hidden) - 1}], got {exit_at_step}")
            return logits_of(exit_at_step)
        if exit_threshold is not None:
            step = exit_step(pdf, exit_threshold)
            if bool((step == len(hidden) - 1).all()):  # the common case: no stacking
                return logits_of(len(hidden) - 1)
            return self.lm_head(hidden_at(hidden, step))
        if weighted_exit:
            return sum(pdf[..., t, None] * logits_of(t) for t in range(len(hidden)))
        return logits_of(len(hidden) - 1)

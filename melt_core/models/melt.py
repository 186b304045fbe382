"""MELT: the Ouro model with ONE KV row per token per layer, shared by all loops
(docs/melt-method.md: "The MELT layer", "Chunk-wise computation").

MELT reuses Ouro's weights and block code unchanged. What differs is the KV policy (``SharedKV``):
at every loop, layer l moves the token's latent state h with its update rule (``gate``:
``h = z * h_prev + (1 - z) * u``); keys and values come from h (queries still come from u) and
overwrite the token's single row. A sequence is processed chunk by chunk so that later chunks see
earlier tokens' final rows, exactly as at inference.

Two forwards share the chunk loop: ``forward_hidden`` (inference and scoring; with a cache the
rows go to its preallocated store) and ``forward_chunkwise`` (training: differentiable rows, the
phase-1 interpolation, detached history, activation checkpointing per chunk).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from itertools import accumulate
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..cache import KVCache
from ..cache.rows import GrowingRows, RowState, TokenLedger
from ..errors import InvalidArgumentError
from .adaptive import AdaptiveDepth, adaptive_loop_stack
from .chunks import ChunkAlign, RowShift, chunk_lengths
from .config import MeltConfig, OuroConfig
from .kv import InterpolatedKV, PerLoopKV, SharedKV
from .ouro import LoopLMOutput, OuroForCausalLM
from .update_rules import GATE_MODULE, UPDATE_RULES, UpdateRule, is_gate_parameter


class MeltForCausalLM(OuroForCausalLM):
    """Ouro weights + a per-layer KV gate (``model.layers.{i}.kv_gate.*``) + the shared cache."""

    config: MeltConfig

    def __init__(self, config: MeltConfig) -> None:
        super().__init__(config)
        for layer in self.model.layers:
            gate = UPDATE_RULES[config.melt.policy].make_gate(config.hidden_size)
            if gate is not None:
                layer.add_module(GATE_MODULE, gate)

    def update_rule(self) -> UpdateRule:
        return UPDATE_RULES[self.config.melt.policy](self.config.melt)

    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if is_gate_parameter(name)]

    def fuse_projections(self) -> None:
        """As Ouro's, but keys/values come from the latent state: k/v are fused, q stays apart."""
        for layer in self.model.layers:
            layer.fuse(queries=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> LoopLMOutput:
        """Ouro's forward (``OuroForCausalLM.forward``); with ``depth`` (adaptive depth, inference
        with a cache) the returned logits are each token's exit loop's, which the last loop's
        hidden state holds."""
        if kwargs.get("depth") is not None:
            if kwargs.get("exit_at_step") is not None or kwargs.get("weighted_exit"):
                raise InvalidArgumentError(
                    "adaptive depth picks each token's exit loop: no exit_at_step or weighted_exit"
                )
            kwargs["exit_threshold"] = None
        return super().forward(input_ids, attention_mask, **kwargs)

    def forward_hidden(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cache: KVCache | None = None,
        loops: int | None = None,
        chunk_size: int | Sequence[int] | None = None,
        depth: AdaptiveDepth | None = None,
        return_attn_outputs: bool = False,
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """The chunk-wise forward (docs/melt-method.md, "Chunk-wise computation") for inference and scoring.

        Chunks of ``chunk_size`` tokens (default: the config's; or a list of chunk lengths) run
        sequentially, all loops and layers per chunk; each chunk
        attends to the final rows of earlier chunks. With a ``cache`` the rows go to its store
        (prefill, decoding: a chunk of one token) and an int ``chunk_size`` is aligned to the end of
        the input (generation's alignment: every row of a left-padded batch falls into the chunks it
        gets alone); without one, see ``forward_chunkwise``.
        ``depth``: adaptive depth (``models.adaptive``), tokens leave the loop early; needs a cache
        whose layout leaves each token's final row where later tokens read it (``shared``).
        """
        if cache is None:
            if depth is not None:
                raise InvalidArgumentError("adaptive depth runs with a KV cache (model.new_cache): pass cache=")
            return self.forward_chunkwise(
                input_ids, attention_mask, loops=loops, chunk_size=chunk_size, return_attn_outputs=return_attn_outputs
            )
        if depth is not None and return_attn_outputs:
            raise InvalidArgumentError("adaptive depth skips loops: it has no per-loop attention outputs to return")
        if depth is not None and not cache.layout.final_rows_only:
            raise InvalidArgumentError(
                f"adaptive depth needs the shared cache layout: with {cache.layout.name}, a token that "
                "stops early would leave a later loop's slot unwritten"
            )
        loops = self.config.resolve_loops(loops)
        self.check_cache(cache, loops)
        rule = self.update_rule()
        parts = []
        for offset, size in self._chunks(input_ids.shape[1], chunk_size, "end"):
            ids, mask = _slice(input_ids, attention_mask, offset, size)
            start, key_valid = cache.begin(size, mask)
            kv = SharedKV(rule, cache.store, cache.layout, start)
            parts.append(self._run_chunk(ids, start, key_valid, kv, loops, return_attn_outputs, depth, mask))
        return _concat(parts)

    def forward_chunkwise(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        loops: int | None = None,
        chunk_size: int | Sequence[int] | None = None,
        alpha: float = 1.0,
        detach_history: bool = False,
        checkpoint_chunks: bool = False,
        return_attn_outputs: bool = False,
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """The differentiable chunk-wise forward of training (and of scoring without a cache).

        Rows are kept as tensors so gradients flow through earlier chunks' rows (``detach_history``
        cuts them); ``checkpoint_chunks`` recomputes each chunk's activations in the backward pass.
        ``alpha`` < 1 attends over ``alpha * KV_MELT + (1 - alpha) * KV_Ouro`` (phase 1).
        Chunks of an int ``chunk_size`` start at each row's first real token (``RowShift``), so a
        left-padded row is chunked, and scored, exactly as it is alone.
        """
        loops = self.config.resolve_loops(loops)
        shift = RowShift.needed(attention_mask, self.config.melt.chunk_size if chunk_size is None else chunk_size)
        if shift is not None:
            input_ids, attention_mask = shift.pack(input_ids), shift.mask
        if not 0.0 <= alpha <= 1.0:
            raise InvalidArgumentError(f"alpha must be in [0, 1], got {alpha}")
        config, B = self.config, input_ids.shape[0]
        rows = GrowingRows.empty(config.cache_layout().num_slots(loops), self.dtype)
        base_slots = OuroConfig.cache_layout(config).num_slots(loops)  # Ouro's own per-(loop, layer) rows
        base = GrowingRows.empty(base_slots, self.dtype) if alpha < 1.0 else None
        ledger = TokenLedger(B, input_ids.shape[1], input_ids.device)
        parts = []
        for offset, size in self._chunks(input_ids.shape[1], chunk_size):
            ids, mask = _slice(input_ids, attention_mask, offset, size)
            start, key_valid = ledger.begin(size, mask)
            step = partial(self._train_chunk, ids, start, key_valid, loops, alpha, return_attn_outputs)
            if checkpoint_chunks and torch.is_grad_enabled():
                hidden, taps, rows, base = checkpoint(step, rows, base, use_reentrant=False)
            else:
                hidden, taps, rows, base = step(rows, base)
            if detach_history:
                rows = rows.detached()
                base = None if base is None else base.detached()
            parts.append((hidden, taps))
        hidden, taps = _concat(parts)
        if shift is not None:
            hidden = [shift.unpack(h) for h in hidden]
            taps = None if taps is None else [shift.unpack(t) for t in taps]
        return hidden, taps

    def _chunks(
        self, length: int, chunk_size: int | Sequence[int] | None, align: ChunkAlign = "start"
    ) -> list[tuple[int, int]]:
        """(offset, size) of each chunk (``chunks.chunk_lengths``)."""
        sizes = chunk_lengths(length, self.config.melt.chunk_size if chunk_size is None else chunk_size, align)
        return list(zip(accumulate(sizes, initial=0), sizes, strict=False))

    def _run_chunk(
        self,
        ids: Tensor,
        start: int,
        key_valid: Tensor | None,
        kv: SharedKV | InterpolatedKV,
        loops: int,
        collect_attn: bool,
        depth: AdaptiveDepth | None = None,
        mask: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """One chunk through the looped stack; with ``depth``, tokens (real by ``mask``) exit early."""
        inputs = self.block_inputs(ids, start, key_valid, kv, collect_attn)
        x = self.model.embed_tokens(ids)
        if depth is None:
            return self.loop_stack(x, inputs, loops), inputs.attn_taps
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        return adaptive_loop_stack(self, x, inputs, kv, loops, depth, real), None

    def _train_chunk(
        self,
        ids: Tensor,
        start: int,
        key_valid: Tensor | None,
        loops: int,
        alpha: float,
        collect_attn: bool,
        rows: RowState,
        base: RowState | None,
    ) -> tuple:
        """One chunk with differentiable row stores; pure in its inputs, so it can be checkpointed."""
        store = GrowingRows(rows)
        kv = SharedKV(self.update_rule(), store, self.config.cache_layout(), start)
        base_store = GrowingRows(base) if base is not None else None
        if base_store is not None:
            kv = InterpolatedKV(kv, PerLoopKV(base_store, OuroConfig.cache_layout(self.config), start), alpha)
        hidden, taps = self._run_chunk(ids, start, key_valid, kv, loops, collect_attn)
        return hidden, taps, store.state(), (base_store.state() if base_store is not None else None)


def _slice(input_ids: Tensor, attention_mask: Tensor | None, offset: int, size: int) -> tuple[Tensor, Tensor | None]:
    mask = None if attention_mask is None else attention_mask[:, offset : offset + size]
    return input_ids[:, offset : offset + size], mask


def _concat(parts: list[tuple[list[Tensor], list[Tensor] | None]]) -> tuple[list[Tensor], list[Tensor] | None]:
    """Per-chunk (hidden, taps) -> whole-sequence hidden states T x (B, S, H) and taps (the
    per-chunk lists are emptied on the way)."""
    if len(parts) == 1:
        return parts[0]

    def joined(pieces: list[list[Tensor]]) -> list[Tensor]:
        # each chunk's piece is dropped once its whole-sequence tensor exists: the pieces and the
        # result are never both held in full (taps are T*N x (B, S, H))
        out = []
        for i in range(len(pieces[0])):
            out.append(torch.cat([p[i] for p in pieces], 1))
            for p in pieces:
                p[i] = None
        return out

    hidden = joined([h for h, _ in parts])
    taps = None if parts[0][1] is None else joined([tp for _, tp in parts])
    return hidden, taps

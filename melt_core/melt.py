"""MELT: the Ouro model with ONE KV row per token per layer, shared by all loops (MELT.md §2-3).

MELT reuses Ouro's weights and block code unchanged. What differs is the KV-update policy: at
every loop, layer l mixes its normalised attention input u with the token's latent state h_prev
through a gate, ``h = z * h_prev + (1 - z) * u``; keys and values come from h (queries still come
from u) and overwrite the token's single row. A sequence is processed chunk by chunk so that
later chunks see earlier tokens' final rows, exactly as at inference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import MeltConfig, MeltSettings
from .errors import InvalidArgumentError
from .kv_cache import GrowingRows, SharedKVCache, TokenLedger
from .layers import DecoderLayer
from .ouro import OuroForCausalLM


class KVGate(nn.Module):
    """``z = sigmoid(u @ W_z + h_prev @ U_z + b_z)``: element-wise (width H) or scalar (width 1)."""

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.input_proj = nn.Linear(hidden_size, width, bias=False)  # W_z, applied to u
        self.state_proj = nn.Linear(hidden_size, width, bias=False)  # U_z, applied to h_prev
        self.bias = nn.Parameter(torch.zeros(width))  # b_z

    def reset(self, z0: float) -> None:
        """W_z = U_z = 0, b_z = logit(z0): the untrained gate keeps a fraction z0 of h_prev."""
        with torch.no_grad():
            self.input_proj.weight.zero_()
            self.state_proj.weight.zero_()
            self.bias.fill_(math.log(z0 / (1.0 - z0)))

    def forward(self, u: Tensor, h_prev: Tensor) -> Tensor:
        return torch.sigmoid(self.input_proj(u) + self.state_proj(h_prev) + self.bias)


class MeltKV:
    """The KV policy of one chunk: updates each layer's latent state over loops and places the
    resulting rows in a row store (a ``SharedKVCache`` at inference, ``GrowingRows`` in training).

    With ``base_rows`` (phase 1 of training) attention uses ``alpha * KV_MELT + (1 - alpha) * KV_base``,
    KV_base being Ouro's own per-loop rows (k/v projections of u), kept per (loop, layer).
    """

    def __init__(self, settings: MeltSettings, num_layers: int, rows: SharedKVCache | GrowingRows,
                 base_rows: GrowingRows | None = None, alpha: float = 1.0) -> None:
        self.settings = settings
        self.num_layers = num_layers
        self.rows = rows
        self.base_rows = base_rows
        self.alpha = alpha
        self.latent: list[Tensor | None] = [None] * num_layers  # h of the chunk's tokens, per layer

    def update_latent(self, layer: DecoderLayer, layer_idx: int, loop: int, u: Tensor) -> Tensor:
        """h after this loop for layer ``layer_idx``: ``z * h_prev + (1 - z) * u`` with the policy's z."""
        policy = self.settings.policy
        if loop == 0:
            if self.settings.learned and self.settings.h0 == "zeros":
                h = (1.0 - layer.kv_gate(u, torch.zeros_like(u))) * u
            else:
                h = u  # loop 1 writes exactly Ouro's loop-1 row
        elif policy == "last":
            h = u
        else:
            h_prev = self.latent[layer_idx]
            if self.settings.learned:
                z = layer.kv_gate(u, h_prev)
            elif policy == "mean":
                z = loop / (loop + 1)  # running mean over loops 1..loop+1
            else:  # ema
                z = 1.0 - self.settings.ema_factor
            h = z * h_prev + (1.0 - z) * u
        self.latent[layer_idx] = h
        return h

    def keys_values(self, layer: DecoderLayer, layer_idx: int, loop: int, u: Tensor,
                    rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        h = self.update_latent(layer, layer_idx, loop, u)
        k, v = layer.self_attn.project_kv(h, rope)  # (B, kv_heads, C, d)
        keys, values = self.rows.rows(layer_idx, k, v)  # this token's row overwritten; all rows so far
        if self.base_rows is None:
            return keys, values
        k_base, v_base = layer.self_attn.project_kv(u, rope)
        base_keys, base_values = self.base_rows.rows(loop * self.num_layers + layer_idx, k_base, v_base)
        a = self.alpha
        return a * keys + (1.0 - a) * base_keys, a * values + (1.0 - a) * base_values


class MeltForCausalLM(OuroForCausalLM):
    """Ouro weights + a per-layer KV gate (``model.layers.{i}.kv_gate.*``) + the shared cache."""

    config: MeltConfig

    def __init__(self, config: MeltConfig) -> None:
        super().__init__(config)
        if config.melt.learned:
            width = config.hidden_size if config.melt.policy == "gate" else 1
            for layer in self.model.layers:
                layer.kv_gate = KVGate(config.hidden_size, width)

    def reset_gates(self) -> None:
        """Initialise every gate from ``config.melt.z0``."""
        for layer in self.model.layers:
            if hasattr(layer, "kv_gate"):
                layer.kv_gate.reset(self.config.melt.z0)

    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if ".kv_gate." in name]

    def new_cache(self, batch_size: int, max_len: int, loops: int | None = None) -> SharedKVCache:
        """A preallocated shared cache; its size does not depend on ``loops``."""
        return SharedKVCache(self.config, batch_size, max_len, dtype=self.dtype, device=self.device)

    def chunk_sizes(self, length: int, chunk_size: int | Sequence[int] | None) -> list[int]:
        if chunk_size is None:
            chunk_size = self.config.melt.chunk_size
        if isinstance(chunk_size, int):
            if chunk_size < 1:
                raise InvalidArgumentError(f"chunk size must be >= 1, got {chunk_size}")
            return [min(chunk_size, length - s) for s in range(0, length, chunk_size)]
        sizes = list(chunk_size)
        if sum(sizes) != length or any(c < 1 for c in sizes):
            raise InvalidArgumentError(f"chunk sizes {sizes} must be positive and sum to the length {length}")
        return sizes

    def forward_hidden(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cache: SharedKVCache | None = None,
        loops: int | None = None,
        chunk_size: int | Sequence[int] | None = None,
        alpha: float = 1.0,
        detach_history: bool = False,
        checkpoint_chunks: bool = False,
        return_attn_outputs: bool = False,
    ) -> tuple[list[Tensor], list[Tensor] | None]:
        """The chunk-wise forward (MELT.md §3), one code path for training, prefill and decoding.

        Chunks of ``chunk_size`` tokens (default: the config's; or a list of chunk lengths) run
        sequentially, all loops and layers per chunk; each chunk attends to the final rows of
        earlier chunks. With a ``cache`` (inference) rows go to the preallocated shared cache;
        without one (training, scoring) they are kept as tensors so gradients flow through earlier
        chunks' rows (``detach_history`` cuts them), and ``checkpoint_chunks`` recomputes each
        chunk's activations in the backward pass. ``alpha`` < 1 interpolates with Ouro's per-loop
        rows (phase 1 of training; no cache). ``forward`` adds the exit head, as for Ouro.
        """
        loops = self.resolve_loops(loops)
        if not 0.0 <= alpha <= 1.0:
            raise InvalidArgumentError(f"alpha must be in [0, 1], got {alpha}")
        B, S = input_ids.shape
        sizes = self.chunk_sizes(S, chunk_size)
        config = self.config
        if cache is not None:
            if alpha != 1.0:
                raise InvalidArgumentError("alpha < 1 (KV interpolation) is for training; run it without a cache")
            ledger: TokenLedger = cache
        else:
            ledger = TokenLedger(B, S, input_ids.device)
            empty = partial(GrowingRows.empty, batch_size=B, kv_heads=config.num_key_value_heads,
                            head_dim=config.head_dim, dtype=self.dtype, device=input_ids.device)
            rows = empty(config.num_hidden_layers)
            base = empty(loops * config.num_hidden_layers) if alpha < 1.0 else None

        hidden_parts, tap_parts = [], []
        offset = 0
        for size in sizes:
            ids = input_ids[:, offset:offset + size]
            mask = None if attention_mask is None else attention_mask[:, offset:offset + size]
            offset += size
            start, key_valid = ledger.begin(size, mask)
            if cache is not None:
                kv = MeltKV(config.melt, config.num_hidden_layers, cache)
                hidden, taps = self._run_chunk(ids, start, key_valid, kv, loops, return_attn_outputs)
            else:
                step = partial(self._train_chunk, ids, start, key_valid, loops, alpha, return_attn_outputs)
                if checkpoint_chunks and torch.is_grad_enabled():
                    hidden, taps, rows, base = checkpoint(step, rows, base, use_reentrant=False)
                else:
                    hidden, taps, rows, base = step(rows, base)
                if detach_history:
                    rows = tuple([t.detach() for t in r] for r in rows)
                    base = None if base is None else tuple([t.detach() for t in b] for b in base)
            hidden_parts.append(hidden)
            tap_parts.append(taps)

        if len(sizes) == 1:
            return hidden_parts[0], tap_parts[0]
        hidden = [torch.cat([part[t] for part in hidden_parts], 1) for t in range(loops)]
        taps = None
        if return_attn_outputs:
            taps = [torch.cat([part[i] for part in tap_parts], 1) for i in range(len(tap_parts[0]))]
        return hidden, taps

    def _run_chunk(self, ids: Tensor, start: int, key_valid: Tensor | None, kv: MeltKV, loops: int,
                   collect_attn: bool) -> tuple[list[Tensor], list[Tensor] | None]:
        inputs = self.block_inputs(ids, start, key_valid, kv, collect_attn)
        return self.loop_stack(self.model.embed_tokens(ids), inputs, loops), inputs.attn_taps

    def _train_chunk(self, ids: Tensor, start: int, key_valid: Tensor | None, loops: int, alpha: float,
                     collect_attn: bool, rows: tuple[list[Tensor], list[Tensor]],
                     base: tuple[list[Tensor], list[Tensor]] | None) -> tuple:
        """One chunk with differentiable row stores; pure in its inputs, so it can be checkpointed."""
        store = GrowingRows(*rows)
        base_store = GrowingRows(*base) if base is not None else None
        kv = MeltKV(self.config.melt, self.config.num_hidden_layers, store, base_store, alpha)
        hidden, taps = self._run_chunk(ids, start, key_valid, kv, loops, collect_attn)
        return hidden, taps, store.next_frozen(), (base_store.next_frozen() if base_store else None)

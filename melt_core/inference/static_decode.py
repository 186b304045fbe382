"""A decode step at fixed shapes: the same model code, no per-step shape logic, optionally compiled.

The ordinary decode step (``model(ids, cache=cache)``) rebuilds RoPE tables, positions and masks
from the ledger and slices the cache to the positions written so far, so every step has new
shapes. ``StaticDecoder`` runs the same blocks (``loop_stack``, the same KV policies) with
everything fixed for the cache's lifetime:

- RoPE: one table for positions [0, max_len), computed as ``rope_cos_sin`` computes it, gathered
  by each row's position (bit-identical values);
- keys: attention always covers the cache's ``max_len`` positions, masked by the ledger's validity
  (unwritten positions and padding are invalid), so the shapes never change;
- writes: rows go to the store at a position held in a tensor (``index_copy_``), not a Python int;
- the exit gate picks each token's loop by a gather, with no host sync.

With ``compile=True`` the step (embedding, loops, head) is ``torch.compile``d
(``mode="reduce-overhead"`` on CUDA: CUDA graphs); it compiles once per cache shape (batch x
positions), which torch's caches then reuse. Greedy tokens equal the ordinary step's;
logits agree to float rounding (attention over masked zeros runs another kernel).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InvalidArgumentError
from ..models import KVCache, is_melt
from ..models.kv import PerLoopKV, SharedKV
from ..models.layers import BlockInputs, rope_cos_sin
from ..models.ouro import exit_pdf, exit_step, hidden_at
from ..models.rows import PreallocatedRows


class StaticRows:
    """A ``PreallocatedRows`` written at ``position`` (a 1-element tensor); ``write`` returns every
    slot's ``max_len`` rows (the mask hides those not written yet)."""

    def __init__(self, rows: PreallocatedRows, position: Tensor) -> None:
        self.rows, self.position = rows, position

    def write(
        self, slot: int, start: int, k: Tensor, v: Tensor, rows: Tensor | None = None, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        keys, values = self.rows.keys[slot], self.rows.values[slot]
        keys.index_copy_(2, self.position, k.to(keys.dtype))
        values.index_copy_(2, self.position, v.to(values.dtype))
        dtype = self.rows.compute_dtype
        return keys.to(dtype), values.to(dtype)

    def nbytes(self) -> int:
        return self.rows.nbytes()


class StaticDecoder:
    """One-token steps for a batch through ``cache`` (float rows, already prefilled), at fixed shapes.

    ``exit_at_step`` / ``exit_threshold`` as in ``OuroForCausalLM.forward`` (``"config"``: the
    config's threshold).
    """

    def __init__(
        self,
        model: nn.Module,
        cache: KVCache,
        *,
        loops: int | None = None,
        exit_at_step: int | None = None,
        exit_threshold: float | None | str = "config",
        compile: bool = False,
    ) -> None:
        if not isinstance(cache.store, PreallocatedRows):
            raise InvalidArgumentError("the static decode step needs a float-row cache (not int8 / int4)")
        self.model, self.cache = model, cache
        self.loops = model.config.resolve_loops(loops)
        model.check_cache(cache, self.loops)
        self.exit_at_step = exit_at_step
        self.exit_threshold = model.config.early_exit_threshold if exit_threshold == "config" else exit_threshold
        device, L = model.device, cache.max_len
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.store = StaticRows(cache.store, self.index)
        positions = torch.arange(L, device=device)[None]
        cos, sin = rope_cos_sin(positions, model.config.head_dim, model.config.rope_theta, model.dtype)
        self.cos, self.sin = cos[0, 0], sin[0, 0]  # (max_len, d)
        self.mask = cache.ledger.valid[:, None, None, :]  # (B, 1, 1, max_len), a view: updated by begin()
        self.rule = model.update_rule() if is_melt(model) else None
        step = self._step
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" else None
            step = torch.compile(step, mode=mode, fullgraph=False, dynamic=False)
        self._compiled = step

    def __call__(self, ids: Tensor) -> Tensor:
        """Next-token logits (B, V) after feeding ``ids`` (B, 1)."""
        start, _ = self.cache.begin(1, None)
        self.index.fill_(start)
        real = self.cache.ledger.valid[:, : start + 1]
        positions = real.long().sum(-1) - 1  # real tokens before this one: the same as left-padded alone
        return self._compiled(ids, positions)

    def _step(self, ids: Tensor, positions: Tensor) -> Tensor:
        model = self.model
        rope = (self.cos[positions][:, None, None], self.sin[positions][:, None, None])  # (B, 1, 1, d)
        N = model.config.num_hidden_layers
        start = 0  # the static store writes at self.index
        kv: Any = (
            SharedKV(self.rule, self.store, N, start) if self.rule is not None else PerLoopKV(self.store, N, start)
        )
        inputs = BlockInputs(rope=rope, mask=self.mask, kv=kv)
        hidden = model.loop_stack(model.model.embed_tokens(ids), inputs, self.loops)
        return self._logits(hidden)[:, -1]

    def _logits(self, hidden: list[Tensor]) -> Tensor:
        """The exit gate's choice of loop per token without a host sync: one gather, one lm_head."""
        model = self.model
        if self.exit_at_step is not None:
            return model.lm_head(hidden[self.exit_at_step])
        if self.exit_threshold is None:
            return model.lm_head(hidden[-1])
        pdf = exit_pdf([model.model.early_exit_gate(h).squeeze(-1) for h in hidden])  # (B, 1, T)
        return model.lm_head(hidden_at(hidden, exit_step(pdf, self.exit_threshold)))

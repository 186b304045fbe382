"""Decode steps (and prefill chunks) at fixed shapes: the same model code, no per-step shape logic,
optionally compiled.

The ordinary decode step (``model(ids, cache=cache)``) rebuilds RoPE tables, positions and masks
from the ledger and slices the cache to the positions written so far, so every step has new
shapes. ``StaticDecoder`` runs the same blocks (``loop_stack``, the same KV policies) with
everything fixed for the cache's lifetime, for one token (a decode step) or a chunk of C tokens
(MELT's prefill chunks: every full chunk has the same shape):

- RoPE: one table for positions [0, max_len), computed as ``rope_cos_sin`` computes it, gathered
  by each row's position (bit-identical values);
- keys: attention always covers the cache's ``max_len`` positions, masked by the ledger's validity
  (unwritten positions and padding are invalid) and causally, so the shapes never change;
- writes: rows go to the store at positions held in a tensor (``index_copy_``), not Python ints;
- on CUDA, projections that read the same input run as one matrix product (``fuse_projections``:
  q/k/v for Ouro, k/v for MELT, gate/up), the weights stored once: fewer, larger kernels, which is
  what pays on a GPU; on CPU it gained nothing measurable (README, decode benchmark), so it is off
  there;
- the exit gate picks each token's loop by a gather, with no host sync.

With ``compile=True`` the step (embedding, loops, head) is ``torch.compile``d
(``mode="reduce-overhead"`` on CUDA: CUDA graphs; a C++ kernel wrapper on CPU); it compiles once
per shape (batch x tokens x positions), which torch's caches then reuse; ``compile_seconds`` is
the time of those first calls.
Greedy tokens equal the ordinary step's; logits agree to float rounding (attention over masked
zeros runs another kernel; the fused projections sum in another order).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InvalidArgumentError
from ..models import KVCache, is_melt
from ..models.kv import PerLoopKV, SharedKV
from ..models.layers import BlockInputs, rope_cos_sin
from ..models.ouro import exit_pdf, exit_step, hidden_at
from ..models.rows import PreallocatedRows
from ..runtime import synchronize


class StaticRows:
    """A ``PreallocatedRows`` written at ``positions`` (a tensor, one per new token); ``write``
    returns every slot's ``max_len`` rows (the mask hides those not written yet)."""

    def __init__(self, rows: PreallocatedRows, positions: Tensor) -> None:
        self.rows, self.positions = rows, positions

    def write(
        self, slot: int, start: int, k: Tensor, v: Tensor, rows: Tensor | None = None, keep: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        keys, values = self.rows.keys[slot], self.rows.values[slot]
        keys.index_copy_(2, self.positions, k.to(keys.dtype))
        values.index_copy_(2, self.positions, v.to(values.dtype))
        dtype = self.rows.compute_dtype
        return keys.to(dtype), values.to(dtype)

    def nbytes(self) -> int:
        return self.rows.nbytes()


class StaticDecoder:
    """Steps for a batch through ``cache`` (float rows) at fixed shapes: one token (decoding, after
    a prefill) or a chunk of tokens (prefill chunks of one size).

    ``exit_at_step`` / ``exit_threshold`` as in ``OuroForCausalLM.forward`` (``"config"``: the
    config's threshold). ``fuse``: fused projections (``fuse_projections``); None: on CUDA only.
    ``on_event(message)`` (with ``compile``): told when the first call of a shape starts compiling
    and how long it took (a cold compile is tens of seconds on a CPU).
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
        fuse: bool | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        if not isinstance(cache.store, PreallocatedRows):
            raise InvalidArgumentError("the static decode step needs a float-row cache (not int8 / int4)")
        self.model, self.cache = model, cache
        self.fused = model.device.type == "cuda" if fuse is None else fuse
        if self.fused:
            model.fuse_projections()
        self.loops = model.config.resolve_loops(loops)
        model.check_cache(cache, self.loops)
        self.exit_at_step = exit_at_step
        self.exit_threshold = model.config.early_exit_threshold if exit_threshold == "config" else exit_threshold
        device, L = model.device, cache.max_len
        self.key_positions = torch.arange(L, device=device)
        cos, sin = rope_cos_sin(self.key_positions[None], model.config.head_dim, model.config.rope_theta, model.dtype)
        self.cos, self.sin = cos[0, 0], sin[0, 0]  # (max_len, d)
        self.rule = model.update_rule() if is_melt(model) else None
        step = self._step
        if compile:
            # CUDA: CUDA graphs replay the step without launch overhead. CPU: a C++ wrapper calls the
            # kernels (a Python one adds interpreter overhead to every kernel call of every step)
            if device.type == "cuda":
                step = torch.compile(step, mode="reduce-overhead", dynamic=False)
            else:
                step = torch.compile(step, options={"cpp_wrapper": True}, dynamic=False)
        self._compiled = step
        self.compiling = compile
        self.compile_seconds = 0.0  # the first call of each shape: compilation (or a cache load)
        self._shapes: set[tuple[int, ...]] = set()
        self.on_event = on_event

    def __call__(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Last-position logits (B, V) after feeding ``ids`` (B, C) (``attention_mask``: their
        real tokens, as for ``model(ids, attention_mask, cache=cache)``)."""
        # a chunk sliced from a prompt has the prompt's row stride (kept by .contiguous() for one row)
        ids, C = ids.clone(memory_format=torch.contiguous_format), ids.shape[1]
        start, _ = self.cache.begin(C, attention_mask)
        index = torch.arange(start, start + C, device=ids.device)
        # real tokens before each one: the same positions as left-padded alone (``position_ids_for``)
        real_before = self.cache.ledger.valid[:, : start + C].long().cumsum(-1)
        positions = (real_before[:, start:] - 1).clamp(min=0)  # contiguous too
        # the compiled step is specialised to shapes and strides: every input is contiguous
        if not self.compiling or tuple(ids.shape) in self._shapes:
            return self._compiled(ids, positions, index)
        step = "the decode step" if C == 1 else f"the {C}-token prefill step"
        if self.on_event is not None:
            self.on_event(f"compiling {step} (batch {ids.shape[0]}, {self.cache.max_len:,} positions) ...")
        began = time.perf_counter()
        logits = self._compiled(ids, positions, index)
        synchronize(ids.device)
        seconds = time.perf_counter() - began
        self.compile_seconds += seconds
        self._shapes.add(tuple(ids.shape))
        if self.on_event is not None:
            self.on_event(f"compiled {step} in {seconds:.1f} s")
        return logits

    def _step(self, ids: Tensor, positions: Tensor, index: Tensor) -> Tensor:
        model = self.model
        rope = (self.cos[positions][:, None], self.sin[positions][:, None])  # (B, 1, C, d)
        keys, queries = self.key_positions[None], index[:, None]  # (1, max_len), (C, 1)
        valid = self.cache.ledger.valid[:, None, None, :]  # (B, 1, 1, max_len): real, written tokens
        mask = (valid & (keys <= queries)) | (keys == queries)  # causal; a padding query sees itself
        N, store = model.config.num_hidden_layers, StaticRows(self.cache.store, index)
        start = 0  # the static store writes at ``index``
        kv: Any = SharedKV(self.rule, store, N, start) if self.rule is not None else PerLoopKV(store, N, start)
        inputs = BlockInputs(rope=rope, mask=mask, kv=kv, fused=self.fused)
        hidden = model.loop_stack(model.model.embed_tokens(ids), inputs, self.loops)
        return self._logits([h[:, -1:] for h in hidden])[:, -1]

    def _logits(self, hidden: list[Tensor]) -> Tensor:
        """The exit gate's choice of loop per token without a host sync: one gather, one lm_head."""
        model = self.model
        if self.exit_at_step is not None:
            return model.lm_head(hidden[self.exit_at_step])
        if self.exit_threshold is None:
            return model.lm_head(hidden[-1])
        pdf = exit_pdf([model.model.early_exit_gate(h).squeeze(-1) for h in hidden])  # (B, 1, T)
        return model.lm_head(hidden_at(hidden, exit_step(pdf, self.exit_threshold)))

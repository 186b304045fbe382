"""Decode steps (and prefill chunks) at fixed shapes: the same model code, no per-step shape logic,
optionally compiled.

The ordinary decode step (``model(ids, cache=cache)``) rebuilds RoPE tables, positions and masks
from the ledger and slices the cache to the positions written so far, so every step has new
shapes. ``StaticDecoder`` runs the same blocks (``DecoderLayer``; the cache layout's slots, the
model's update rule, through its own KV policy ``SlotRows``) with everything fixed for the cache's
lifetime, for one token (a decode step) or a chunk of C tokens (MELT's prefill chunks: every full
chunk has the same shape):

- RoPE: one table for positions [0, max_len), computed as ``rope_cos_sin`` computes it, gathered
  by each row's position (bit-identical values);
- keys: attention covers the cache's first ``key_span`` positions (a power of two at least as
  long as what is written, at most the cache: the shape changes once per doubling, never per
  step), masked by the ledger's validity (unwritten positions and padding are invalid) and
  causally; the mask is built once per step and shared by every layer and loop;
- writes: rows go to the store at positions held in a tensor (``index_copy_``), not Python ints;
- on CUDA, projections that read the same input run as one matrix product (``fuse_projections``:
  q/k/v for Ouro, k/v for MELT, gate/up), the weights stored once: fewer, larger kernels, which is
  what pays on a GPU; on CPU it gained nothing measurable (README, decode benchmark), so it is off
  there;
- the exit gate picks each token's loop by a gather, with no host sync.

With ``compile=True`` one decoder block is ``torch.compile``d (``decoder_block``: regional
compilation) and every layer and loop calls that one compiled block, its weights and cache rows
being inputs: compile time does not grow with depth (layers x loops), and MELT's first loop runs
the same code as the others (``SlotRows``). The mask, RoPE rows and embedding are built once per
step, outside; the per-loop norm and the head run eagerly. On CUDA the block is compiled with
``mode="reduce-overhead"`` (CUDA graphs per block call; the cache rows are marked as static
addresses), or, with ``cuda_graph=True`` as well, without CUDA graphs of its own, the whole step
(every layer and loop of compiled blocks) then being captured as one CUDA graph; on a CPU
with options chosen for start-up (``CPU_COMPILE_OPTIONS``). It compiles once per shape (batch x
tokens x positions), which torch's caches then reuse; ``startup_seconds`` is the time of those
first calls.

With ``cuda_graph=True`` (CUDA) each shape's step is captured once as a CUDA graph (``CapturedStep``)
and replayed: the kernels of every layer and loop launch as one graph (with ``compile`` too: the
compiled block's fused kernels).
Greedy tokens equal the ordinary step's; logits agree to float rounding (attention over masked
zeros runs another kernel; the fused projections sum in another order; the compiled kernels
order some sums otherwise).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..cache import KVCache
from ..cache.rows import PreallocatedRows
from ..errors import InvalidArgumentError, MeltWarning
from ..models import is_melt
from ..models.layers import BlockInputs, rope_cos_sin
from ..models.ouro import exit_pdf, exit_step, hidden_at
from ..models.update_rules import GATE_MODULE, UpdateRule
from ..runtime import synchronize

# Inductor on a CPU, tuned for start-up (a cold compile is mostly the C++ compiler's time): the
# wrapper in C++, kernels and wrapper one compilation unit (a Python wrapper would add interpreter
# overhead to every kernel call, and compile each kernel apart); no precompiled header (building it
# costs more than it saves for one unit); and plain C++ loops instead of ATen's vector classes,
# which skips the instruction-set probes (a compile each) and the vector headers: a decode step's
# element-wise kernels are tiny, the matrix products and attention are library calls either way.
CPU_COMPILE_OPTIONS: dict[str, Any] = {
    "cpp_wrapper": True,
    "cpp_cache_precompile_headers": False,
    "cpp.vec_isa_ok": False,
}

COMPILED_SHAPES = 64  # compiled variants of the block kept per process (shapes x models)


class SlotRows:
    """The KV policy of one block call of the static step (``layers.KVPolicy``): the new rows go to
    the layer's slot, ``keys`` / ``values`` (B, kv_heads, span, d), at ``positions`` (C,), and
    the block attends over all ``span`` rows (the mask hides those not written yet).

    MELT (an update ``rule``): the rows are projected from the latent state h, which ``source``
    moves on from ``latent`` (the layer's h after the previous loop) and leaves in ``latent``. At
    the first loop (``first``, a 0-dim bool tensor) h is the rule's first state: both are computed
    and ``torch.where`` picks, so that the first loop runs the same code as the others (one
    compiled block; the first loop's ``next`` is wasted work, and exact: ``where`` copies). Nothing
    here reads the layer's index, and the loop only where the rule does (``mean``'s weight).
    """

    def __init__(
        self,
        keys: Tensor,
        values: Tensor,
        positions: Tensor,
        compute_dtype: torch.dtype,
        rule: UpdateRule | None = None,
        latent: Tensor | None = None,
        first: Tensor | None = None,
    ) -> None:
        self.keys, self.values, self.positions, self.compute_dtype = keys, values, positions, compute_dtype
        self.rule, self.latent, self.first = rule, latent, first

    def source(self, layer: nn.Module, layer_idx: int, loop: int, u: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        if self.rule is None:  # Ouro: keys and values of u itself
            return u
        gate = getattr(layer, GATE_MODULE, None)
        h = self.rule.next(loop, u, self.latent, gate)
        self.latent = torch.where(self.first, self.rule.first(u, gate), h)
        return self.latent

    def rows(self, layer_idx: int, loop: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.keys.index_copy_(2, self.positions, k.to(self.keys.dtype))
        self.values.index_copy_(2, self.positions, v.to(self.values.dtype))
        return self.keys.to(self.compute_dtype), self.values.to(self.compute_dtype)


def decoder_block(layer: nn.Module, layer_idx: int, x: Tensor, inputs: BlockInputs) -> tuple[Tensor, Tensor | None]:
    """One decoder block of the static step: (x after it, MELT's latent state h after it). The
    unit ``compile`` compiles, once for every layer and loop."""
    x = layer(x, layer_idx, inputs)
    return x, inputs.kv.latent


class StaticDecoder:
    """Steps for a batch through ``cache`` (float rows) at fixed shapes: one token (decoding, after
    a prefill) or a chunk of tokens (prefill chunks of one size).

    ``exit_at_step`` / ``exit_threshold`` as in ``OuroForCausalLM.forward`` (``"config"``: the
    config's threshold). ``fuse``: fused projections (``fuse_projections``); None: on CUDA only.
    ``compile``: the block compiled; ``cuda_graph``: each shape's step captured as a CUDA graph on
    its first call (``CapturedStep``) and replayed after. ``on_event(message)``: told when the first
    call of a shape starts compiling (about ten seconds cold on a CPU, whatever the depth) or
    capturing, and how long it took (``startup_seconds``: their sum).
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
        cuda_graph: bool = False,
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
        # the cache layout's slot of (loop, layer); each slot's rows as views made once (``_rows_of``)
        N = model.config.num_hidden_layers
        self.slots = [[cache.layout.slot(loop, i) for i in range(N)] for loop in range(self.loops)]
        self._rows: dict[int, list[tuple[Tensor, Tensor]]] = {}  # span -> each slot's first ``span`` rows
        self.first = [torch.tensor(loop == 0, device=device) for loop in range(2)]  # SlotRows.first
        self.block = decoder_block
        if cuda_graph and device.type != "cuda":
            raise InvalidArgumentError(f"CUDA graphs need a CUDA device; the model is on {device.type}")
        if compile:
            self.block = _compiled(decoder_block, device, captured=cuda_graph)
        self.compiling, self.cuda_graph = compile, cuda_graph
        self.startup_seconds = 0.0  # the first call of each shape: compilation (or a cache load), or capture
        self._shapes: set[tuple[int | bool, ...]] = set()
        self._graphs: dict[tuple[int | bool, ...], CapturedStep] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda_graph else None  # one memory pool for every shape
        self.on_event = on_event

    @torch.no_grad()
    def __call__(self, ids: Tensor, attention_mask: Tensor | None = None, *, per_loop: bool = False) -> Tensor:
        """Last-position logits (B, V) after feeding ``ids`` (B, C) (``attention_mask``: their
        real tokens, as for ``model(ids, attention_mask, cache=cache)``); ``per_loop``: every
        loop's, (T, B, V)."""
        # a chunk sliced from a prompt has the prompt's row stride (kept by .contiguous() for one row)
        ids, C = ids.clone(memory_format=torch.contiguous_format), ids.shape[1]
        start, _ = self.cache.begin(C, attention_mask)
        index = torch.arange(start, start + C, device=ids.device)
        # real tokens before each one: the same positions as left-padded alone (``position_ids_for``)
        real_before = self.cache.ledger.valid[:, : start + C].long().cumsum(-1)
        positions = (real_before[:, start:] - 1).clamp(min=0)  # contiguous too
        span = key_span(start + C, self.cache.max_len)
        shape = (*ids.shape, per_loop, span)
        if shape in self._graphs:
            return self._graphs[shape](ids, positions, index)
        step_fn = partial(self._step, span=span, per_loop=per_loop)
        # the compiled step is specialised to shapes and strides: every input is contiguous
        if not (self.compiling or self.cuda_graph) or shape in self._shapes:
            return step_fn(ids, positions, index)
        step = "the decode step" if C == 1 else f"the {C}-token prefill step"
        doing = " and ".join(w for w, on in (("compiling", self.compiling), ("capturing", self.cuda_graph)) if on)
        if self.on_event is not None:
            self.on_event(f"{doing} {step} (batch {ids.shape[0]}, {span:,} positions) ...")
        began = time.perf_counter()
        # every (shape, model) is an entry of the one compiled block: more than torch's default 8
        with torch._dynamo.config.patch(recompile_limit=COMPILED_SHAPES):
            logits = None
            if self.cuda_graph:
                try:
                    self._graphs[shape] = CapturedStep(step_fn, ids, positions, index, self._pool)
                    logits = self._graphs[shape].outputs.clone()
                except RuntimeError as e:  # the step runs on, uncaptured: slower, the same tokens
                    self.cuda_graph = False
                    warnings.warn(
                        f"capturing {step} as a CUDA graph failed ({str(e).splitlines()[0]}); "
                        "decoding on without CUDA graphs",
                        MeltWarning,
                        stacklevel=2,
                    )
            if logits is None:  # (the runs of a failed capture wrote the same rows this one writes)
                logits = step_fn(ids, positions, index)
        synchronize(ids.device)
        seconds = time.perf_counter() - began
        self.startup_seconds += seconds
        self._shapes.add(shape)
        if self.on_event is not None:
            done = " and ".join(w for w, on in (("compiled", self.compiling), ("captured", self.cuda_graph)) if on)
            self.on_event(f"{done} {step} in {seconds:.1f} s")
        return logits

    def _rows_of(self, span: int) -> list[tuple[Tensor, Tensor]]:
        """Each slot's rows [0, span), as views made once per span (a compiled block or a captured
        graph sees the same tensors at every step)."""
        if span not in self._rows:
            store = self.cache.store
            rows = [(store.keys[slot, :, :, :span], store.values[slot, :, :, :span]) for slot in range(store.num_slots)]
            if self.compiling and not self.cuda_graph and self.model.device.type == "cuda":
                for keys, values in rows:  # reduce-overhead's graphs may keep the rows' addresses
                    torch._dynamo.mark_static_address(keys)
                    torch._dynamo.mark_static_address(values)
            self._rows[span] = rows
        return self._rows[span]

    def _step(self, ids: Tensor, positions: Tensor, index: Tensor, span: int, per_loop: bool = False) -> Tensor:
        """Last-position logits (B, V) of ``ids`` (B, C) at ``positions`` (B, C), written at cache
        positions ``index`` (C,), attending over cache positions [0, span); ``per_loop``: every
        loop's, (T, B, V)."""
        model = self.model
        rows = self._rows_of(span)
        rope = (self.cos[positions][:, None], self.sin[positions][:, None])  # (B, 1, C, d)
        keys, queries = self.key_positions[None, :span], index[:, None]  # (1, span), (C, 1)
        valid = self.cache.ledger.valid[:, None, None, :span]  # (B, 1, 1, span): real, written tokens
        mask = (valid & (keys <= queries)) | (keys == queries)  # causal; a padding query sees itself
        dtype = self.cache.store.compute_dtype
        x = model.model.embed_tokens(ids)  # (B, C, H)
        # MELT's h per layer; before the first loop any finite tensor of its shape (not used), not
        # x itself (an input that aliases another would be another compiled block)
        latent: list[Tensor | None] = [None if self.rule is None else torch.zeros_like(x)] * len(model.model.layers)
        hidden = []
        if self.compiling and not self.cuda_graph and ids.device.type == "cuda":  # reduce-overhead's outputs are dead
            torch.compiler.cudagraph_mark_step_begin()
        for loop in range(self.loops):
            first = self.first[min(loop, 1)]
            for i, layer in enumerate(model.model.layers):
                kv = SlotRows(*rows[self.slots[loop][i]], index, dtype, self.rule, latent[i], first)
                inputs = BlockInputs(rope=rope, mask=mask, kv=kv, loop=loop, fused=self.fused)
                x, latent[i] = self.block(layer, i, x, inputs)
            x = model.model.norm(x)  # h_t: this loop's output and the next loop's input
            hidden.append(x[:, -1:])
        if per_loop:
            return model.lm_head(torch.stack(hidden))[:, :, -1]
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


MIN_KEY_SPAN = 256  # the shortest key span of a fixed-shape step


def key_span(end: int, max_len: int) -> int:
    """The cache positions a fixed-shape step attends over when its tokens end at ``end``: the next
    power of two (at least ``MIN_KEY_SPAN``), at most the cache's length. A step reads (and masks)
    fewer than twice the rows written, not the whole cache, at one shape per doubling."""
    span = MIN_KEY_SPAN
    while span < end:
        span *= 2
    return min(span, max_len)


class CapturedStep:
    """A fixed-shape step captured as one CUDA graph: static input buffers (``ids``, ``positions``,
    ``index``) copied into before each ``replay``, static ``outputs`` (the logits) cloned after.

    Capture does not run kernels, and the step writes the cache in place, so the first call runs the
    step eagerly (twice, on a side stream: kernels are chosen and workspaces allocated) and then
    captures it; every run writes the same rows at the same positions from the same inputs and the
    cache's earlier rows, so those runs leave the cache as one step does. The cache rows, the
    ledger's validity and the RoPE tables are the step's own tensors, whose addresses never change.
    """

    def __init__(
        self, step: Callable[[Tensor, Tensor, Tensor], Tensor], ids: Tensor, positions: Tensor, index: Tensor, pool: Any
    ) -> None:
        self.ids, self.positions, self.index = ids.clone(), positions.clone(), index.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(self.ids, self.positions, self.index)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = step(self.ids, self.positions, self.index)
        self.graph.replay()

    def __call__(self, ids: Tensor, positions: Tensor, index: Tensor) -> Tensor:
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.index.copy_(index)
        self.graph.replay()
        return self.outputs.clone()  # the next replay overwrites the buffer


def _compiled(block: Callable[..., Any], device: torch.device, captured: bool = False) -> Callable[..., Any]:
    """``block`` compiled for ``device``: one decoder block, whose code every layer and loop reuse
    (the weights and rows are its inputs). CUDA: CUDA graphs replay it without launch overhead.
    CPU: a C++ wrapper calls the kernels."""
    if device.type == "cuda":
        if captured:  # the step that calls it is captured whole: no CUDA graphs inside
            return torch.compile(block, dynamic=False, fullgraph=True)
        return torch.compile(block, mode="reduce-overhead", dynamic=False, fullgraph=True)
    return torch.compile(block, options=CPU_COMPILE_OPTIONS, dynamic=False, fullgraph=True)

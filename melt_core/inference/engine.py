"""The inference engine: every prefill and decode in melt runs through ``Engine``.

``melt generate`` (``inference.generate``), problem accuracy (``evaluation.problems``), the
transformers ``generate()`` integration (``integrations.hf``) and ``melt profile speed`` /
``memory --measure`` (``profiling.measure``) all make an ``Engine`` and call the same four methods:

- ``new_cache(batch, max_len)``: the model's cache in the options' row format (``melt_core.cache``);
- ``prefill(cache, ids, mask)``: the prompt, chunk by chunk (MELT: chunks aligned to the prompt's
  end, so that every row of a left-padded batch is chunked as it is alone);
- ``step(cache, ids)``: one decode step, a token per row;
- ``generate(cache, ids, mask, sampler, max_new_tokens)``: prefill, then sample and feed back one
  token per row per step — the one decode loop.

The options are typed (``EngineOptions``): the loop count, an exit policy (``ExitAtLoop``,
``ExitThreshold``, or MELT's ``AdaptiveDepth``), the prefill chunk size, the cache's row format, and
the decode path:

- ``eager``: the model's ordinary forward (every option; new shapes each step);
- ``static``: the fixed-shape step (``inference.static_decode``), decode steps and full prefill
  chunks, no per-step shape logic;
- ``graph``: that step captured once per shape as a CUDA graph and replayed (CUDA only): no launch
  overhead, no torch.compile;
- ``compiled``: that step with one decoder block ``torch.compile``d (regional compilation), on
  CUDA captured whole as a CUDA graph too;
- ``auto`` (the default): ``graph`` on CUDA, ``eager`` elsewhere, and ``eager`` wherever a
  fixed-shape step cannot run (int8 / int4 rows, adaptive depth).

``startup_seconds`` is the time the first calls of each fixed shape took (compilation or capture),
which callers report apart from prefill and decode time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from ..cache import KVCache, KVFormat, kv_format
from ..errors import InvalidArgumentError
from ..models import is_melt
from ..models.adaptive import AdaptiveDepth
from ..models.chunks import chunk_lengths
from ..models.config import validate_loops
from ..words import plural
from .sampling import Sampler
from .static_decode import StaticDecoder

DecodePath = Literal["auto", "eager", "static", "graph", "compiled"]
DECODE_PATHS: tuple[str, ...] = get_args(DecodePath)


@dataclass(frozen=True)
class ExitAtLoop:
    """Take loop ``loop``'s logits (0-based); every loop still runs and fills the cache."""

    loop: int

    def __post_init__(self) -> None:
        if self.loop < 0:
            raise InvalidArgumentError(f"exit-at-step is a 0-based loop index, got {self.loop}")


@dataclass(frozen=True)
class ExitThreshold:
    """Ouro's exit gate picks each token's loop: the first whose cumulative exit probability reaches
    ``threshold`` (``"config"``: the config's ``early_exit_threshold``; None: always the last loop).
    Every loop runs: in Ouro a later token's loop t reads every earlier token's loop-t row."""

    threshold: float | None | Literal["config"] = "config"

    def __post_init__(self) -> None:
        if isinstance(self.threshold, float | int) and not 0.0 <= self.threshold <= 1.0:
            raise InvalidArgumentError(f"exit-threshold must be in [0, 1], got {self.threshold}")


ExitPolicy = ExitAtLoop | ExitThreshold | AdaptiveDepth


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs a model.

    loops: the loop count (None: the model's ``total_ut_steps``).
    exit: which loop's logits a token gets (``ExitThreshold()``: the config's threshold), or MELT's
      ``AdaptiveDepth`` (tokens stop looping; their remaining loops are never computed).
    chunk_size: prefill chunk size (None: MELT's trained chunk size; Ouro's whole prompt).
    kv_dtype: the cache's row format (``cache.kv_format``: ``auto``, ``bf16``, ``int4`` ...).
    decode: the decode path (module docstring).
    fuse: on the fixed-shape paths, run projections that read the same input as one matrix product
      (``StaticDecoder``'s ``fuse``); None: on CUDA only.
    """

    loops: int | None = None
    exit: ExitPolicy = field(default_factory=ExitThreshold)
    chunk_size: int | None = None
    kv_dtype: str | KVFormat | None = None
    decode: DecodePath = "auto"
    fuse: bool | None = None

    def __post_init__(self) -> None:
        if self.loops is not None:
            validate_loops(self.loops)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise InvalidArgumentError(f"chunk size must be >= 1, got {self.chunk_size}")
        if self.decode not in DECODE_PATHS:
            raise InvalidArgumentError(f"unknown decode path {self.decode!r}; use one of {', '.join(DECODE_PATHS)}")
        fixed = self.decode in ("static", "graph", "compiled")
        if fixed and isinstance(self.exit, AdaptiveDepth):
            raise InvalidArgumentError(
                f"adaptive depth changes the work per row at every step: it runs on the eager path, not {self.decode}"
            )
        if fixed and kv_format(self.kv_dtype).quant is not None:
            raise InvalidArgumentError(f"the {self.decode} decode path reads float rows: it excludes int8 / int4 rows")

    @property
    def format(self) -> KVFormat:
        return kv_format(self.kv_dtype)


def check_exit(exit: ExitPolicy, loops: int) -> None:
    """Refuse a fixed exit loop that a run of ``loops`` loops does not have."""
    if isinstance(exit, ExitAtLoop) and exit.loop >= loops:
        raise InvalidArgumentError(
            f"exit-at-step must be in [0, {loops - 1}] with {plural(loops, 'loop')}, got {exit.loop}"
        )


def default_chunk_size(model: nn.Module) -> int | None:
    """Prefill chunk size when none is given: MELT's trained chunk size; Ouro: the whole prompt
    (Ouro is chunk-size invariant, so chunking it only bounds activation memory)."""
    return model.config.melt.chunk_size if is_melt(model) else None


class Engine:
    """Prefill and decode ``model`` as ``options`` say. ``on_event(message)``: told when a fixed
    shape starts compiling or capturing, and how long it took."""

    def __init__(
        self,
        model: nn.Module,
        options: EngineOptions | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.model, self.options, self.on_event = model, options or EngineOptions(), on_event
        self.loops = model.config.resolve_loops(self.options.loops)
        exit = self.options.exit
        check_exit(exit, self.loops)
        if isinstance(exit, AdaptiveDepth) and not is_melt(model):
            raise InvalidArgumentError(
                "adaptive depth skips loops, which needs MELT's shared cache: in Ouro a later token's loop t reads "
                "every earlier token's loop-t row, so every loop must run (use an exit threshold to pick logits)"
            )
        self.path = self._resolve_path()
        self.chunk_size = default_chunk_size(model) if self.options.chunk_size is None else self.options.chunk_size
        self._fixed: tuple[KVCache, StaticDecoder] | None = None  # the fixed-shape step of the latest cache
        self._startup_before = 0.0  # startup seconds of fixed steps of earlier caches

    def _resolve_path(self) -> str:
        path, device = self.options.decode, self.model.device
        if path == "auto":
            fixed_ok = not isinstance(self.options.exit, AdaptiveDepth) and self.options.format.quant is None
            return "graph" if device.type == "cuda" and fixed_ok else "eager"
        if path == "graph" and device.type != "cuda":
            raise InvalidArgumentError(f"CUDA graphs need a CUDA device; the model is on {device.type}")
        return path

    @property
    def startup_seconds(self) -> float:
        """Seconds the first calls of fixed shapes took (compilation or CUDA-graph capture), so far."""
        current = 0.0 if self._fixed is None else self._fixed[1].startup_seconds
        return self._startup_before + current

    # --- the cache --------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache for ``batch_size`` rows of up to ``max_len`` positions, in the options' row format."""
        return self.model.new_cache(batch_size, max_len, self.loops, kv_dtype=self.options.format)

    def _fixed_step(self, cache: KVCache) -> StaticDecoder | None:
        """The fixed-shape step over ``cache`` (None on the eager path); one per cache, made on first use."""
        if self.path == "eager":
            return None
        if self._fixed is None or self._fixed[0] is not cache:
            if self._fixed is not None:
                self._startup_before += self._fixed[1].startup_seconds
            exit = self.options.exit
            step = StaticDecoder(
                self.model,
                cache,
                loops=self.loops,
                exit_at_step=exit.loop if isinstance(exit, ExitAtLoop) else None,
                exit_threshold=exit.threshold if isinstance(exit, ExitThreshold) else "config",
                compile=self.path == "compiled",
                # on CUDA the compiled step is captured whole, one graph per shape
                cuda_graph=self.path == "graph" or (self.path == "compiled" and self.model.device.type == "cuda"),
                fuse=self.options.fuse,
                on_event=self.on_event,
            )
            self._fixed = (cache, step)
        return self._fixed[1]

    def _forward_kwargs(self) -> dict[str, object]:
        exit = self.options.exit
        if isinstance(exit, AdaptiveDepth):
            return {"depth": exit}
        if isinstance(exit, ExitAtLoop):
            return {"exit_at_step": exit.loop}
        return {"exit_threshold": exit.threshold}

    # --- prefill and decode -----------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        cache: KVCache,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        per_loop: bool = False,
        all_positions: bool = False,
    ) -> Tensor | list[Tensor]:
        """Feed the left-padded prompt batch ``input_ids`` (B, S) through ``cache``; return the last
        position's logits (B, V) — the exit policy's choice of loop — or with ``per_loop`` every
        loop's, T x (B, V); with ``all_positions`` every position's (B, S, V), eager only.

        Chunks (``chunk_size``) are aligned to the prompt's end; on the fixed-shape paths the full
        chunks of a longer prompt run as the fixed-shape step, the rest as ordinary forwards.
        """
        fixed = None if all_positions else self._fixed_step(cache)
        sizes = chunk_lengths(input_ids.shape[1], self.chunk_size, "end")
        outputs, start, last = [], 0, None
        for size in sizes:
            end = start + size
            ids = input_ids[:, start:end]
            mask = None if attention_mask is None else attention_mask[:, start:end]
            start = end
            # a prompt of one chunk runs as an ordinary forward: its shape would be compiled or
            # captured for that one call
            if fixed is not None and len(sizes) > 1 and size == self.chunk_size:
                last = fixed(ids, mask, per_loop=per_loop)
                continue
            out = self.model(
                ids,
                mask,
                cache=cache,
                loops=self.loops,
                num_logits_to_keep=0 if all_positions else 1,
                return_loop_logits=per_loop,
                **({"chunk_size": size} if is_melt(self.model) else {}),
                **self._forward_kwargs(),
            )
            last = None
            outputs.append(out)
        if last is not None:  # the last chunk ran as a fixed-shape step
            return list(last) if per_loop else last
        if all_positions:
            return torch.cat([o.logits for o in outputs], dim=1)
        if per_loop:
            return [loop_logits[:, -1] for loop_logits in outputs[-1].loop_logits]
        return outputs[-1].logits[:, -1]

    @torch.no_grad()
    def step(self, cache: KVCache, ids: Tensor, *, per_loop: bool = False) -> Tensor | list[Tensor]:
        """One decode step: ``ids`` (B, 1), one token per row; the logits as ``prefill`` returns them."""
        fixed = self._fixed_step(cache)
        if fixed is not None:
            logits = fixed(ids, per_loop=per_loop)
            return list(logits) if per_loop else logits
        out = self.model(ids, cache=cache, loops=self.loops, return_loop_logits=per_loop, **self._forward_kwargs())
        return [lg[:, -1] for lg in out.loop_logits] if per_loop else out.logits[:, -1]

    @torch.no_grad()
    def generate(
        self,
        cache: KVCache,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        sampler: Sampler,
        max_new_tokens: int,
    ) -> Iterator[Tensor]:
        """Prefill the left-padded prompt batch, then yield the next token of every row, (B,), once
        per step; each yielded token is fed back as a decode step before the next is yielded. Stop
        early by closing the generator (``break``); rows that are finished keep being fed their own
        tokens, which never affects the other rows."""
        logits = self.prefill(cache, input_ids, attention_mask)
        for i in range(max_new_tokens):
            next_ids = sampler(logits, input_ids)  # (B,)
            yield next_ids
            if i + 1 < max_new_tokens:
                logits = self.step(cache, next_ids[:, None])

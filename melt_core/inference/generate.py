"""Text generation from a checkpoint: prompts in, streamed text and statistics out (``melt generate``).

``generate_text`` works on a loaded model and tokenizer; ``run_generate`` loads them from
``GenerateArgs`` first. Text streams through an ``on_text(index, delta)`` callback as it is
decoded; the returned ``GenerationReport`` holds every prompt's result and the run's statistics
(prefill and decode tokens/s, exact KV-cache bytes in total and per loop, peak memory).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..cache.quantized import KVFormat, kv_format
from ..checkpoints import load_config, load_model, load_tokenizer
from ..checkpoints.io import read_weight_headers, stored_dtype
from ..data import read_jsonl_field, read_text_file
from ..dtypes import dtype_or_stored
from ..errors import InvalidArgumentError
from ..models import OuroConfig, is_melt
from ..models.adaptive import AdaptiveDepth, ExitStats
from ..models.config import validate_loops
from ..runtime import check_fits, peak_memory_so_far, reset_peak_memory, resolve_device
from ..words import plural
from .engine import (
    DECODE_PATHS,
    DecodePath,
    Engine,
    EngineOptions,
    ExitAtLoop,
    ExitPolicy,
    ExitThreshold,
    check_exit,
)
from .sampling import Sampler, SamplingSettings
from .text import TextStream, default_stop_token_ids, encode_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FIXED_LENGTH_STEP = 256  # a fixed-shape decode path rounds a batch's cache length up to a multiple of this


@dataclass
class GenerationSettings:
    """What to generate and how. ``loops`` None: the model's ``total_ut_steps``.

    stop: strings that end a row's generation; the text is cut before the first one.
    stop_token_ids: token ids that end a row (not part of the text); None: the model's EOS id(s)
      plus ``<|im_end|>`` when the tokenizer has it (Ouro's configs set EOS = 0 only;
      docs/ouro-format.md, "Tokenizer").
    chat: wrap each prompt in the tokenizer's chat template as one user turn.
    exit_at_step (0-based): take this loop's logits; all loops still run and fill the cache.
    exit_threshold (None: the config's) / exit_kl: for MELT, adaptive depth — a token stops looping
      once its cumulative exit probability reaches the threshold or its next-token distribution
      moves less than ``exit_kl`` nats between loops, and its remaining loops are skipped
      (``models.adaptive``). For Ouro the threshold only picks the loop whose logits choose the
      token; all loops run, because a later token's loop t reads every earlier token's loop-t row.
    chunk_size: prefill chunk size (None: MELT's trained chunk size; Ouro's whole prompt).
    batch_size: prompts decoded together (left-padded) in batch mode.
    decode: the decode path (``inference.engine``): ``auto`` (CUDA graphs on CUDA, eager elsewhere),
      ``eager``, ``static`` (the fixed-shape step), ``graph`` (it, captured as CUDA graphs) or
      ``compiled`` (its one decoder block ``torch.compile``d and reused by every layer and loop:
      compile time does not grow with depth). The same tokens on every path; the fixed-shape ones
      pay where per-step overhead, not memory bandwidth, bounds decoding, and each new shape is
      compiled or captured once first (README, "Benchmark: decode speed"). Their cache length is
      rounded up to a multiple of ``FIXED_LENGTH_STEP`` (one step for many prompt lengths);
      ``kv_cache_bytes`` counts those positions.
    """

    max_new_tokens: int = 256
    loops: int | None = None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    chat: bool = False
    exit_at_step: int | None = None
    exit_threshold: float | None = None
    exit_kl: float | None = None
    chunk_size: int | None = None
    batch_size: int = 8
    kv_dtype: str = "auto"  # cache rows: auto (the model's dtype), bf16, fp16, fp32, int8, int4
    kv_group_size: int | None = (
        None  # channels per scale for int8 / int4 (None: the largest even divisor of head_dim up to 32)
    )
    kv_residual: int = 0  # int8 / int4: the most recent positions kept in full precision
    decode: DecodePath = "auto"

    def __post_init__(self) -> None:
        self.kv_format()  # a bad name, group size or window fails now
        if self.max_new_tokens < 1:
            raise InvalidArgumentError(f"max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.loops is not None:
            validate_loops(self.loops)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise InvalidArgumentError(f"chunk size must be >= 1, got {self.chunk_size}")
        if self.batch_size < 1:
            raise InvalidArgumentError(f"batch size must be >= 1, got {self.batch_size}")
        if any(s == "" for s in self.stop):
            raise InvalidArgumentError("a stop string must not be empty")
        if self.exit_at_step is not None and self.exit_threshold is not None:
            raise InvalidArgumentError("exit-at-step and exit-threshold exclude each other: exit-at-step always wins")
        if self.exit_at_step is not None and self.exit_at_step < 0:
            raise InvalidArgumentError(f"exit-at-step is a 0-based loop index, got {self.exit_at_step}")
        if self.exit_threshold is not None and not 0.0 <= self.exit_threshold <= 1.0:
            raise InvalidArgumentError(f"exit-threshold must be in [0, 1], got {self.exit_threshold}")
        if self.exit_kl is not None:
            if self.exit_at_step is not None:
                raise InvalidArgumentError("exit-at-step and exit-kl exclude each other: exit-at-step always wins")
            AdaptiveDepth(kl=self.exit_kl)  # checks the value
        if self.decode not in DECODE_PATHS:
            raise InvalidArgumentError(f"unknown decode path {self.decode!r}; use one of {', '.join(DECODE_PATHS)}")
        if self.decode in ("static", "graph", "compiled") and self.kv_format().quant is not None:
            raise InvalidArgumentError(f"--decode {self.decode} reads float rows: it excludes --kv-dtype int8 / int4")

    def adaptive_depth(self, model: nn.Module) -> AdaptiveDepth | None:
        """MELT's adaptive depth when an exit criterion is given; None: every token runs every loop."""
        if not is_melt(model):
            if self.exit_kl is not None:
                raise InvalidArgumentError(
                    "exit-kl skips loops, which needs MELT's shared cache: in Ouro a later token's loop t reads "
                    "every earlier token's loop-t row, so every loop must run (use --exit-threshold to pick logits)"
                )
            return None
        if self.exit_threshold is None and self.exit_kl is None:
            return None
        return AdaptiveDepth(threshold=self.exit_threshold, kl=self.exit_kl)

    def kv_format(self) -> KVFormat:
        return kv_format(self.kv_dtype, self.kv_group_size, self.kv_residual)

    def exit_policy(self, depth: AdaptiveDepth | None = None) -> ExitPolicy:
        """The engine's exit policy: adaptive depth (MELT), a fixed loop, or the exit gate's threshold."""
        if depth is not None:
            return depth
        if self.exit_at_step is not None:
            return ExitAtLoop(self.exit_at_step)
        return ExitThreshold("config" if self.exit_threshold is None else self.exit_threshold)

    def engine_options(self, depth: AdaptiveDepth | None = None) -> EngineOptions:
        return EngineOptions(
            loops=self.loops,
            exit=self.exit_policy(depth),
            chunk_size=self.chunk_size,
            kv_dtype=self.kv_format(),
            decode=self.decode,
        )


@dataclass
class GenerationResult:
    """One prompt's output. ``finish_reason``: ``stop_token``, ``stop_string`` or ``length``.
    ``generated_tokens`` counts every token the model produced, a final stop token included."""

    index: int
    prompt: str
    text: str
    loops: int
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str
    token_ids: list[int]


@dataclass
class GenerationStats:
    """Numbers of one run (all batches).

    Throughput counts positions fed to the model: prefill = rows x padded prompt length per second
    of prefill; decode = rows x one-token steps per second of decoding. decode_path: the engine's
    (``eager``, ``static``, ``graph``, ``compiled``); on the last two the first call of each shape of
    the step compiles or captures it: its time is ``startup_seconds``, not prefill or decoding.
    kv_cache_bytes: exact K/V storage of the (largest) preallocated cache (prompt + max new tokens).
    kv_cache_bytes_per_loop: the storage each loop adds — Ouro: its own (loop, layer) slots, equal
      for every loop; MELT: loop 1 holds the one shared row per token and layer, later loops add 0.
    mean_loops / decode_mean_loops: loops per real token, over prefill and decode / over decode
      steps only (``loops`` unless MELT's adaptive depth is on); compute_saved: the fraction of
      (position, loop) pairs adaptive depth did not compute (0 without it).
    peak_memory_bytes / peak_memory_kind: the CUDA allocator's peak during generation
      (``cuda_allocator_peak``) or, on CPU, the process's peak RSS (``process_peak_rss``, model
      loading included).
    """

    model_type: str
    loops: int
    device: str
    dtype: str
    num_prompts: int
    batch_size: int
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    prefill_tokens_per_s: float
    decode_seconds: float
    decode_tokens_per_s: float
    decode_path: str
    startup_seconds: float
    kv_cache_bytes: int
    kv_cache_bytes_per_loop: list[int]
    kv_cache_positions: int
    kv_dtype: str
    mean_loops: float
    decode_mean_loops: float
    compute_saved: float
    peak_memory_bytes: int | None
    peak_memory_kind: str


@dataclass
class GenerationReport:
    results: list[GenerationResult]
    stats: GenerationStats

    def to_dict(self) -> dict[str, Any]:
        """One JSON object for a single prompt: its result (``text`` ...) and the statistics."""
        first = asdict(self.results[0])
        first.pop("index")
        return {**first, **asdict(self.stats)}


@torch.no_grad()
def generate_text(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: GenerationSettings | None = None,
    *,
    on_text: Callable[[int, str], None] | None = None,
    on_result: Callable[[GenerationResult], None] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> GenerationReport:
    """Generate a continuation of every prompt, ``settings.batch_size`` prompts at a time.

    Prompts of a batch are left-padded; the cache records which positions are padding, and MELT's
    prefill chunks are aligned to the end of the prompt, so that greedy results are identical to
    generating each prompt alone. ``on_text(index, delta)`` receives each prompt's text as it
    becomes final; ``on_result`` each finished prompt's result; ``on_event(message)`` what takes
    long between tokens (a fixed-shape step's compilation or CUDA-graph capture, started and done).
    """
    settings = settings or GenerationSettings()
    config = model.config
    depth = settings.adaptive_depth(model)
    engine = Engine(model, settings.engine_options(depth), on_event=on_event)  # checks the options
    loops = engine.loops
    if not prompts:
        raise InvalidArgumentError("no prompts to generate from")
    encoded = [encode_prompt(tokenizer, p, settings.chat) for p in prompts]
    limit = config.max_position_embeddings
    for i, ids in enumerate(encoded):
        if len(ids) >= limit:
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            raise InvalidArgumentError(
                f"{which} has {len(ids)} tokens; the model's maximum is {limit} "
                f"(max_position_embeddings), so there is no room to generate"
            )
    stop_ids = set(
        settings.stop_token_ids if settings.stop_token_ids is not None else default_stop_token_ids(model, tokenizer)
    )
    device = model.device
    sampler = Sampler(settings.sampling, device)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    decode_depth = ExitStats()  # adaptive depth's counters of decode steps only

    reset_peak_memory(device)
    results: list[GenerationResult] = []
    prefill_s = decode_s = startup_s = 0.0
    prefill_positions = decode_positions = 0
    kv_bytes, kv_per_loop, kv_positions = 0, [0] * loops, 0
    for first in range(0, len(prompts), settings.batch_size):
        rows = list(range(first, min(first + settings.batch_size, len(prompts))))
        B, S = len(rows), max(len(encoded[i]) for i in rows)
        budget = [min(settings.max_new_tokens, limit - len(encoded[i])) for i in rows]  # per row
        steps = max(budget)
        input_ids = torch.full((B, S), pad_id, dtype=torch.long)
        mask = torch.zeros(B, S, dtype=torch.long)
        for b, i in enumerate(rows):
            input_ids[b, S - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[b, S - len(encoded[i]) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        mask_arg = None if bool(mask.all()) else mask
        positions = S + steps
        if engine.path != "eager":  # a fixed-shape step is specialised to the cache length: few lengths
            positions = min(limit, -(-positions // FIXED_LENGTH_STEP) * FIXED_LENGTH_STEP)
        check_kv_fits(config, model.dtype, settings, loops, B, positions, device)
        cache = engine.new_cache(B, positions)
        if cache.nbytes() > kv_bytes:
            kv_bytes, kv_per_loop, kv_positions = cache.nbytes(), cache.nbytes_per_loop(), positions
        streams = [TextStream(tokenizer, settings.stop) for _ in rows]
        counts, reasons = [0] * B, [""] * B
        # the first call of each fixed shape compiles or captures it: timed apart, as startup_seconds
        started_so_far = engine.startup_seconds

        start = time.perf_counter()
        last = start
        yielded = 0
        with closing(engine.generate(cache, input_ids, mask_arg, sampler, steps)) as tokens:
            for next_ids in tokens:
                next_list = next_ids.tolist()  # waits for the device: the timings below are honest
                now = time.perf_counter()
                started = engine.startup_seconds - started_so_far
                started_so_far, startup_s = started_so_far + started, startup_s + started
                if yielded == 0:
                    prefill_s += now - start - started
                    prefill_positions += B * S
                    after_prefill = replace(depth.stats) if depth is not None else None
                elif started == 0.0:  # a step that compiled or was captured is not decoding time
                    decode_s += now - last
                    decode_positions += B
                last, yielded = now, yielded + 1
                for b, i in enumerate(rows):
                    if reasons[b]:
                        continue
                    counts[b] += 1
                    token = next_list[b]
                    if token in stop_ids:
                        reasons[b] = "stop_token"
                        continue
                    delta = streams[b].push(token)
                    if delta and on_text is not None:
                        on_text(i, delta)
                    if streams[b].stopped:
                        reasons[b] = "stop_string"
                    elif counts[b] >= budget[b]:
                        reasons[b] = "length"
                if all(reasons):
                    break
        if depth is not None:
            decode_depth = decode_depth.plus(depth.stats.minus(after_prefill))
        for b, i in enumerate(rows):
            tail = streams[b].finish()
            if tail and on_text is not None:
                on_text(i, tail)
            if streams[b].stopped:  # a stop string can also complete in the flushed tail
                reasons[b] = "stop_string"
            result = GenerationResult(
                index=i,
                prompt=prompts[i],
                text=streams[b].text,
                loops=loops,
                prompt_tokens=len(encoded[i]),
                generated_tokens=counts[b],
                finish_reason=reasons[b] or "length",
                token_ids=streams[b].ids,
            )
            results.append(result)
            if on_result is not None:
                on_result(result)
        del cache

    peak, kind = peak_memory_so_far(device)
    stats = GenerationStats(
        model_type=config.model_type,
        loops=loops,
        device=str(device),
        dtype=str(model.dtype).removeprefix("torch."),
        num_prompts=len(prompts),
        batch_size=min(settings.batch_size, len(prompts)),
        prompt_tokens=sum(len(e) for e in encoded),
        generated_tokens=sum(r.generated_tokens for r in results),
        prefill_seconds=prefill_s,
        prefill_tokens_per_s=prefill_positions / prefill_s if prefill_s else 0.0,
        decode_seconds=decode_s,
        decode_tokens_per_s=decode_positions / decode_s if decode_s else 0.0,
        decode_path=engine.path,
        startup_seconds=startup_s,
        kv_cache_bytes=kv_bytes,
        kv_cache_bytes_per_loop=kv_per_loop,
        kv_cache_positions=kv_positions,
        kv_dtype=settings.kv_dtype,
        mean_loops=float(loops) if depth is None else depth.stats.mean_loops,
        decode_mean_loops=float(loops) if depth is None else decode_depth.mean_loops,
        compute_saved=0.0 if depth is None else depth.stats.compute_saved,
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
    )
    return GenerationReport(results, stats)


def check_kv_fits(
    config: OuroConfig,
    dtype: torch.dtype,
    settings: GenerationSettings,
    loops: int,
    batch: int,
    positions: int,
    device: torch.device,
) -> None:
    """Refuse a KV cache the device cannot hold before it is allocated (sized by the config's exact
    formula), naming the options that size it; MELT's cache does not grow with the loops."""
    nbytes = sum(config.kv_cache_bytes_per_loop(dtype, loops, settings.kv_format(), positions, batch))
    flags = "--max-new-tokens or --batch-size" if is_melt(config) else "--loops, --max-new-tokens or --batch-size"
    what = f"the KV cache ({plural(loops, 'loop')}, {plural(batch, 'row')} of {positions:,} positions)"
    check_fits(nbytes, device, what, flags)


@dataclass
class GenerateArgs:
    """``melt generate``'s inputs. Exactly one prompt source: ``prompt``, ``prompt_file`` (a text
    file), ``prompts_file`` (JSON lines ``{"prompt": ...}``: batch mode) or ``stdin_text``."""

    checkpoint: Path
    prompt: str | None = None
    prompt_file: Path | None = None
    prompts_file: Path | None = None
    stdin_text: str | None = None
    device: str = "auto"
    dtype: str | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)

    @property
    def batch_mode(self) -> bool:
        return self.prompts_file is not None


def read_prompts_jsonl(path: str | Path) -> list[str]:
    """The ``prompt`` of every non-blank line of a JSON-lines file."""
    prompts = list(read_jsonl_field(path, "prompt"))
    if not prompts:
        raise InvalidArgumentError(f"{path} holds no prompts")
    return prompts


def collect_prompts(args: GenerateArgs) -> list[str]:
    """The prompts of ``args``, from its one prompt source."""
    given = [
        name
        for name, value in (
            ("--prompt", args.prompt),
            ("--prompt-file", args.prompt_file),
            ("--prompts-file", args.prompts_file),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise InvalidArgumentError(f"{' and '.join(given)} exclude each other: pass one prompt source")
    if args.prompts_file is not None:
        return read_prompts_jsonl(args.prompts_file)
    if args.prompt_file is not None:
        return [read_text_file(args.prompt_file, "prompt file")]
    if args.prompt is not None:
        return [args.prompt]
    if args.stdin_text is not None:
        return [args.stdin_text]
    raise InvalidArgumentError(
        "no prompt: pass --prompt TEXT, --prompt-file FILE, --prompts-file FILE.jsonl or pipe text on stdin"
    )


def run_generate(
    args: GenerateArgs,
    on_text: Callable[[int, str], None] | None = None,
    on_result: Callable[[GenerationResult], None] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> GenerationReport:
    """Load the checkpoint and tokenizer named by ``args`` and generate (see ``generate_text``).
    Options are checked before the weights are read."""
    prompts = collect_prompts(args)
    for i, prompt in enumerate(prompts):
        where = f"prompt {i} of {args.prompts_file}" if args.batch_mode else "the prompt"
        if not prompt.strip():
            raise InvalidArgumentError(f"{where} is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # bytes that were not UTF-8, kept as surrogates (a command-line argument)
            raise InvalidArgumentError(f"{where} is not UTF-8 text (character {e.start})") from None
    device = resolve_device(args.device)
    if args.settings.decode == "graph" and device.type != "cuda":
        raise InvalidArgumentError(f"--decode graph captures CUDA graphs: it needs a CUDA device, not {device.type}")
    config = load_config(args.checkpoint)
    loops = config.resolve_loops(args.settings.loops)
    check_exit(args.settings.exit_policy(), loops)
    # the smallest cache this run can need (one prompt token per row): refused before the weights are read
    dtype = dtype_or_stored(args.dtype, stored_dtype(read_weight_headers(args.checkpoint), config))
    steps = min(args.settings.max_new_tokens, config.max_position_embeddings - 1)
    check_kv_fits(config, dtype, args.settings, loops, min(args.settings.batch_size, len(prompts)), 1 + steps, device)
    tokenizer = load_tokenizer(args.checkpoint)
    model = load_model(args.checkpoint, dtype=args.dtype, device=device)
    return generate_text(
        model, tokenizer, prompts, args.settings, on_text=on_text, on_result=on_result, on_event=on_event
    )

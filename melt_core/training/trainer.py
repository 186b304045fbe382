"""The training loop shared by every melt training command, on accelerate.

accelerate does device placement, mixed precision and DDP; this module adds what melt's runs need
around it: a step-indexed data order (so the data position is the step), gradient accumulation up
to a token budget, warm-up + cosine/constant schedules, atomic checkpoints of tensors and JSON only
(``state.py``: nothing a run directory holds is unpickled), exact resume from the newest intact
checkpoint, a lock on the run directory, NaN/inf detection, Ctrl-C or SIGTERM -> resumable
checkpoint, metrics.jsonl, and periodic held-out evaluation. What is trained and how the loss is
computed is an ``Objective``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from ..checkpoints import save_checkpoint
from ..checkpoints.files import CONFIG_NAME
from ..data import PackedSequences
from ..dtypes import parse_dtype, upcast
from ..errors import InvalidArgumentError, MeltError, MissingDependencyError
from ..outputs import check_output, writing
from ..runtime import peak_memory_so_far, resolve_device
from . import state as files
from .flops import peak_flops_per_device
from .run_lock import LOCK_NAME, check_unlocked, run_lock
from .state import CHECKPOINTS, RUN_STATE, UnreadableCheckpoint

if TYPE_CHECKING:  # accelerate and transformers are imported when a run starts: they are slow to import
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker

RESUME_HINT = "pass --force to replace it or --resume to continue its run"
METRICS = "metrics.jsonl"
RUN_CONFIG = "run_config.json"
PathLike = str | os.PathLike
# Arguments that must not change when a run is resumed (``steps`` may grow: the run goes on longer).
RESUME_INVARIANTS = ("seq_len", "batch_tokens", "micro_batch", "seed", "schedule", "warmup_steps", "data_order")
DATA_ORDERS = ("shuffle", "file")


class TrainingDivergedError(MeltError):
    """The loss became NaN or infinite."""


class TrainingInterruptedError(MeltError):
    """The run was stopped by Ctrl-C (exit status 130) or SIGTERM (143); a resumable checkpoint was saved."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainingArgs:
    """Optimisation and bookkeeping settings of one run (CLI options map 1:1 onto these)."""

    out: Path
    steps: int
    seq_len: int = 2048
    batch_tokens: int | None = None  # tokens per optimizer step; default: one micro-batch per process
    micro_batch: int = 1  # sequences per forward per process
    lr: float = 8e-6  # base weights
    gate_lr: float = 5e-4  # MELT gates (ignored by objectives without gates)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: str = "cosine"  # or "constant"
    warmup_steps: int | None = None  # default: 5% of the steps
    clip: float = 1.0
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2  # checkpoints kept on disk
    eval_every: int = 0  # 0: only at the end (when eval data is given)
    eval_batches: int = 8
    seed: int = 0
    data_order: str = "shuffle"  # or "file": sequences in the data's own order (a curriculum)
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, none on CPU
    device: str = "auto"  # auto (the launcher's choice: CUDA when available), cpu, cuda or mps
    resume: Path | None = None
    force: bool = False
    save_dtype: str | None = None  # dtype of the final model; default: the trained model's source dtype
    log_every: int = 10  # steps between tracker logs (metrics.jsonl gets every step)
    log_with: list[str] | None = None  # accelerate trackers: tensorboard, wandb, trackio, ...
    fsdp: bool = False  # shard weights, gradients and optimizer states over the processes (accelerate's FSDP2)
    peak_tflops: float | None = None  # one device's peak TFLOP/s for the logged MFU (default: known CUDA GPUs)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        minimums = {
            "--steps": (self.steps, 1),
            "--seq-len": (self.seq_len, 2),
            "--micro-batch": (self.micro_batch, 1),
            "--log-every": (self.log_every, 1),
            "--save-every": (self.save_every, 0),
            "--keep-last": (self.keep_last, 0),
            "--eval-every": (self.eval_every, 0),
            "--eval-batches": (self.eval_batches, 1),
            "--warmup-steps": (0 if self.warmup_steps is None else self.warmup_steps, 0),
        }
        for flag, (value, least) in minimums.items():
            if value < least:
                raise InvalidArgumentError(f"{flag} must be >= {least}, got {value}")
        if self.data_order not in DATA_ORDERS:
            raise InvalidArgumentError(f"--data-order must be shuffle or file, got {self.data_order!r}")
        if self.schedule not in ("cosine", "constant"):
            raise InvalidArgumentError(f"--schedule must be cosine or constant, got {self.schedule!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise InvalidArgumentError(f"--mixed-precision: auto, no, bf16 or fp16, not {self.mixed_precision!r}")
        per_micro_batch = self.seq_len * self.micro_batch
        if self.batch_tokens is not None and (
            self.batch_tokens < per_micro_batch or self.batch_tokens % per_micro_batch
        ):
            raise InvalidArgumentError(
                f"--batch-tokens {self.batch_tokens} must be a multiple of seq_len x micro_batch "
                f"= {self.seq_len} x {self.micro_batch} (x the processes of a launch)"
            )
        for flag, value in {"--lr": self.lr, "--gate-lr": self.gate_lr, "--weight-decay": self.weight_decay}.items():
            if not (math.isfinite(value) and value >= 0):
                raise InvalidArgumentError(f"{flag} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            raise InvalidArgumentError(f"--clip must be a finite number >= 0 (0: no clipping), got {self.clip}")
        if not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):
            raise InvalidArgumentError(f"--betas must lie in [0, 1), got {self.betas}")
        if self.peak_tflops is not None and not (math.isfinite(self.peak_tflops) and self.peak_tflops > 0):
            raise InvalidArgumentError(f"--peak-tflops must be a finite number > 0, got {self.peak_tflops}")
        if not 0 <= self.seed < 2**32:  # numpy's generators take 32-bit seeds
            raise InvalidArgumentError(f"--seed must be in 0..{2**32 - 1}, got {self.seed}")
        for name in self.log_with or []:
            check_tracker(name)
        if self.save_dtype is not None:
            parse_dtype(self.save_dtype)  # a bad name fails now, not after the run
        if self.device != "auto":
            device = resolve_device(self.device)
            if device.index not in (None, 0):  # accelerate gives each process its own GPU
                raise InvalidArgumentError(
                    f"--device {self.device}: choose the GPU with CUDA_VISIBLE_DEVICES={device.index} and --device cuda"
                )

    @property
    def on_cuda(self) -> bool:
        """Whether the run trains on a CUDA GPU (where bf16 autocast and a bf16 teacher pay off): ``--device
        cuda``, or ``auto`` with a GPU that the launcher did not turn down (``accelerate launch --cpu``)."""
        if self.device == "auto":
            return torch.cuda.is_available() and not _env_flag("ACCELERATE_USE_CPU")
        return self.device.startswith("cuda")

    @property
    def use_cpu(self) -> bool:
        """Train on the CPU: ``--device cpu``, or ``auto`` in a launch of several processes on a machine
        without CUDA (``torchrun``, ``accelerate launch --multi_gpu``: gloo DDP rather than each
        process training alone). ``accelerate launch --cpu`` says so itself (ACCELERATE_USE_CPU)."""
        if self.device == "cpu":
            return True
        return self.device == "auto" and launched_processes() > 1 and not torch.cuda.is_available()

    @property
    def warmup(self) -> int:
        """Warm-up steps: ``warmup_steps``, or 5% of the steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return max(1, self.steps // 20) if self.steps > 1 else 0

    def to_json(self) -> dict[str, Any]:
        d = {**asdict(self), "warmup_steps": self.warmup}
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


class Objective(Protocol):
    """What a run trains and how. ``model`` is wrapped by accelerate (DDP/FSDP); ``loss`` and
    ``evaluate`` receive that wrapped module and must call it (not ``model``) in the forward.
    ``targets`` (B, S) bool marks the tokens to predict (None: every token; see ``PackedSequences``)."""

    model: nn.Module

    def param_groups(self, args: TrainingArgs) -> list[dict[str, Any]]: ...

    def prepare(self, accelerator: Accelerator) -> None: ...

    def loss(
        self, wrapped: nn.Module, input_ids: Tensor, step: int, targets: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]: ...

    def step_metrics(self, step: int) -> dict[str, float]: ...

    def describe(self) -> dict[str, Any]:
        """``{"name": ..., **settings}`` (JSON values): what the run trains; a resume must match it."""
        ...

    def evaluate(self, model: nn.Module, input_ids: Tensor, targets: Tensor | None = None) -> dict[str, float]: ...

    def save_model(self, model: nn.Module, out: Path, dtype: str | None) -> None: ...

    # Optional: ``fsdp_per_layer`` (default True), False when each decoder layer cannot be its own FSDP
    # unit (see DistillObjective).

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs of one training token (``flops.training_flops_per_token``); optional: without
        it the trainer logs no MFU."""
        ...


@dataclass
class TrainResult:
    out: Path
    steps: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)


def check_seq_len(seq_len: int, max_positions: int) -> None:
    """Training sequences must fit the model's positions (before any data is read)."""
    if seq_len > max_positions:
        raise InvalidArgumentError(
            f"--seq-len {seq_len} exceeds the model's maximum {max_positions} (max_position_embeddings)"
        )


def fit_to_rows(args: TrainingArgs, data: PackedSequences) -> TrainingArgs:
    """Problem rows are as long as the longest problem, which ``--seq-len`` only bounds: the run's
    sequence length (tokens per step, ``--batch-tokens``) is then theirs."""
    return args if data.seq_len == args.seq_len else dataclasses.replace(args, seq_len=data.seq_len)


def get_available_trackers() -> list[Any]:
    """accelerate's ``get_available_trackers()``: the trackers whose packages are installed."""
    from accelerate.tracking import get_available_trackers

    return get_available_trackers()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# The variables through which a launcher tells a process how many were started (torchrun/accelerate; MPI).
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_processes() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    for name in WORLD_SIZE_VARS:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 1


CPU_LAUNCH = (
    "accelerate launch --multi_gpu --num_processes N -m melt_cli ... --device cpu, or torchrun --nproc_per_node N "
    "-m melt_cli ... (see docs/distributed-training.md)"
)


FSDP_ALONE = (
    "FSDP shards the model over the processes of a launch, and this run has one: launch 2 or more "
    "(accelerate launch --num_processes N ... --fsdp, or torchrun --nproc_per_node N), or train without it "
    "(--no-fsdp: a resumed run reads --fsdp back from its run_config.json)"
)
FSDP_UNIT = "DecoderLayer"  # melt_core.models.layers.DecoderLayer: one FSDP unit per layer


def wants_fsdp(fsdp_option: bool) -> bool:
    """``--fsdp``, or an accelerate launch with an FSDP config (``accelerate launch --use_fsdp``)."""
    return fsdp_option or _env_flag("ACCELERATE_USE_FSDP")


def check_launch(args: TrainingArgs) -> None:
    """Refuse, before anything is loaded, a launch that cannot run as asked:

    - several processes asked for and one started: accelerate's single-process launcher, which it
      uses for ``--cpu`` (and for a machine without GPUs unless ``--multi_gpu`` is given), runs its
      script once whatever ``--num_processes N`` says (several CPU processes only under mpirun); it
      exports ACCELERATE_USE_CPU always and MASTER_ADDR only when N > 1, and a process of a real
      launch has its WORLD_SIZE (or an MPI size);
    - FSDP (``--fsdp`` or an accelerate FSDP config) in a launch of one process, or FSDP1."""
    one_of_many = "MASTER_ADDR" in os.environ and not any(name in os.environ for name in WORLD_SIZE_VARS)
    if "ACCELERATE_USE_CPU" in os.environ and one_of_many:
        raise InvalidArgumentError(
            "accelerate launch started ONE process for --num_processes N (with --cpu, or without --multi_gpu on a "
            "machine without GPUs, it runs the script once; more need mpirun); "
            f"launch N CPU processes with {CPU_LAUNCH}"
        )
    from_config = _env_flag("ACCELERATE_USE_FSDP")
    if from_config:
        version = os.environ.get("FSDP_VERSION", "2").strip()  # `accelerate launch --use_fsdp` sets it (1 by default)
        if version != "2":
            raise InvalidArgumentError(
                f"the accelerate launch asks for FSDP version {version}; melt trains with FSDP2: "
                "set fsdp_version: 2 in the config's fsdp_config (or launch with --fsdp_version 2)"
            )
    if wants_fsdp(args.fsdp) and launched_processes() < 2:
        raise InvalidArgumentError(FSDP_ALONE)


def fsdp_plugin(args: TrainingArgs, per_layer: bool = True) -> Any:
    """accelerate's FSDP2 plugin for ``--fsdp`` or an accelerate FSDP config (ACCELERATE_USE_FSDP, whose
    FSDP_* settings accelerate reads), or None. ``per_layer``: each decoder layer is its own FSDP unit
    (gathered before and freed after each of its loop passes) and the rest (embeddings, final norm,
    heads, the loss module) the root unit; else the whole model is one unit (gathered for the forward
    and backward; gradients and optimizer states stay sharded). FSDP1 is refused (``check_launch``):
    melt's checkpoints use FSDP2's state-dict helpers."""
    if not wants_fsdp(args.fsdp):
        return None
    from_config = _env_flag("ACCELERATE_USE_FSDP")
    from accelerate.utils import FullyShardedDataParallelPlugin

    if from_config:
        plugin = FullyShardedDataParallelPlugin()
        if plugin.transformer_cls_names_to_wrap is None:
            plugin.transformer_cls_names_to_wrap = [FSDP_UNIT]
    else:
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=[FSDP_UNIT],
            reshard_after_forward=True,
            state_dict_type="FULL_STATE_DICT",
        )
    if not per_layer:
        plugin.auto_wrap_policy = None
    return plugin


def _flops_per_token(objective: Objective, seq_len: int) -> float | None:
    """The objective's model FLOPs per training token (``flops.py``), if it counts them."""
    count = getattr(objective, "flops_per_token", None)
    return None if count is None else float(count(seq_len))


def check_tracker(name: str) -> None:
    """An accelerate tracker that is installed (the trackers are optional extras)."""
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType if t.value != "all"]
    if name not in known:
        raise InvalidArgumentError(f"--log-with {name!r}: choose from {', '.join(known)}")
    if name not in [str(t) for t in get_available_trackers()]:
        raise MissingDependencyError(f"--log-with {name} needs the {name} package: pip install 'melt[{name}]'")


def checkpoint_is_finite(ckpt: Path) -> bool:
    """Whether a training checkpoint's weights read completely and are all finite."""
    try:
        files.read_model_state(ckpt)
    except UnreadableCheckpoint:
        return False
    return True


def data_fingerprint(data: PackedSequences) -> dict[str, Any]:
    """What identifies a run's training data: the sequences' count and a hash of their tokens (and
    targets), so a resume on changed data is refused whatever the files are called."""
    h = hashlib.sha256(data.sequences.contiguous().numpy().tobytes())
    if data.targets is not None:
        h.update(data.targets.contiguous().numpy().tobytes())
    return {"sequences": len(data), "seq_len": data.seq_len, "sha256": h.hexdigest()}


def resume_candidates(path: Path) -> list[Path]:
    """The checkpoints ``--resume`` may continue from, oldest first: the one it names, or every
    checkpoint of the run directory it names."""
    if not path.exists():
        raise InvalidArgumentError(f"--resume {path} does not exist")
    if (path / RUN_STATE).is_file():
        return [path]
    candidates = files.checkpoints_of(path)
    if not candidates:
        raise InvalidArgumentError(f"{path} holds no training checkpoint to resume from")
    return candidates


def resume_checkpoint(args: TrainingArgs, objective: str) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint of ``args.resume`` with a readable run_state.json and that file, if it is
    a checkpoint of an ``objective`` run (cheap: run before any model is loaded; the weights are
    verified when they are loaded)."""
    reasons = []
    for ckpt in reversed(resume_candidates(Path(args.resume))):
        try:
            saved = files.read_run_state(ckpt)
        except UnreadableCheckpoint as e:
            reasons.append(str(e))
            continue
        name = saved.get("objective", {}).get("name", objective)
        if name != objective:
            raise InvalidArgumentError(f"{ckpt} is a checkpoint of a {name} run; it cannot resume {objective}")
        if args.steps < saved["step"]:
            raise InvalidArgumentError(f"{ckpt} is at step {saved['step']}; --steps {args.steps} is behind it")
        return ckpt, saved
    raise InvalidArgumentError(f"--resume {args.resume}: no checkpoint can be read: " + "; ".join(reasons))


def saved_run_config(resume: PathLike) -> dict[str, Any]:
    """``run_config.json`` of the run ``resume`` names (its run directory or one of its checkpoints)."""
    if not Path(resume).exists():
        raise InvalidArgumentError(f"--resume {resume} does not exist")
    run = resumed_run(Path(resume))
    file = run / RUN_CONFIG
    if not file.is_file():
        raise InvalidArgumentError(f"--resume {resume}: {run} is not a melt run directory (it has no {RUN_CONFIG})")
    try:
        config = files.read_json(file)
    except UnreadableCheckpoint as e:
        raise InvalidArgumentError(f"--resume {resume}: {e}; the run's settings are lost, start a new run") from None
    if not isinstance(config, dict):
        raise InvalidArgumentError(f"--resume {resume}: {file} is corrupt (not a JSON object)")
    return config


def resumed_run(resume: Path) -> Path:
    """The run directory ``--resume`` names, by itself or by one of its checkpoints."""
    return resume.parent.parent if (resume / RUN_STATE).is_file() else resume


def run_directory(out: Path | None, resume: Path | None) -> Path:
    """``--out``, or when only ``--resume`` is given, the run it continues. A resumed run goes on in
    its own directory: an ``--out`` naming another folder is refused (it would be written over)."""
    if resume is None:
        if out is None:
            raise InvalidArgumentError("--out is required (unless --resume names the run to continue)")
        return Path(out)
    run = resumed_run(Path(resume))
    if out is not None and Path(out).resolve() != run.resolve():
        raise InvalidArgumentError(
            f"--resume continues {run} in place; --out {out} names another folder: drop --out (or give --out {run})"
        )
    return run


def check_run_output(args: TrainingArgs, inputs: Sequence[PathLike | None]) -> None:
    """The run directory may be written: a fresh one like any output (empty, or ``--force``d and not
    holding an input); a resumed one is the run ``--resume`` names, a melt run, and holds no input
    either. Cheap: callers run it before loading anything, the trainer again before writing."""
    check_launch(args)
    if int(os.environ.get("RANK", "0")) != 0:  # in a launch, the main process checks and creates the run
        return
    out = Path(args.out)
    check_unlocked(out)
    if args.resume is None:
        check_output(out, args.force, keep=inputs, hint=RESUME_HINT)
        return
    run_directory(out, args.resume)
    if not (out / RUN_CONFIG).is_file():
        raise InvalidArgumentError(f"--resume {args.resume}: {out} is not a melt run (it has no {RUN_CONFIG})")
    check_output(out, True, keep=inputs)


def _schedule(optimizer: torch.optim.Optimizer, args: TrainingArgs):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if args.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    return get_constant_schedule_with_warmup(optimizer, args.warmup)


class _StopNow(BaseException):
    """A second Ctrl-C / SIGTERM: stop at once, without a checkpoint."""

    def __init__(self, signum: int) -> None:
        self.signum = signum


EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


@contextmanager
def stop_signals(on_event: Callable[[str], None]) -> Iterator[dict[str, int | None]]:
    """Turn the first Ctrl-C or SIGTERM into a request to stop after the current step (the trainer
    then saves a resumable checkpoint); a second one stops at once. Only the main thread can handle
    signals: elsewhere this does nothing and Ctrl-C raises KeyboardInterrupt as usual."""
    received: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        if received["signum"] is not None:
            raise _StopNow(signum)
        received["signum"] = signum
        on_event(f"{signal.Signals(signum).name} received: stopping after this step (again: stop now, unsaved)")

    previous = {s: signal.signal(s, handler) for s in EXIT_CODES}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _Run:
    """One training run: owns the accelerator, optimizer, schedule, files."""

    def __init__(
        self,
        objective: Objective,
        data: PackedSequences,
        args: TrainingArgs,
        eval_data: PackedSequences | None,
        on_step: Callable[[dict], None] | None,
        on_event: Callable[[str], None] | None,
        trackers: Sequence[GeneralTracker] = (),
        inputs: Sequence[PathLike | None] = (),
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        if args.data_order == "file":
            data = dataclasses.replace(data, ordered=True)
        self.objective, self.data, self.args, self.eval_data = objective, data, args, eval_data
        self.inputs = list(inputs)
        self.on_step = on_step or (lambda m: None)
        self.on_event = on_event or (lambda m: None)
        mp = args.mixed_precision
        if mp == "auto":
            mp = "bf16" if args.on_cuda else "no"
        log_with = [*(args.log_with or []), *trackers]
        check_launch(args)
        plugin = fsdp_plugin(args, per_layer=getattr(objective, "fsdp_per_layer", True))
        self.accelerator = Accelerator(
            mixed_precision=mp,
            cpu=args.use_cpu,
            log_with=log_with or None,
            project_dir=str(args.out / "logs"),
            fsdp_plugin=plugin,
        )
        acc = self.accelerator
        world = acc.num_processes
        launched = launched_processes()
        if launched != world:  # e.g. --multi_gpu with --device cuda on a machine without GPUs
            raise InvalidArgumentError(
                f"the launcher started {launched} processes but accelerate joined them into runs of {world} "
                f"({acc.distributed_type.value}): on CPUs launch with {CPU_LAUNCH}"
            )
        self.fsdp = plugin is not None
        if self.fsdp:
            self._apply_fsdp(plugin)
        per_micro = args.micro_batch * world
        global_seqs = (args.batch_tokens // args.seq_len) if args.batch_tokens else per_micro
        if global_seqs < per_micro or global_seqs % per_micro:
            raise InvalidArgumentError(
                f"--batch-tokens {args.batch_tokens} must be a multiple of seq_len x micro_batch x processes "
                f"= {args.seq_len} x {args.micro_batch} x {world}"
            )
        self.global_seqs = global_seqs
        # Accumulation is melt's own (no_sync on all but the last micro-batch), not accelerate's
        # micro-step counter: that counter is saved with a checkpoint, and one saved in the middle of
        # a step made every later optimizer step a silent no-op after --resume.
        self.accum = global_seqs // per_micro
        self.fingerprint = data_fingerprint(data)
        self.peak_flops = peak_flops_per_device(acc.device, acc.mixed_precision, args.peak_tflops)
        self.flops_per_token = _flops_per_token(objective, args.seq_len)
        self.on_event(
            f"{world} process{'es' if world > 1 else ''} ({'FSDP2' if self.fsdp else acc.distributed_type.value}) "
            f"on {acc.device}, mixed precision {acc.mixed_precision}"
        )
        set_seed(args.seed)

    def _apply_fsdp(self, plugin: Any) -> None:
        """FSDP2 needs a launch of several processes. accelerate turns a multi-GPU launch with an FSDP
        plugin into an FSDP one by itself but leaves a multi-CPU (gloo) launch as DDP, dropping the
        plugin; torch's FSDP2 runs on gloo, so melt sets the two fields of accelerate's state that
        accelerate sets for GPUs, and accelerate's own FSDP2 preparation does the rest."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        if acc.num_processes < 2:
            raise InvalidArgumentError(FSDP_ALONE)
        if acc.distributed_type == DistributedType.MULTI_CPU:
            if acc.mixed_precision != "no":
                plugin.set_mixed_precision(acc.mixed_precision)
            acc.state.distributed_type = DistributedType.FSDP
            acc.state.fsdp_plugin = plugin
        if not acc.is_fsdp2:
            raise InvalidArgumentError(
                f"FSDP cannot be applied to this {acc.distributed_type.value} launch; launch on CUDA GPUs or CPUs, "
                "or drop --fsdp"
            )

    # --- files -------------------------------------------------------------------------------
    def prepare_out(self) -> Path | None:
        """The main process checks the run directory, then creates it or, resuming, tidies what a
        killed run left half-written, and holds the run's lock from here on (``self.lock``); the other
        processes wait. Returns the checkpoint to resume."""
        args, out = self.args, self.args.out
        ckpt = self.check_resume_args() if args.resume is not None else None
        if self.accelerator.is_main_process:
            check_run_output(args, self.inputs)
            self.lock.enter_context(run_lock(out, self.on_event))
            if args.resume is None:  # --force: empty the folder (check_run_output spared the inputs)
                for old in out.iterdir():
                    if old.name != LOCK_NAME:
                        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
            else:
                for stale in [out / ".final.tmp", *(out / CHECKPOINTS).glob(".step-*.tmp")]:
                    shutil.rmtree(stale, ignore_errors=True)
            config = {
                **args.to_json(),
                "world_size": self.accelerator.num_processes,
                "objective": self.objective.describe(),
                "data": self.fingerprint,
            }
            with writing(out / RUN_CONFIG):
                (out / RUN_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        self.accelerator.wait_for_everyone()
        return ckpt

    def check_resume_args(self) -> Path:
        """The checkpoint ``--resume`` names, once its run is shown to be this one: the same objective,
        settings (``RESUME_INVARIANTS``) and data, and at least as many steps as it has done."""
        objective = self.objective.describe()
        ckpt, saved = resume_checkpoint(self.args, objective["name"])
        if self.args.warmup_steps is None:  # a longer run keeps the warm-up it started with
            self.args.warmup_steps = saved["args"].get("warmup_steps")
        ours = self.args.to_json()
        changed = [
            (k, saved["args"].get(k), ours.get(k)) for k in RESUME_INVARIANTS if saved["args"].get(k) != ours.get(k)
        ]
        changed += [(k, v, objective.get(k)) for k, v in saved.get("objective", {}).items() if objective.get(k) != v]
        if changed:
            diffs = ", ".join(f"{k}: {a} -> {b}" for k, a, b in changed)
            raise InvalidArgumentError(f"cannot resume {ckpt} with different settings ({diffs})")
        then = saved.get("data")
        if then is not None and then != self.fingerprint:
            now = self.fingerprint
            raise InvalidArgumentError(
                f"the training data is not the data {ckpt} was trained on ({now['sequences']} sequences of "
                f"{now['seq_len']} tokens now, {then.get('sequences')} of {then.get('seq_len')} then, other tokens); "
                "resume with the run's own --data, or start a new run"
            )
        return ckpt

    def log_metrics(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with writing(self.args.out / METRICS), open(self.args.out / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop records of steps after the checkpoint (they will be redone), and a torn
        line that a kill during an append leaves (with a note)."""
        file = self.args.out / METRICS
        if not (self.accelerator.is_main_process and file.is_file()):
            return
        keep, torn = [], 0
        for ln in file.read_text(errors="replace").splitlines():
            try:
                record = json.loads(ln)
            except json.JSONDecodeError:
                torn += bool(ln.strip())
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                keep.append(ln)
        if torn:
            self.on_event(f"dropped {torn} unreadable line(s) of {file} (a write cut short)")
        with writing(file):
            file.write_text("".join(ln + "\n" for ln in keep))

    def save(self, step: int) -> Path:
        """A checkpoint (model, optimizer, RNG of every process, run_state.json last), written into a
        temporary folder and renamed into place; a failed write leaves nothing behind."""
        acc = self.accelerator
        final = self.args.out / CHECKPOINTS / f"step-{step:06d}"
        tmp = final.parent / f".{final.name}.tmp"
        model_state, optimizer_state = self.full_state()
        try:
            with writing(tmp):
                if acc.is_main_process:
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                acc.wait_for_everyone()
                if acc.is_main_process:
                    files.save_model_state(model_state, tmp)
                    files.save_optimizer_state(optimizer_state, tmp)
                files.save_rng_state(tmp, acc.process_index)
                acc.wait_for_everyone()
                if acc.is_main_process:
                    run_state = {
                        "step": step,
                        "args": self.args.to_json(),
                        "objective": self.objective.describe(),
                        "data": self.fingerprint,
                        "scheduler": self.scheduler.state_dict(),
                    }
                    files.write_run_state(tmp, run_state)
                    if final.exists():
                        shutil.rmtree(final)
                    tmp.rename(final)
        except BaseException:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if acc.is_main_process and self.args.keep_last > 0:  # 0 keeps every checkpoint
            for old in files.checkpoints_of(self.args.out)[: -self.args.keep_last]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    # --- FSDP: checkpoints hold the full (unsharded) state, the same files as a DDP run's -----------
    def _parameter_names(self) -> list[str]:
        """The name of each of the optimizer's parameters, in its order (the index a saved
        optimizer state is keyed by)."""
        names = {id(p): n for n, p in self.accelerator.unwrap_model(self.wrapped).named_parameters()}
        return [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]

    def full_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The model's and the optimizer's state dicts as one process holds them without FSDP. Under
        FSDP every process takes part in gathering them (torch.distributed.checkpoint's state-dict
        helpers, to the main process's CPU memory); the optimizer's state is keyed by parameter index
        as ``optimizer.state_dict()`` keys it, so a checkpoint resumes with or without FSDP and with any
        number of processes."""
        if not self.fsdp:
            return self.accelerator.get_state_dict(self.wrapped), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # other processes get {}
        model = get_model_state_dict(self.wrapped, options=options)
        optimizer = get_optimizer_state_dict(self.wrapped, self.optimizer, options=options)
        if not self.accelerator.is_main_process:
            return {}, {}
        index = {name: i for i, name in enumerate(self._parameter_names())}
        optimizer = {
            "state": {index[name]: value for name, value in optimizer["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optimizer["param_groups"]],
        }
        return model, optimizer

    def _load_sharded(self, model: dict[str, Tensor], optimizer: dict[str, Any]) -> None:
        """Load a checkpoint's full state into the sharded model and optimizer (every process read
        the files: each keeps its own shards)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        names = self._parameter_names()
        by_name = {
            "state": {names[int(i)]: value for i, value in optimizer["state"].items()},
            "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optimizer["param_groups"]],
        }
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.wrapped, model, options=options)
        set_optimizer_state_dict(self.wrapped, self.optimizer, by_name, options=options)

    def gathered_model(self, everywhere: bool = False) -> nn.Module | None:
        """FSDP: an unsharded copy of the trained module, for the objective's own evaluation and saving
        code; on the main process only (in its CPU memory; None elsewhere), or ``everywhere`` (on each
        process's device). Every process takes part in gathering it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
        state = get_model_state_dict(self.wrapped, options=options)
        if not (everywhere or self.accelerator.is_main_process):
            return None
        self.skeleton.load_state_dict(state, assign=True)
        return self.skeleton

    def restore(self) -> int:
        """Load the newest intact checkpoint of ``--resume`` (the one whose settings were checked, or an
        older one) into the model, optimizer, schedule and generators; returns its step."""
        candidates = resume_candidates(Path(self.args.resume))  # newer ones are unreadable: skipped, noted
        try:
            state = files.load_newest_intact(candidates, self.accelerator.process_index)
        except UnreadableCheckpoint as e:
            raise InvalidArgumentError(f"--resume {self.args.resume}: no intact checkpoint ({e})") from None
        for skipped, reason in state.skipped:
            self.on_event(f"skipped {skipped.name}: {reason}")
        if self.fsdp:
            self._load_sharded(state.model, state.optimizer)
        else:
            self.accelerator.unwrap_model(self.wrapped).load_state_dict(state.model)
            self.optimizer.load_state_dict(state.optimizer)
        if "scheduler" in state.run_state:
            self.scheduler.load_state_dict(state.run_state["scheduler"])
        if state.rng is not None:
            files.restore_rng_state(state.rng)
        return state.step

    # --- the loop ------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[tuple[Tensor, Tensor | None]]:
        """This process's micro-batches of global batch ``step``: (input ids, targets or None)."""
        # (G, seq_len), identical on every process
        batch, targets = self.data.batch_with_targets(step, self.global_seqs)
        acc, mb = self.accelerator, self.args.micro_batch
        rank, world = acc.process_index, acc.num_processes
        rows = [slice((m * world + rank) * mb, (m * world + rank + 1) * mb) for m in range(self.accum)]
        return [(batch[r].to(acc.device), None if targets is None else targets[r].to(acc.device)) for r in rows]

    def evaluate(self, wrapped: nn.Module) -> dict[str, float]:
        """Held-out metrics; under FSDP of an unsharded copy of the model."""
        if not self.fsdp:
            return self._evaluate(self.accelerator.unwrap_model(wrapped))
        # every process evaluates the gathered model: a sharded teacher's forward is collective
        metrics = self._evaluate(self.gathered_model(everywhere=True))
        self.skeleton = meta_copy(self.skeleton)  # the gathered weights are freed until they are needed again
        return metrics

    def _evaluate(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        totals: dict[str, float] = {}
        data, device, mb = self.eval_data, self.accelerator.device, self.args.micro_batch
        n = min(self.args.eval_batches, -(-len(data) // mb))  # batches of micro_batch sequences
        with torch.no_grad(), self.accelerator.autocast():
            for i in range(n):
                rows = slice(i * mb, (i + 1) * mb)
                ids = data.sequences[rows].to(device)
                targets = None if data.targets is None else data.targets[rows].to(device)
                for k, v in self.objective.evaluate(model, ids, targets).items():
                    totals[k] = totals.get(k, 0.0) + v / n
        model.train(was_training)
        return totals

    def run(self) -> TrainResult:
        args, acc, objective = self.args, self.accelerator, self.objective
        with ExitStack() as self.lock:
            resume_from = self.prepare_out()
            if acc.log_with:
                config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in args.to_json().items()}
                acc.init_trackers(args.out.name, config={**config, "objective": objective.describe()["name"]})
            try:
                return self._train(resume_from)
            finally:
                acc.end_training()

    def _log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if self.accelerator.log_with:
            numbers = {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numbers, step=step)

    def _stop_requested(self, received: dict[str, int | None]) -> int | None:
        """The signal that asked this run to stop, agreed by every process (one stops, all stop)."""
        signum = received["signum"] or 0
        if self.accelerator.num_processes > 1:
            signum = int(self.accelerator.reduce(torch.tensor(signum, device=self.accelerator.device), "max"))
        return signum or None

    def _train(self, resume_from: Path | None) -> TrainResult:
        args, acc, objective = self.args, self.accelerator, self.objective
        groups = objective.param_groups(args)
        optimizer = torch.optim.AdamW(groups, betas=args.betas, weight_decay=args.weight_decay)
        self.scheduler = scheduler = _schedule(optimizer, args)
        objective.prepare(acc)
        if self.fsdp:  # the unsharded module to load gathered weights into
            self.skeleton = meta_copy(objective.model)
        self.wrapped, self.optimizer = wrapped, optimizer = acc.prepare(objective.model, optimizer)
        step = 0
        if resume_from is not None:
            step = self.restore()
            self.truncate_metrics(step)
            self.on_event(f"resumed from {resume_from.parent.parent} at step {step}")
        wrapped.train()
        last: dict[str, float] = {}
        eval_metrics: dict[str, float] = {}
        tokens_per_step = self.global_seqs * args.seq_len
        try:
            with stop_signals(self.on_event) as received:
                while step < args.steps:
                    t0 = time.perf_counter()
                    total, parts_sum = 0.0, {}
                    batches = self.micro_batches(step)
                    for m, (ids, targets) in enumerate(batches):
                        sync = m == len(batches) - 1  # gradients are all-reduced once, after the last micro-batch
                        with nullcontext() if sync else acc.no_sync(wrapped), acc.autocast():
                            loss, parts = objective.loss(wrapped, ids, step, targets)
                            acc.backward(loss / self.accum)
                        total += upcast(loss.detach()) / self.accum
                        for k, v in parts.items():
                            parts_sum[k] = parts_sum.get(k, 0.0) + v / self.accum
                    # the loss and its parts, averaged over the processes (one all-reduce)
                    numbers = [torch.as_tensor(total, dtype=torch.float64)]
                    numbers += [torch.as_tensor(v, dtype=torch.float64) for v in parts_sum.values()]
                    means = torch.stack(numbers)
                    if acc.num_processes > 1:
                        means = acc.reduce(means.to(acc.device), "mean")
                    means = means.tolist()
                    mean_loss, parts_sum = means[0], dict(zip(parts_sum, means[1:], strict=True))
                    if not math.isfinite(mean_loss):
                        optimizer.zero_grad()
                        raise TrainingDivergedError(
                            f"the loss is {mean_loss} at step {step + 1}; stopped before applying it. "
                            + self._last_good_hint()
                        )
                    # the total norm is non-finite as soon as any gradient element is (clip 0: measured, not clipped)
                    grad_norm = acc.clip_grad_norm_(wrapped.parameters(), args.clip if args.clip > 0 else math.inf)
                    if not torch.isfinite(grad_norm):
                        optimizer.zero_grad()
                        raise TrainingDivergedError(
                            f"the gradient norm is {float(grad_norm)} at step {step + 1} (loss {mean_loss:.4g}); "
                            "stopped before applying it. " + self._last_good_hint()
                        )
                    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                    step += 1
                    elapsed = time.perf_counter() - t0
                    last = {
                        "step": step,
                        "loss": mean_loss,
                        **parts_sum,
                        **objective.step_metrics(step - 1),
                        **{f"lr_{k}": v for k, v in lrs.items()},
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": tokens_per_step / elapsed,
                        **self.mfu(tokens_per_step / elapsed),
                        "peak_memory_bytes": peak_memory_so_far(acc.device)[0],  # CUDA allocator / process RSS
                    }
                    self.log_metrics(last)
                    if acc.is_main_process:
                        self.on_step(last)
                    at_end = step == args.steps
                    if step % args.log_every == 0 or at_end:
                        self._log(step, last)
                    if self.eval_data is not None and ((args.eval_every and step % args.eval_every == 0) or at_end):
                        eval_metrics = self.evaluate(wrapped)
                        self.log_metrics({"step": step, "eval": eval_metrics})
                        self._log(step, eval_metrics, prefix="eval/")
                        self.on_event("eval " + " ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
                    if (args.save_every and step % args.save_every == 0) or at_end:
                        self.save(step)
                    signum = self._stop_requested(received)
                    if signum is not None and not at_end:
                        raise self._interrupted(step, EXIT_CODES[signal.Signals(signum)], signal.Signals(signum).name)
        except KeyboardInterrupt:  # raised by code, or Ctrl-C where no signal handler could be installed
            optimizer.zero_grad()
            raise self._interrupted(step, 130, "interrupted") from None
        except _StopNow as stop:
            optimizer.zero_grad()
            raise TrainingInterruptedError(
                f"stopped at once by a second {signal.Signals(stop.signum).name} during step {step + 1}; not saved: "
                f"continue from the last checkpoint with --resume {args.out}",
                EXIT_CODES[signal.Signals(stop.signum)],
            ) from None
        acc.wait_for_everyone()
        final = self.gathered_model() if self.fsdp else acc.unwrap_model(wrapped)
        if acc.is_main_process:
            self.write_final_model(final)
        acc.wait_for_everyone()
        return TrainResult(args.out, step, last, eval_metrics)

    def mfu(self, tokens_per_s: float) -> dict[str, float]:
        """``{"mfu": model FLOPs per token x tokens/s / (peak FLOP/s x processes)}`` when both the
        FLOPs (the objective's count) and the peak (``--peak-tflops``, or a known CUDA GPU) are known."""
        if self.flops_per_token is None or self.peak_flops is None:
            return {}
        return {"mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * self.accelerator.num_processes)}

    def _interrupted(self, step: int, exit_code: int, why: str) -> TrainingInterruptedError:
        """Save the completed steps (if any) and say how to go on."""
        if step == 0:
            return TrainingInterruptedError(f"{why} before the first step; nothing to save", exit_code)
        ckpt = self.args.out / CHECKPOINTS / f"step-{step:06d}"
        if not (ckpt / RUN_STATE).is_file():  # not saved at this step yet
            ckpt = self.save(step)
        return TrainingInterruptedError(
            f"{why} after step {step}; saved {ckpt}; continue with --resume {self.args.out}", exit_code
        )

    def _last_good_hint(self) -> str:
        for ckpt in reversed(files.checkpoints_of(self.args.out)):
            if checkpoint_is_finite(ckpt):
                return f"The last good checkpoint is {ckpt}; resume from it with --resume {ckpt} (e.g. a lower LR)."
        return "No checkpoint with finite weights was saved yet."

    def write_final_model(self, model: nn.Module) -> None:
        """The trained model as a loadable checkpoint in the run directory itself. Files are moved
        in one by one, config.json last: its presence marks a complete model."""
        out = self.args.out
        tmp = out / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with writing(out):
                self.objective.save_model(model, tmp, self.args.save_dtype)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (out / CONFIG_NAME).unlink(missing_ok=True)
        for old in out.glob("model*.safetensors*"):
            old.unlink()
        names = sorted(p.name for p in tmp.iterdir())
        for name in [n for n in names if n != CONFIG_NAME] + [CONFIG_NAME]:
            os.replace(tmp / name, out / name)
        tmp.rmdir()


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are on the meta device (they take no memory; fill them
    with ``load_state_dict(..., assign=True)``); buffers and everything else are copied."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in module.parameters()
    }
    return copy.deepcopy(module, memo)


def train(
    objective: Objective,
    data: PackedSequences,
    args: TrainingArgs,
    *,
    eval_data: PackedSequences | None = None,
    on_step: Callable[[dict], None] | None = None,
    on_event: Callable[[str], None] | None = None,
    trackers: Sequence[GeneralTracker] = (),
    inputs: Sequence[PathLike | None] = (),
) -> TrainResult:
    """Run ``objective`` for ``args.steps`` optimizer steps; returns the final metrics. ``trackers``:
    accelerate tracker objects, next to the ones ``args.log_with`` names. ``inputs``: the files and
    folders the run reads (checkpoints, data), which its directory must not hold or sit in."""
    return _Run(objective, data, args, eval_data, on_step, on_event, trackers, inputs).run()


def save_model_as(model: nn.Module, out: Path, tokenizer_from: str | os.PathLike, dtype: str | None) -> None:
    """Save ``model`` (cast to ``dtype`` if given) with the tokenizer files of ``tokenizer_from``."""
    save_checkpoint(model, out, tokenizer=tokenizer_from, dtype=dtype, force=True)

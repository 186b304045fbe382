"""The two post-training phases of MELT from its Ouro teacher (docs/melt-method.md, "The two training phases").

Phase 1 (interpolated transition): the student attends over ``alpha * KV_MELT + (1 - alpha) * KV_Ouro``
with alpha rising linearly from 0 to 1 over the phase; loss = mean over loops of
KL(teacher || student) on per-loop logits (+ an optional CE term).
Phase 2 (attention-aligned distillation), alpha = 1: loss = KD + beta * mean over (layer, loop) of
the MSE between the student's and the stop-gradient teacher's attention sub-block outputs.
The teacher runs its exact parallel forward once per batch under no_grad; the student runs the
chunk-wise forward.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..checkpoints import load_config, load_model, load_tokenizer
from ..data import training_sequences
from ..errors import InvalidArgumentError, UnsupportedModelError
from ..evaluation.heldout import finish, score_batch
from ..models import MeltConfig, MeltForCausalLM, OuroConfig, OuroForCausalLM, is_melt, is_ouro
from ..models.update_rules import is_gate_parameter
from .flops import kv_gate_width, training_flops_per_token
from .losses import attention_alignment, kl_divergence, next_token_cross_entropy, predicting
from .trainer import (
    TrainingArgs,
    TrainResult,
    check_run_output,
    check_seq_len,
    fit_to_rows,
    resume_checkpoint,
    save_model_as,
    train,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

# `--preset`: `quick` (the default) finishes in minutes on a CPU for the built-in models (one
# micro-batch of 512 tokens per step); `paper` is the MELT paper's run (sequences of 10,000 tokens,
# 320,000 per step, 500 + 300 steps; chunks of 500 come from the converted model).
DISTILL_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"steps": {1: 100, 2: 60}, "seq_len": 512, "batch_tokens": None},
    # 10,000-token sequences fit only with chunk checkpointing (`melt profile training`);
    # `checkpoint_chunks` is a distillation setting, applied by the command
    "paper": {"steps": {1: 500, 2: 300}, "seq_len": 10000, "batch_tokens": 320000, "checkpoint_chunks": True},
}
DEFAULT_STEPS = DISTILL_PRESETS["quick"]["steps"]  # optimizer steps of each phase when none are given

# Fields that must agree between teacher and student for per-loop, per-layer distillation.
COMPATIBLE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "total_ut_steps",
)


@dataclass
class DistillSettings:
    """What differs between the phases (optimisation settings are ``TrainingArgs``)."""

    phase: int  # 1 (transition) or 2 (attention-aligned distillation)
    beta: float = 0.1  # phase 2: weight of the attention alignment
    ce_weight: float = 0.0  # weight of the next-token CE term (mean over loops)
    kd_loops: str = "all"  # "all" loops or the "final" loop only
    chunk_size: int | None = None  # student chunk size; default: the model's
    detach_history: bool = False
    checkpoint_chunks: bool = False
    freeze_base: bool = False  # train only the gates
    shard_teacher: bool = False  # FSDP runs: shard the frozen teacher too (gathered for each of its forwards)

    def __post_init__(self) -> None:
        if self.phase not in (1, 2):
            raise InvalidArgumentError(f"phase must be 1 or 2, got {self.phase}")
        if self.kd_loops not in ("all", "final"):
            raise InvalidArgumentError(f"--kd-loops must be all or final, got {self.kd_loops!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise InvalidArgumentError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if self.beta < 0 or self.ce_weight < 0:
            raise InvalidArgumentError("--beta and --ce-weight must be >= 0")


def not_a_student(path: str | os.PathLike, model_type: str) -> str:
    kind = "an Ouro" if model_type == "ouro" else f"a {model_type!r}"
    return f"{path} is {kind} checkpoint; the student must be MELT: convert it first (melt convert {path} MELT_DIR)"


def objective_name(settings: DistillSettings) -> str:
    return f"distill phase {settings.phase}"


def check_pair(student_path: str | os.PathLike, teacher_path: str | os.PathLike) -> tuple[MeltConfig, OuroConfig]:
    """The student must be MELT, the teacher Ouro, with the same shapes and loop count."""
    student, teacher = load_config(student_path), load_config(teacher_path)
    if not is_melt(student):
        raise UnsupportedModelError(not_a_student(student_path, student.model_type))
    if not is_ouro(teacher):
        raise UnsupportedModelError(f"{teacher_path} is a {teacher.model_type!r} checkpoint; the teacher must be Ouro")
    diffs = [
        f"{k}: student {getattr(student, k)} vs teacher {getattr(teacher, k)}"
        for k in COMPATIBLE_FIELDS
        if getattr(student, k) != getattr(teacher, k)
    ]
    if diffs:
        raise InvalidArgumentError(f"teacher {teacher_path} does not match student {student_path}: " + "; ".join(diffs))
    return student, teacher


def default_teacher(student_path: str | os.PathLike) -> str:
    """The Ouro source recorded by ``melt convert``."""
    config = load_config(student_path)
    if not is_melt(config):
        raise UnsupportedModelError(not_a_student(student_path, config.model_type))
    source = config.melt.source
    if not source:
        raise InvalidArgumentError(f"{student_path} records no source checkpoint; pass --teacher OURO_DIR")
    return source


class StudentLoss(nn.Module):
    """The module accelerate wraps (DDP/FSDP). Its forward runs the student's chunk-wise forward and
    the whole loss, so every student parameter (``lm_head`` included) is used inside the wrapped
    forward, as FSDP's parameter gathering requires."""

    def __init__(self, student: MeltForCausalLM, settings: DistillSettings) -> None:
        super().__init__()
        self.student, self.settings = student, settings

    def forward(
        self,
        input_ids: Tensor,
        alpha: float,
        teacher_hidden: list[Tensor],
        teacher_taps: list[Tensor] | None,
        teacher_head: Tensor,
        targets: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """KD (+ CE) (+ beta * alignment); the parts are returned detached for logging. With
        ``targets``, KD and CE cover the positions that predict a target; the alignment covers all."""
        s = self.settings
        hidden, taps = self.student.forward_chunkwise(
            input_ids,
            alpha=alpha,
            chunk_size=s.chunk_size,
            detach_history=s.detach_history,
            checkpoint_chunks=s.checkpoint_chunks,
            return_attn_outputs=s.phase == 2,
        )
        head = self.student.lm_head.weight
        loops = range(len(hidden)) if s.kd_loops == "all" else [len(hidden) - 1]
        positions = predicting(targets) if targets is not None else None
        kd = torch.stack(
            [kl_divergence(hidden[t], teacher_hidden[t], head, teacher_head, positions) for t in loops]
        ).mean()
        loss, parts = kd, {"kd": kd.detach()}
        if s.ce_weight > 0:
            ce = torch.stack([next_token_cross_entropy(h, head, input_ids, targets) for h in hidden]).mean()
            loss = loss + s.ce_weight * ce
            parts["ce"] = ce.detach()
        if s.phase == 2:
            align = attention_alignment(taps, teacher_taps)
            loss = loss + s.beta * align
            parts["align"] = align.detach()
        return loss, parts


class DistillObjective:
    """Phase 1 or phase 2 of MELT's post-training (an ``Objective`` for ``trainer.train``)."""

    def __init__(
        self,
        student_path: str | os.PathLike,
        teacher_path: str | os.PathLike,
        settings: DistillSettings,
        steps: int,
        teacher_dtype: str | None = None,
    ) -> None:
        check_pair(student_path, teacher_path)
        self.student_path, self.settings, self.steps = Path(student_path), settings, steps
        self.student: MeltForCausalLM = load_model(student_path, dtype="fp32")
        self.teacher: OuroForCausalLM = load_model(teacher_path, dtype=teacher_dtype or "fp32")
        self.teacher.requires_grad_(False)
        # the exit gate is not part of either phase's loss
        self.student.model.early_exit_gate.requires_grad_(False)
        if settings.freeze_base:
            for name, p in self.student.named_parameters():
                p.requires_grad_(is_gate_parameter(name))
        self.model = StudentLoss(self.student, settings)
        # Phase 2's layers append their attention outputs to a list inside their BlockInputs argument;
        # FSDP2 rebuilds a unit's inputs that hold tensors requiring grad, so under FSDP the phase-2
        # student is one unit (its layers are not units of their own).
        self.fsdp_per_layer = settings.phase != 2
        self.teacher_sharded = False  # prepare() shards it (--shard-teacher)

    def prepare(self, accelerator: Accelerator) -> None:
        """The teacher on the run's device; with ``shard_teacher``, sharded over the processes of the
        FSDP run (one FSDP2 unit, its ``lm_head`` whole: the student's KD loss reads it)."""
        self.teacher.to(accelerator.device).eval()
        self.teacher_sharded = self.settings.shard_teacher
        if self.teacher_sharded:
            if not accelerator.is_fsdp2:
                raise InvalidArgumentError("--shard-teacher shards the teacher over an FSDP run: add --fsdp")
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.teacher, ignored_params={self.teacher.lm_head.weight})

    @contextmanager
    def teacher_gathered(self) -> Iterator[None]:
        """A sharded teacher's weights all-gathered while the block runs (every process enters it)."""
        if not self.teacher_sharded:
            yield
            return
        self.teacher.unshard()
        try:
            yield
        finally:
            self.teacher.reshard()

    def param_groups(self, args: TrainingArgs) -> list[dict[str, Any]]:
        gate = [p for n, p in self.student.named_parameters() if is_gate_parameter(n) and p.requires_grad]
        base = [p for n, p in self.student.named_parameters() if not is_gate_parameter(n) and p.requires_grad]
        groups = [{"name": "gate", "params": gate, "lr": args.gate_lr}]
        if base:
            groups.append({"name": "base", "params": base, "lr": args.lr})
        if not gate and not base:
            raise InvalidArgumentError("nothing to train: the student has no gate and the base is frozen")
        return [g for g in groups if g["params"]]

    def alpha(self, step: int) -> float:
        """Phase 1: linear from 0 at the first step to 1 at the last; phase 2: 1."""
        if self.settings.phase == 2 or self.steps <= 1:
            return 1.0
        return min(1.0, step / (self.steps - 1))

    def step_metrics(self, step: int) -> dict[str, float]:
        return {"alpha": self.alpha(step)}

    def describe(self) -> dict[str, Any]:
        return {"name": objective_name(self.settings), **dataclasses.asdict(self.settings)}

    def loss(
        self, wrapped: nn.Module, input_ids: Tensor, step: int, targets: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        with torch.no_grad(), self.teacher_gathered():
            t_hidden, t_taps = self.teacher.forward_hidden(input_ids, return_attn_outputs=self.settings.phase == 2)
        loss, parts = wrapped(input_ids, self.alpha(step), t_hidden, t_taps, self.teacher.lm_head.weight, targets)
        return loss, {k: v.item() for k, v in parts.items()}

    def evaluate(self, model: nn.Module, input_ids: Tensor, targets: Tensor | None = None) -> dict[str, float]:
        """Held-out next-token loss and KL to the teacher, per loop (student at alpha = 1)."""
        student = model.student if isinstance(model, StudentLoss) else model
        with self.teacher_gathered():
            stats = score_batch(student, input_ids, None, self.teacher, targets=targets)
        out = {}
        for r in finish(stats, with_teacher=True):
            out[f"loss_loop{r.loop}"], out[f"kl_loop{r.loop}"] = r.loss, r.kl_to_teacher
        return out

    def flops_per_token(self, seq_len: int) -> float:
        """The student's forward + backward with its KD (and CE) logits, the teacher's forward with
        the KD logits (``flops.training_flops_per_token``)."""
        s, loops = self.settings, self.student.config.total_ut_steps
        kd = loops if s.kd_loops == "all" else 1
        return training_flops_per_token(
            self.student.config,
            seq_len,
            head_passes=kd + (loops if s.ce_weight > 0 else 0),
            gate_width=kv_gate_width(self.student),
            teacher=self.teacher.config,
            teacher_head_passes=kd,
        )

    def save_model(self, model: nn.Module, out: Path, dtype: str | None) -> None:
        student = model.student if isinstance(model, StudentLoss) else model
        save_model_as(student, out, self.student_path, dtype)


@dataclass
class DataArgs:
    data: Path
    eval_data: Path | None = None
    text_field: str = "text"


def default_teacher_dtype(args: TrainingArgs) -> str:
    """The frozen teacher only runs forwards: bf16 where that is fast (CUDA), else fp32."""
    return "bf16" if args.on_cuda else "fp32"


def run_phase(
    student_path: str | os.PathLike,
    teacher_path: str | os.PathLike | None,
    settings: DistillSettings,
    data_args: DataArgs,
    args: TrainingArgs,
    teacher_dtype: str | None = None,
    on_step: Callable[[dict], None] | None = None,
    on_event: Callable[[str], None] | None = None,
) -> TrainResult:
    """Load data and models, then train one phase; the output is a loadable MELT checkpoint."""
    if args.resume is not None:
        resume_checkpoint(args, objective_name(settings))
    teacher_path = teacher_path or default_teacher(student_path)
    check_seq_len(args.seq_len, load_config(student_path).max_position_embeddings)
    inputs = [student_path, teacher_path, data_args.data, data_args.eval_data]
    check_run_output(args, inputs)  # before anything is loaded
    teacher_dtype = teacher_dtype or default_teacher_dtype(args)
    objective = DistillObjective(student_path, teacher_path, settings, args.steps, teacher_dtype)
    tokenizer = load_tokenizer(student_path)
    data = training_sequences(data_args.data, tokenizer, args.seq_len, args.seed, data_args.text_field)
    eval_data = None
    if data_args.eval_data is not None:
        eval_data = training_sequences(data_args.eval_data, tokenizer, args.seq_len, args.seed, data_args.text_field)
    args = fit_to_rows(args, data)
    if on_event:
        on_event(
            f"phase {settings.phase}: student {student_path}, teacher {teacher_path}, "
            f"{len(data)} sequences of {args.seq_len} tokens"
        )
    return train(objective, data, args, eval_data=eval_data, on_step=on_step, on_event=on_event, inputs=inputs)


def run_both_phases(
    student_path: str | os.PathLike,
    teacher_path: str | os.PathLike | None,
    settings: DistillSettings,
    data_args: DataArgs,
    args: TrainingArgs,
    *,
    steps: int | None = None,
    default_steps: dict[int, int] | None = None,
    teacher_dtype: str | None = None,
    on_phase: Callable[[int, TrainingArgs], tuple[Callable, Callable] | None] | None = None,
) -> tuple[TrainResult, TrainResult]:
    """``--phase all``: phase 1 into ``args.out / "phase1"``, then phase 2 from its output into
    ``args.out / "phase2"``, with the same teacher and settings; each phase runs ``steps`` steps
    (default: ``default_steps``, else ``DEFAULT_STEPS``, of that phase; ``args.steps`` is unused). ``on_phase(phase,
    args)`` may return the ``(on_step, on_event)`` callbacks of that phase."""
    if args.resume is not None:
        raise InvalidArgumentError("--resume continues one phase; rerun that phase with --phase 1 or --phase 2")
    teacher_path = teacher_path or default_teacher(student_path)
    results = []
    student = student_path
    for phase in (1, 2):
        phase_args = dataclasses.replace(
            args,
            out=Path(args.out) / f"phase{phase}",
            steps=(default_steps or DEFAULT_STEPS)[phase] if steps is None else steps,
        )
        callbacks = on_phase(phase, phase_args) if on_phase is not None else None
        on_step, on_event = callbacks or (None, None)
        result = run_phase(
            student,
            teacher_path,
            dataclasses.replace(settings, phase=phase),
            data_args,
            phase_args,
            teacher_dtype,
            on_step,
            on_event,
        )
        results.append(result)
        student = result.out
    return results[0], results[1]

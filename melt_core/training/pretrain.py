"""Training an Ouro-format LoopLM from scratch (``melt pretrain``).

Three objectives:
- ``uniform`` (default): the mean over loops of next-token cross-entropy. Every loop becomes a
  usable predictor, which is what MELT's all-loop distillation needs from a teacher (each loop's
  logits are a target), and nothing can collapse at small scale. The exit gate is not trained.
- ``ramp``: per-loop cross-entropy weighted by the loop index (t / sum(1..T)). Still supervises every
  loop, but the last loops, the ones run at inference, count most (``uniform`` gives loop 1 as much
  weight as loop T, which at small scale keeps all loops about equally good).
- ``ouro``: the Ouro paper's ``sum_t p_t * CE_t - beta * H(p)``, with p the exit gate's pdf over
  loops per token; trains the exit gate too (``--entropy-beta``, 0.1 early in the paper, 0.05 later).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..checkpoints import load_config, load_model, load_tokenizer, save_checkpoint
from ..checkpoints.random_model import init_weights, ouro_config_for
from ..checkpoints.tokenizer import MIN_VOCAB_SIZE, save_tokenizer, train_bpe_tokenizer
from ..data import iter_documents, training_sequences
from ..errors import InvalidArgumentError, UnsupportedModelError
from ..evaluation.heldout import finish, score_batch
from ..models import OuroForCausalLM, is_ouro
from ..models.config import validate_loops
from ..models.ouro import exit_pdf
from ..words import plural
from .flops import training_flops_per_token
from .losses import next_token_cross_entropy, per_token_cross_entropy
from .trainer import (
    TrainingArgs,
    TrainResult,
    check_run_output,
    check_seq_len,
    fit_to_rows,
    resume_checkpoint,
    train,
)

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerFast

# Model shapes of `melt pretrain --preset` (the loop count and vocabulary are set separately).
PRETRAIN_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    },
    "mini": {  # the built-in `reasoning` model's shape
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    "small": {
        "hidden_size": 192,
        "intermediate_size": 576,
        "num_hidden_layers": 4,
        "num_attention_heads": 3,
        "num_key_value_heads": 3,
    },
}
OBJECTIVES = ("uniform", "ramp", "ouro")
MAX_VOCAB_SIZE = 2**20  # real LoopLMs have ~50K-150K tokens
TOKENIZER_DIR = "tokenizer"
OBJECTIVE_NAME = "pretrain"
# Where pretraining's optimisation defaults differ from ``TrainingArgs``'s (which suit post-training).
PRETRAIN_TRAINING_DEFAULTS = {
    "steps": 2000,
    "lr": 2e-3,
    "seq_len": 256,
    "micro_batch": 8,
    "weight_decay": 0.1,
    "save_every": 200,
    "eval_every": 200,
    "eval_batches": 16,
}


@dataclass
class PretrainSettings:
    preset: str = "small"
    loops: int = 4
    vocab_size: int = 4096
    tokenizer: Path | None = None  # an existing tokenizer directory instead of training one
    objective: str = "uniform"
    entropy_beta: float = 0.1
    max_position_embeddings: int = 4096
    init_from: Path | None = None  # continue from this Ouro checkpoint (its shape and tokenizer) instead of random

    def __post_init__(self) -> None:
        if self.preset not in PRETRAIN_PRESETS:
            raise InvalidArgumentError(f"unknown --preset {self.preset!r}; choose from {', '.join(PRETRAIN_PRESETS)}")
        if self.objective not in OBJECTIVES:
            raise InvalidArgumentError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        validate_loops(self.loops, "--loops")
        if self.tokenizer is None and self.init_from is None and self.vocab_size < MIN_VOCAB_SIZE:
            raise InvalidArgumentError(
                f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + 3 special tokens), got {self.vocab_size}"
            )
        if self.vocab_size > MAX_VOCAB_SIZE:  # a tokenizer that large cannot be trained in memory here
            raise InvalidArgumentError(f"--vocab-size must be at most {MAX_VOCAB_SIZE:,}, got {self.vocab_size:,}")


def loop_weights(objective: str, loops: int) -> Tensor:
    """Weights of the per-loop cross-entropies (they sum to 1): equal, or proportional to the loop index."""
    w = torch.ones(loops) if objective == "uniform" else torch.arange(1, loops + 1, dtype=torch.float32)
    return w / w.sum()


class LoopLMLoss(nn.Module):
    """The module accelerate wraps: its forward runs the model and the whole loss (FSDP-safe)."""

    def __init__(self, model: OuroForCausalLM, settings: PretrainSettings) -> None:
        super().__init__()
        self.lm, self.settings = model, settings

    def forward(self, input_ids: Tensor, targets: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        hidden, _ = self.lm.forward_hidden(input_ids)
        w = self.lm.lm_head.weight
        if self.settings.objective in ("uniform", "ramp"):
            per_loop = torch.stack([next_token_cross_entropy(h, w, input_ids, targets) for h in hidden])
            weights = loop_weights(self.settings.objective, len(hidden)).to(per_loop)
            return (weights * per_loop).sum(), {f"ce_loop{t + 1}": v.detach() for t, v in enumerate(per_loop)}
        ce = torch.stack([per_token_cross_entropy(h, w, input_ids) for h in hidden], -1)  # (B, S-1, T)
        gate = self.lm.model.early_exit_gate
        pdf = exit_pdf([gate(h).squeeze(-1) for h in hidden])[:, :-1].float()  # (B, S-1, T)
        if targets is not None:  # the predicted tokens only, (N, T)
            keep = targets[:, 1:]
            ce, pdf = ce[keep], pdf[keep]
        entropy = -(pdf * pdf.clamp_min(1e-12).log()).sum(-1).mean()
        expected_ce = (pdf * ce).sum(-1).mean()
        parts = {f"ce_loop{t + 1}": ce[..., t].mean().detach() for t in range(ce.shape[-1])}
        parts.update(expected_ce=expected_ce.detach(), exit_entropy=entropy.detach())
        return expected_ce - self.settings.entropy_beta * entropy, parts


class PretrainObjective:
    """An ``Objective`` for ``trainer.train``: next-token prediction at every loop."""

    def __init__(
        self, model: OuroForCausalLM, tokenizer: PreTrainedTokenizerFast, settings: PretrainSettings, out: Path
    ) -> None:
        self.lm, self.tokenizer, self.settings, self.out = model, tokenizer, settings, Path(out)
        if settings.objective != "ouro":
            model.model.early_exit_gate.requires_grad_(False)  # no gradient reaches it
        self.model = LoopLMLoss(model, settings)

    def prepare(self, accelerator: Accelerator) -> None:
        """Keep the tokenizer in the run directory so that --resume uses the same one."""
        if accelerator.is_main_process and not (self.out / TOKENIZER_DIR).is_dir():
            save_tokenizer(self.tokenizer, self.out / TOKENIZER_DIR)
        accelerator.wait_for_everyone()

    def param_groups(self, args: TrainingArgs) -> list[dict[str, Any]]:
        return [{"name": "base", "params": [p for p in self.lm.parameters() if p.requires_grad], "lr": args.lr}]

    def step_metrics(self, step: int) -> dict[str, float]:
        return {}

    def describe(self) -> dict[str, Any]:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self.settings).items()}
        return {"name": OBJECTIVE_NAME, **settings}

    def loss(
        self, wrapped: nn.Module, input_ids: Tensor, step: int, targets: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        loss, parts = wrapped(input_ids, targets)
        return loss, {k: v.item() for k, v in parts.items()}

    def evaluate(self, model: nn.Module, input_ids: Tensor, targets: Tensor | None = None) -> dict[str, float]:
        lm = model.lm if isinstance(model, LoopLMLoss) else model
        stats = score_batch(lm, input_ids, None, None, targets=targets)
        return {f"loss_loop{r.loop}": r.loss for r in finish(stats, False)}

    def flops_per_token(self, seq_len: int) -> float:
        """Forward + backward of the model, with every loop's logits in the loss."""
        return training_flops_per_token(self.lm.config, seq_len, head_passes=self.lm.config.total_ut_steps)

    def save_model(self, model: nn.Module, out: Path, dtype: str | None) -> None:
        lm = model.lm if isinstance(model, LoopLMLoss) else model
        save_checkpoint(lm, out, tokenizer=self.tokenizer, dtype=dtype, force=True)


def build_tokenizer(settings: PretrainSettings, data: str | os.PathLike, text_field: str) -> PreTrainedTokenizerFast:
    if settings.tokenizer is not None:
        return load_tokenizer(settings.tokenizer)
    return train_bpe_tokenizer(iter_documents(data, text_field), settings.vocab_size)


def initial_checkpoint(path: str | os.PathLike) -> tuple[OuroForCausalLM, PreTrainedTokenizerFast]:
    """The Ouro model (fp32, trainable) and tokenizer of ``--init-from``."""
    model = load_model(path, dtype="fp32")
    if not is_ouro(model):
        raise UnsupportedModelError(f"--init-from needs an Ouro checkpoint; {path} holds a {type(model).__name__}")
    return model.train(), load_tokenizer(model.name_or_path)


def run_pretrain(
    settings: PretrainSettings,
    data: str | os.PathLike,
    args: TrainingArgs,
    eval_data: str | os.PathLike | None = None,
    text_field: str = "text",
    on_step=None,
    on_event=None,
) -> TrainResult:
    """Train a LoopLM from scratch (or on from ``settings.init_from``); the run directory ends up holding an
    Ouro checkpoint."""
    limit = load_config(settings.init_from) if settings.init_from is not None else None
    check_seq_len(args.seq_len, limit.max_position_embeddings if limit else settings.max_position_embeddings)
    if args.resume is not None:
        resume_checkpoint(args, OBJECTIVE_NAME)
    inputs = [data, eval_data, settings.tokenizer, settings.init_from]
    check_run_output(args, inputs)  # before anything is read
    if settings.init_from is not None:
        model, tokenizer = initial_checkpoint(settings.init_from)
    else:
        if args.resume is not None and (args.out / TOKENIZER_DIR).is_dir():
            tokenizer = load_tokenizer(args.out / TOKENIZER_DIR)
        else:
            tokenizer = build_tokenizer(settings, data, text_field)
        shape = dict(
            PRETRAIN_PRESETS[settings.preset],
            total_ut_steps=settings.loops,
            max_position_embeddings=settings.max_position_embeddings,
        )
        model = OuroForCausalLM(ouro_config_for(tokenizer, torch.float32, **shape))
        init_weights(model, args.seed)  # --resume then overwrites these with the saved state
    packed = training_sequences(data, tokenizer, args.seq_len, args.seed, text_field)
    held_out = (
        training_sequences(eval_data, tokenizer, args.seq_len, args.seed, text_field) if eval_data is not None else None
    )
    args = fit_to_rows(args, packed)
    if on_event:
        n = sum(p.numel() for p in model.parameters())
        source = f"from {settings.init_from}" if settings.init_from is not None else settings.preset
        on_event(
            f"pretraining a {n:,}-parameter LoopLM ({source}, {plural(model.config.total_ut_steps, 'loop')}, vocab "
            f"{len(tokenizer)}) on {len(packed)} sequences of {args.seq_len} tokens"
        )
    return train(
        PretrainObjective(model, tokenizer, settings, args.out),
        packed,
        args,
        eval_data=held_out,
        on_step=on_step,
        on_event=on_event,
        inputs=inputs,
    )

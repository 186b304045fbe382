"""melt models in lm-evaluation-harness: the ``melt`` model type (needs ``pip install 'melt[eval]'``).

Importing this module registers ``MeltLM`` as lm-eval's ``melt`` model, so that
``lm_eval.simple_evaluate(model="melt", model_args="pretrained=DIR,loops=8")`` (and ``melt-lm-eval
--model melt ...``, the lm_eval command line with melt registered) run Ouro and MELT checkpoints
on melt's own batched paths:

- ``loglikelihood`` / ``loglikelihood_rolling``: whole sequences scored in left-padded batches by
  ``model(ids, mask)`` (MELT chunk-wise, every row chunked from its first real token, so a row
  scores the same in any batch);
- ``generate_until``: ``inference.generate_text`` (cached decoding, left-padded batches, stop strings).

``loops`` is a model argument, so one checkpoint can be evaluated at several depths.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoints import load_model, load_tokenizer
from ..errors import InvalidArgumentError
from ..inference import GenerationSettings, SamplingSettings, generate_text
from ..models import is_melt
from ..runtime import resolve_device

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise InvalidArgumentError("lm-evaluation-harness is not installed: pip install 'melt[eval]'") from e

DEFAULT_MAX_LENGTH = 2048  # tokens per scored window (lm-eval's own default for Hugging Face models)


def _as_int(value: Any, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"the lm-eval model argument {name} must be an integer, got {value!r}") from None


@register_model("melt")
class MeltLM(TemplateLM):
    """An Ouro or MELT checkpoint for lm-eval. Model arguments: ``pretrained`` (a directory, a
    built-in name or a Hub id), ``loops``, ``batch_size``, ``device``, ``dtype``, ``max_length``,
    ``chunk_size`` (MELT), ``max_gen_toks``."""

    def __init__(
        self,
        pretrained: str,
        loops: int | str | None = None,
        batch_size: int | str = 8,
        device: str = "auto",
        dtype: str | None = None,
        max_length: int | str | None = None,
        chunk_size: int | str | None = None,
        max_gen_toks: int | str = 256,
        **unused: Any,
    ) -> None:
        super().__init__()
        self.model = load_model(pretrained, dtype=dtype, device=resolve_device(device))
        self.model.eval()
        self.tokenizer = load_tokenizer(pretrained)
        self.loops = self.model.config.resolve_loops(_as_int(loops, "loops"))
        batch = "8" if str(batch_size).startswith("auto") else batch_size  # no memory probing: a fixed size
        self.batch_size = _as_int(batch, "batch_size") or 8
        limit = self.model.config.max_position_embeddings
        self.max_length = min(limit, _as_int(max_length, "max_length") or DEFAULT_MAX_LENGTH)
        self.chunk_size = _as_int(chunk_size, "chunk_size")
        self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks") or 256

    # --- tokens ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            ids = self.model.config.eos_token_ids
            eos = ids[0] if ids else 0
        return eos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: Iterable[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(list(tokens))

    # --- scoring -----------------------------------------------------------------------------
    def _forward_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"loops": self.loops}
        if self.chunk_size is not None and is_melt(self.model):
            kwargs["chunk_size"] = self.chunk_size
        return kwargs

    @torch.no_grad()
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether it is the greedy continuation) of
        every (context tokens, continuation tokens) pair, in left-padded batches of ``batch_size``."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        device = self.model.device
        for first in range(0, len(order), self.batch_size):
            rows = order[first : first + self.batch_size]
            seqs = []
            for i in rows:
                context, continuation = pairs[i]
                if not continuation:
                    raise InvalidArgumentError("lm-eval asked to score an empty continuation")
                whole = (context + continuation)[-(self.max_length + 1) :]
                seqs.append(whole[:-1])
            S = max(len(s) for s in seqs)
            ids = torch.zeros(len(rows), S, dtype=torch.long)
            mask = torch.zeros(len(rows), S, dtype=torch.long)
            for b, s in enumerate(seqs):
                ids[b, S - len(s) :], mask[b, S - len(s) :] = torch.tensor(s), 1
            mask_arg = None if bool(mask.all()) else mask.to(device)
            logits = self.model(ids.to(device), mask_arg, **self._forward_kwargs()).logits.float()
            for b, i in enumerate(rows):
                target = torch.tensor(pairs[i][1], device=device)
                n = len(target)
                log_probs = F.log_softmax(logits[b, S - n :], dim=-1)
                total = log_probs.gather(-1, target[:, None]).sum().item()
                greedy = bool((log_probs.argmax(-1) == target).all())
                results[i] = (total, greedy)
        return results  # type: ignore[return-value]

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results = self.score_tokens([(context, continuation) for _, context, continuation in requests])
        for (key, _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, scored in disjoint windows of ``max_length``."""
        windows, owners = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            for window in get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1
            ):
                windows.append(make_disjoint_window(window))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self.score_tokens(windows), strict=True):
            totals[owner] += log_prob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation --------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if asked) continuations through melt's cached decoding, batched per
        distinct generation arguments; ``until`` strings end a continuation (and are cut)."""
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for n, request in enumerate(requests):
            _, gen_kwargs = request.args
            groups.setdefault(self._generation_key(gen_kwargs), []).append(n)
        for key, members in groups.items():
            until, max_new, temperature, top_p = key
            settings = GenerationSettings(
                max_new_tokens=max_new,
                loops=self.loops,
                sampling=SamplingSettings(temperature=temperature, top_p=top_p, seed=0 if temperature > 0 else None),
                stop=until,
                stop_token_ids=None,
                chunk_size=self.chunk_size if is_melt(self.model) else None,
                batch_size=self.batch_size,
            )
            prompts = [self._truncated_context(requests[n].args[0], max_new) for n in members]
            report = generate_text(self.model, self.tokenizer, prompts, settings)
            for n, result in zip(members, report.results, strict=True):
                outputs[n] = result.text
                self.cache_hook.add_partial("generate_until", requests[n].args, result.text)
        return outputs  # type: ignore[return-value]

    def _generation_key(self, gen_kwargs: dict[str, Any]) -> tuple:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        until = (until,) if isinstance(until, str) else tuple(until)
        eot = self.tok_decode([self.eot_token_id])
        if eot and eot not in until:
            until = (*until, eot)
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 0.0)) if do_sample else 0.0
        top_p = float(gen_kwargs.pop("top_p", 1.0)) if do_sample else 1.0
        return until, max_new, temperature, top_p

    def _truncated_context(self, context: str, max_new: int) -> str:
        """The context, cut from the left so that it and ``max_new`` tokens fit in ``max_length``."""
        ids = self.tok_encode(context)
        room = self.max_length - max_new
        if room < 1:
            raise InvalidArgumentError(
                f"max_gen_toks {max_new} leaves no room for a context in {self.max_length} tokens"
            )
        return context if len(ids) <= room else self.tok_decode(ids[-room:])


@dataclass
class TaskReport:
    """lm-eval task results per loop count: ``results[loops][task][metric]`` (lm-eval's metric
    names without the filter suffix, e.g. ``acc``, ``acc_norm``, ``exact_match``, their
    ``*_stderr``), and the number of documents of every task."""

    checkpoint: str
    model_type: str
    tasks: list[str]
    limit: int | None
    documents: dict[str, int] = field(default_factory=dict)
    results: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["results"] = {str(k): v for k, v in self.results.items()}
        return out


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.2, "alias": ...}`` -> ``{"acc": 0.5, ...}``."""
    out = {}
    for key, value in values.items():
        if "," in key and isinstance(value, int | float) and not isinstance(value, bool):
            metric, _, filter_name = key.partition(",")
            out[metric if filter_name == "none" else key] = float(value)
    return out


def task_manager(tasks: Sequence[str], include_path: str | os.PathLike | None = None) -> Any:
    """lm-eval's task index for ``tasks``: the local YAML tasks of ``include_path`` alone when they
    are all there (indexing lm-eval's ~15k built-in tasks takes 10-20 s), else everything."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InvalidArgumentError(
            f"unknown lm-eval task(s): {', '.join(unknown)} (local YAML tasks need --include-path DIR)"
        )
    return manager


def evaluate_tasks(
    checkpoint: str | os.PathLike,
    tasks: Sequence[str],
    *,
    loops: Sequence[int | None] = (None,),
    limit: int | None = None,
    include_path: str | os.PathLike | None = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> TaskReport:
    """Run lm-eval ``tasks`` (names, or YAML tasks under ``include_path``) on a checkpoint at every
    loop count of ``loops`` (None: the model's); the model is loaded once."""
    import lm_eval

    if not tasks:
        raise InvalidArgumentError("--tasks needs at least one task name")
    if limit is not None and limit < 1:
        raise InvalidArgumentError(f"--limit must be >= 1, got {limit}")
    if include_path is not None and not Path(include_path).is_dir():
        raise InvalidArgumentError(f"--include-path {include_path} is not a directory of task YAML files")
    manager = task_manager(tasks, include_path)
    lm = MeltLM(str(checkpoint), batch_size=batch_size, device=device, dtype=dtype)
    report = TaskReport(str(checkpoint), lm.model.config.model_type, list(tasks), limit)
    for count in loops:
        lm.loops = lm.model.config.resolve_loops(count)
        if progress is not None:
            progress(f"{', '.join(tasks)} with {lm.loops} loop(s)")
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit)
        report.results[lm.loops] = {task: _metrics(values) for task, values in out["results"].items()}
        report.documents = {task: int(n["effective"]) for task, n in out.get("n-samples", {}).items()}
    return report


def cli() -> None:
    """``melt-lm-eval``: lm-eval's own command line with melt's ``melt`` model registered, e.g.
    ``melt-lm-eval --model melt --model_args pretrained=DIR,loops=8 --tasks gsm8k``."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()

"""melt models in lm-evaluation-harness: the ``melt`` model type (needs ``pip install 'melt[eval]'``).

Importing this module registers ``MeltLM`` as lm-eval's ``melt`` model, so that
``lm_eval.simple_evaluate(model="melt", model_args="pretrained=DIR,loops=8")`` (and ``melt-lm-eval
--model melt ...``, the lm_eval command line with melt registered) run Ouro and MELT checkpoints
on melt's own batched paths:

- ``loglikelihood`` / ``loglikelihood_rolling``: whole sequences scored in left-padded batches by
  ``model(ids, mask)`` (MELT chunk-wise, every row chunked from its first real token, so a row
  scores the same in any batch);
- ``generate_until``: ``inference.generate_text`` (cached decoding, left-padded batches, stop strings).

``loops`` is a model argument, so one checkpoint can be evaluated at several depths. lm-eval's own
``batch_size``/``device`` (its command line's ``--batch_size``/``--device``) fill only the model
arguments ``model_args`` do not give. Tasks of an include path read relative ``data_files`` next to
their YAML file (see ``task_manager``).
"""

from __future__ import annotations

import functools
import glob
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..checkpoints import load_model, load_tokenizer
from ..errors import InvalidArgumentError, MeltError
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

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> MeltLM:
        """``"pretrained=DIR,loops=8"`` plus lm-eval's own ``batch_size``/``max_batch_size``/``device``."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> MeltLM:
        """The model arguments win; lm-eval's own ``batch_size``/``max_batch_size``/``device`` (its
        command line always passes them, defaults included) fill only what they do not give. (lm-eval's
        own method passes both, so a key in both was a ``TypeError``.)"""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

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
    ``*_stderr``; a metric of another filter than ``none`` keeps it, ``exact_match,strip`` and
    ``exact_match,strip_stderr``), and the number of documents of every task."""

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
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": 0.2, "alias": ...}`` -> ``{"acc": 0.5,
    "acc_stderr": 0.2}``; another filter stays in the name, and a stderr is always its metric's
    name + ``_stderr``: ``exact_match,strip`` and ``exact_match_stderr,strip`` -> ``exact_match,strip``
    and ``exact_match,strip_stderr`` (lm-eval's ``"N/A"`` stderr of one document is left out)."""
    out = {}
    for key, value in values.items():
        if "," in key and isinstance(value, int | float) and not isinstance(value, bool):
            metric, _, filter_name = key.partition(",")
            base, stderr = (metric[: -len("_stderr")], "_stderr") if metric.endswith("_stderr") else (metric, "")
            out[(base if filter_name == "none" else f"{base},{filter_name}") + stderr] = float(value)
    return out


# --- lm-eval's task index, as melt uses it ----------------------------------------------------
def _next_to(value: Any, folder: Path) -> Any:
    """A relative local path (a string, or the strings of a list or split dict) -> the same path in
    ``folder`` when it is there (a glob when it matches there); anything else as it is (URLs,
    absolute paths, and paths found only from the working directory, as lm-eval reads them)."""
    if isinstance(value, str):
        if "://" in value or os.path.isabs(os.path.expanduser(value)):
            return value
        candidate = folder / value
        if candidate.exists() or (any(c in value for c in "*?[") and glob.glob(str(candidate))):
            return str(candidate)
        return value
    if isinstance(value, list | tuple):
        return [_next_to(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _next_to(v, folder) for k, v in value.items()}
    return value


def _include_roots(include_path: Any) -> list[Path]:
    paths = include_path if isinstance(include_path, list | tuple) else [include_path] if include_path else []
    return [Path(p).expanduser().resolve() for p in paths]


@functools.cache
def _task_manager_class() -> type:
    """lm-eval's ``TaskManager`` whose include-path tasks read relative ``data_files`` (and
    ``data_dir``) of their ``dataset_kwargs`` next to their YAML file: lm-eval passes them to
    ``datasets.load_dataset`` as they are, relative to the working directory. The hook is lm-eval's
    ``TaskFactory._load_full_config`` (lm-eval >= 0.4.12), the one place a task's YAML file and its
    whole config meet; older lm-eval gets its own behaviour."""
    from lm_eval.tasks import TaskManager

    try:
        from lm_eval.tasks._factory import TaskFactory
    except ImportError:  # pragma: no cover - lm-eval < 0.4.12
        return TaskManager

    class LocalDataFactory(TaskFactory):
        def __init__(self, *, meta: dict[str, Any] | None = None, roots: Sequence[Path] = ()) -> None:
            super().__init__(meta=meta)
            self.roots = list(roots)

        def _load_full_config(self, entry: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
            cfg = super()._load_full_config(entry, overrides)
            yaml_path = getattr(entry, "yaml_path", None)
            kwargs = cfg.get("dataset_kwargs")
            if yaml_path is not None and isinstance(kwargs, dict):
                yaml_path = Path(yaml_path).resolve()
                if any(yaml_path.is_relative_to(root) for root in self.roots):
                    for key in ("data_files", "data_dir"):
                        if key in kwargs:
                            kwargs[key] = _next_to(kwargs[key], yaml_path.parent)
            return cfg

    class MeltTaskManager(TaskManager):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if isinstance(getattr(self, "_factory", None), TaskFactory):
                self._factory = LocalDataFactory(meta=self.metadata, roots=_include_roots(self.include_path))

    return MeltTaskManager


def _local_tasks_only(tasks: Sequence[str], include_path: Any) -> Any:
    """A task index of ``include_path`` alone when every one of ``tasks`` is a task of it (not a
    group or tag, which may name lm-eval's tasks); else None. An include path's task overrides a
    built-in one of the same name, so the tasks are the same as in the whole index."""
    if not include_path or not tasks:
        return None
    local = _task_manager_class()(include_path=include_path, include_defaults=False)
    return local if all(t in local.all_subtasks for t in tasks) else None


def task_manager(tasks: Sequence[str], include_path: str | os.PathLike | None = None) -> Any:
    """lm-eval's task index for ``tasks``: the local YAML tasks of ``include_path`` alone when they
    are all there (indexing all of lm-eval's built-in tasks is slow), else everything. Relative
    ``data_files`` of the include path's tasks are read next to their YAML file (from any directory)."""
    include = None if include_path is None else str(include_path)
    local = _local_tasks_only(tasks, include)
    if local is not None:
        return local
    manager = _task_manager_class()(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InvalidArgumentError(
            f"unknown lm-eval task(s): {', '.join(unknown)} (local YAML tasks need --include-path DIR)"
        )
    return manager


# --- quiet runs ------------------------------------------------------------------------------
def _git_commit_hash() -> str | None:
    """lm-eval's ``get_git_commit_hash`` (``git describe --always`` in the working directory, else
    the ``.git`` folder there) without git's ``fatal: not a git repository`` on stderr."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
        return done.stdout.strip()
    except (subprocess.CalledProcessError, OSError):
        return get_commit_from_path(os.getcwd())


def _no_bar(*args: Any, **kwargs: Any) -> Any:
    from tqdm import tqdm

    return tqdm(*args, **{**kwargs, "disable": True})


@contextmanager
def _patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextmanager
def quiet_lm_eval(progress_bars: bool = True) -> Iterator[None]:
    """lm-eval runs without git's ``fatal: not a git repository`` (lm-eval runs git to record a
    commit hash; no setting turns that off) and, with ``progress_bars=False``, without lm-eval's
    and datasets' tqdm bars. Only for the ``with`` block: lm-eval's own functions are put back."""
    import lm_eval.evaluator

    with ExitStack() as stack:
        if hasattr(lm_eval.evaluator, "get_git_commit_hash"):
            stack.enter_context(_patched(lm_eval.evaluator, "get_git_commit_hash", _git_commit_hash))
        if not progress_bars:
            import datasets
            import lm_eval.api.model
            import lm_eval.api.task

            for module in (lm_eval.api.task, lm_eval.api.model):
                if hasattr(module, "tqdm"):
                    stack.enter_context(_patched(module, "tqdm", _no_bar))
            if hasattr(datasets, "is_progress_bar_enabled") and datasets.is_progress_bar_enabled():
                datasets.disable_progress_bars()
                stack.callback(datasets.enable_progress_bars)
        yield


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
        with quiet_lm_eval(progress_bars=False):
            out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit)
        report.results[lm.loops] = {task: _metrics(values) for task, values in out["results"].items()}
        report.documents = {task: int(n["effective"]) for task, n in out.get("n-samples", {}).items()}
    return report


# --- melt-lm-eval ----------------------------------------------------------------------------
DEBUG_ENV = "MELT_DEBUG"  # as the melt CLI: set it for the traceback of a melt error


def _config_file(args: Any) -> dict[str, Any]:
    """The ``--config`` YAML file's settings (lm-eval reports a bad file itself, later)."""
    if not getattr(args, "config", None):
        return {}
    try:
        import yaml

        data = yaml.safe_load(Path(args.config).read_text())
    except Exception:  # noqa: BLE001 - lm-eval's own reading of it says what is wrong
        return {}
    return data if isinstance(data, dict) else {}


def _setting(args: Any, config: dict[str, Any], name: str) -> Any:
    """A ``run`` setting as lm-eval resolves it: the command line, else the config file (else None)."""
    value = getattr(args, name, None)
    return value if value is not None else config.get(name)


def _task_names(tasks: Any) -> list[str]:
    items = tasks if isinstance(tasks, list | tuple) else [tasks] if tasks else []
    return [t.strip() for item in items for t in str(item).split(",") if t.strip()]


def _run_task_manager(args: Any, config: dict[str, Any]) -> type:
    """The task index class for ``lm-eval run``: melt's (data_files next to the YAML), of the
    include path alone when every task asked for is one of its tasks (lm-eval would otherwise index
    all of its built-in tasks first, which is slow)."""
    base = _task_manager_class()
    include_path = _setting(args, config, "include_path")
    if _local_tasks_only(_task_names(_setting(args, config, "tasks")), include_path) is None:
        return base

    class IncludePathOnly(base):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **kwargs: Any) -> None:
            if kwargs.get("include_path") == include_path:
                kwargs["include_defaults"] = False
            super().__init__(*a, **kwargs)

    return IncludePathOnly


def cli() -> None:
    """``melt-lm-eval``: lm-eval's own command line with melt's ``melt`` model registered, e.g.
    ``melt-lm-eval --model melt --model_args pretrained=DIR,loops=8 --tasks gsm8k``. Unlike
    ``lm_eval``: with ``--model melt`` and no ``--device`` (nor ``device:`` in ``--config``) the
    device is melt's ``auto`` (CUDA when available, else CPU; lm-eval's default is ``cuda:0``);
    include-path tasks read relative ``data_files`` next to their YAML; a melt error is one
    ``error: ...`` line on stderr and exit status 1 (``MELT_DEBUG=1``: the traceback); git's
    ``fatal: not a git repository`` is not printed."""
    import lm_eval.tasks
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()  # inserts lm-eval's `run` when no subcommand is given
    manager = _task_manager_class()
    if getattr(args, "command", None) == "run":
        config = _config_file(args)
        # lm-eval's --device defaults to None on the command line and to "cuda:0" in its config; an
        # explicit --device cuda:0 must stay an error on a machine without CUDA, so the default is
        # told apart here, where None still means "not given", rather than by its value later.
        if _setting(args, config, "model") == "melt" and _setting(args, config, "device") is None:
            args.device = "auto"
        manager = _run_task_manager(args, config)
    try:
        # lm-eval's run/ls/validate import TaskManager from lm_eval.tasks when they run
        with _patched(lm_eval.tasks, "TaskManager", manager), quiet_lm_eval():
            parser.execute(args)
    except MeltError as e:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)

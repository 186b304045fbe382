"""Training text: read documents, tokenise once (cached), pack into fixed-length sequences.

Accepted sources: a ``.txt`` file (one document), a ``.jsonl`` / ``.jsonl.gz`` file (one JSON
object per line, text under ``text_field``), a folder of those (recursively, sorted), or a
dataset saved with ``datasets.Dataset.save_to_disk`` (a ``DatasetDict``'s folder: its ``train``
split; ``DIR/SPLIT`` for another). Documents are joined with EOS and packed
into sequences of ``seq_len`` tokens; the order is shuffled deterministically from a seed.

A *problem file* is a ``.jsonl`` whose records hold a ``prompt`` and an ``answer`` (``melt data
reasoning`` writes them): every problem is one row, prompt + answer, right-padded with EOS, and only
the answer's tokens are training targets (``PackedSequences.targets``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import InvalidArgumentError, MeltError, OutputNotWritableError
from .outputs import remove_stale_siblings, writing

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


class DataError(MeltError):
    """Training or evaluation data is missing, malformed, empty or too short."""


def cache_dir() -> Path:
    """Where tokenised data is cached: ``$MELT_CACHE_DIR`` or ``~/.cache/melt``."""
    return Path(os.environ.get("MELT_CACHE_DIR", Path.home() / ".cache" / "melt")) / "tokens"


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def _train_split(path: Path) -> Path:
    """The ``train`` split of a saved ``DatasetDict`` (``DatasetDict.save_to_disk``: one saved
    dataset per split, listed in ``dataset_dict.json``); without one, an error naming the splits."""
    try:
        splits = [str(s) for s in json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]]
    except (OSError, ValueError, KeyError, TypeError):  # unreadable: the split folders it holds
        splits = sorted(d.name for d in path.iterdir() if _is_saved_dataset(d))
    if "train" not in splits or not _is_saved_dataset(path / "train"):
        raise DataError(
            f"{path} is a saved DatasetDict without a 'train' split (splits: {', '.join(splits) or 'none'}); "
            f"pass one split's folder, e.g. --data {path / (splits[0] if splits else 'SPLIT')}"
        )
    return path / "train"


def data_files(path: str | os.PathLike) -> list[Path]:
    """The text files a data path stands for (a saved dataset counts as one entry; a saved
    ``DatasetDict`` is its ``train`` split)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist")
    if p.is_dir() and (p / "dataset_dict.json").is_file():
        p = _train_split(p)
    if _is_saved_dataset(p):
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"{p} holds no {', '.join(TEXT_SUFFIXES)} files")
        return files
    if not p.name.endswith(TEXT_SUFFIXES):
        raise DataError(f"{p}: unsupported data file; use {', '.join(TEXT_SUFFIXES)}, a folder, or a saved dataset")
    check_readable_file(p)
    return [p]


def iter_documents(path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """Every document's text, in a fixed order."""
    for file in data_files(path):
        if _is_saved_dataset(file):
            try:
                from datasets import load_from_disk
            except ImportError as e:  # pragma: no cover - datasets is in the dev extra
                raise DataError(f"{file} is a saved dataset; reading it needs `pip install datasets`") from e
            dataset = load_from_disk(str(file))
            if text_field not in dataset.column_names:
                raise DataError(f"{file}: the dataset has no column {text_field!r} (columns: {dataset.column_names})")
            yield from dataset[text_field]
        elif file.name.endswith(".txt"):
            yield read_text_file(file, "data file")
        else:
            yield from read_jsonl_field(file, text_field)


def check_readable_file(file: Path) -> None:
    """A file melt reads whole must be a file (or a pipe): a device such as /dev/zero never ends."""
    if file.exists() and not (file.is_file() or stat.S_ISFIFO(file.stat().st_mode)):
        raise DataError(f"{file} is not a regular file (a device?); give a text file")


def read_text_file(file: str | os.PathLike, what: str = "text file") -> str:
    """A UTF-8 text file's contents; a missing, binary or non-UTF-8 file is a one-line error."""
    file = Path(file)
    check_readable_file(file)
    try:
        data = file.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{what} {file} does not exist") from e
    except OSError as e:
        raise DataError(f"{file}: cannot read: {e.strerror or e}") from e
    if b"\x00" in data:
        raise DataError(f"{file} is a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r})") from e


def iter_jsonl_records(file: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSON-lines file (``.jsonl`` or
    ``.jsonl.gz``); a line that is not a JSON object is an error naming the file and line."""
    file = Path(file)
    check_readable_file(file)
    opener = gzip.open if file.name.endswith(".gz") else open
    try:
        with opener(file, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}:{lineno}: not valid JSON: {e}") from e
                if not isinstance(record, dict):
                    raise DataError(f"{file}:{lineno}: not a JSON object")
                yield lineno, record
    except FileNotFoundError as e:
        raise DataError(f"{file} does not exist") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{file} is not UTF-8 text (a binary file?)") from e
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{file}: cannot read: {e}") from e


def read_jsonl_field(file: str | os.PathLike, field: str) -> Iterator[str]:
    """The string ``field`` of every record of a JSON-lines file; a record without it is an error
    naming the file and line."""
    for lineno, record in iter_jsonl_records(file):
        if not isinstance(record.get(field), str):
            raise DataError(f"{file}:{lineno}: no string field {field!r}")
        yield record[field]


def _cache_key(path: str | os.PathLike, tokenizer: PreTrainedTokenizerFast, text_field: str) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(f"eos={tokenizer.eos_token_id};field={text_field}".encode())
    for file in data_files(path):
        stat = file.stat()
        h.update(os.fsencode(file.resolve()) + f":{stat.st_size}:{stat.st_mtime_ns}".encode())  # any path bytes
    return h.hexdigest()[:32]


PIECE_CHARS = 200_000  # text tokenised per call: a tokenizer holds ~200 bytes per character while it runs


def _pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` in pieces of at most ``size`` characters, each cut just before a single space between
    two words, where byte-level BPE pre-tokenizers split anyway (the space starts the next word's
    token), so the pieces tokenise as the whole does. Text without such a space is cut at ``size``."""
    start = 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else start + size
        yield text[start:cut]
        start = cut
    yield text[start:]


def tokenize_documents(
    path: str | os.PathLike, tokenizer: PreTrainedTokenizerFast, text_field: str = "text", batch_size: int = 64
) -> torch.Tensor:
    """One int32 token stream: every document followed by EOS. Long documents are tokenised in
    pieces (``_pieces``), so memory stays bounded whatever a document's length."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidArgumentError("the tokenizer has no EOS token to separate documents")
    pieces: list[torch.Tensor] = []
    batch: list[tuple[str, bool]] = []  # (text, whether it ends its document)

    def flush() -> None:
        encoded = tokenizer([text for text, _ in batch], add_special_tokens=False)["input_ids"]
        for ids, (_, last) in zip(encoded, batch, strict=True):
            pieces.append(torch.tensor(ids + [eos] if last else ids, dtype=torch.int32))
        batch.clear()

    for document in iter_documents(path, text_field):
        parts = list(_pieces(document))
        for n, part in enumerate(parts):
            batch.append((part, n == len(parts) - 1))
            if len(batch) == batch_size or sum(len(t) for t, _ in batch) >= PIECE_CHARS:
                flush()
    if batch:
        flush()
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)


def load_token_stream(
    path: str | os.PathLike, tokenizer: PreTrainedTokenizerFast, text_field: str = "text"
) -> torch.Tensor:
    """``tokenize_documents``, cached on disk by data files (path, size, mtime) and tokenizer. The
    cache is an optimisation: where it cannot be written (a full disk) the stream is not cached."""
    file = cache_dir() / f"{_cache_key(path, tokenizer, text_field)}.pt"
    if file.is_file():
        try:
            return torch.load(file, weights_only=True)
        except Exception:  # a corrupt cache entry is rebuilt, never trusted
            file.unlink(missing_ok=True)
    stream = tokenize_documents(path, tokenizer, text_field)
    tmp = file.parent / f".{file.name}.tmp-{os.getpid()}"
    with contextlib.suppress(OutputNotWritableError), writing(file):
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_siblings(file)  # what killed runs left
            torch.save(stream, tmp)
            os.replace(tmp, file)
        finally:
            tmp.unlink(missing_ok=True)
    return stream


PROBLEM_FIELDS = ("prompt", "answer")


def is_problem_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``.jsonl(.gz)`` file whose first record has string ``prompt`` and ``answer``."""
    p = Path(path)
    if not (p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz"))):
        return False
    try:
        _, record = next(iter_jsonl_records(p))
    except (DataError, StopIteration):
        return False  # read as text, which reports what is wrong
    return all(isinstance(record.get(k), str) for k in PROBLEM_FIELDS)


@dataclass(frozen=True)
class ProblemRecord:
    prompt: str
    answer: str
    fields: dict  # the whole record (``hops`` and whatever else it carries)


def read_problems(path: str | os.PathLike) -> list[ProblemRecord]:
    """Every record of a problem file; one without a non-empty string ``prompt`` and ``answer`` is
    an error naming the line."""
    problems = []
    for lineno, record in iter_jsonl_records(path):
        prompt, answer = record.get("prompt"), record.get("answer")
        if not (isinstance(prompt, str) and prompt and isinstance(answer, str) and answer):
            raise DataError(f"{path}:{lineno}: a problem needs a non-empty string 'prompt' and 'answer'")
        problems.append(ProblemRecord(prompt, answer, record))
    if not problems:
        raise DataError(f"{path} holds no problems")
    return problems


def encode_problem(tokenizer: PreTrainedTokenizerFast, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens): the prompt as ``melt generate`` encodes it, the answer as the
    tokens greedy generation must produce first. No EOS is trained after the answer: on the
    reasoning task, a model trained on answer + EOS stayed at chance on one hop for 500 steps where
    the same model on the answer alone learned it in 150 (one run each, same seed)."""
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    if not answer_ids:
        raise InvalidArgumentError(f"the answer {answer!r} has no tokens")
    return tokenizer.encode(prompt), answer_ids


@dataclass
class PackedSequences:
    """Fixed-length training sequences (N, seq_len) served in a seeded order.

    The sequences of global batch ``step`` depend only on (seed, step), so a resumed run sees
    exactly the data it would have seen (the data position is the step). ``targets`` (N, seq_len)
    marks the tokens that are predicted in training (None: all of them). ``ordered``: every epoch
    in the sequences' own order (a curriculum written into the file) instead of shuffled.
    """

    sequences: torch.Tensor  # (N, seq_len) int64
    seed: int = 0
    targets: torch.Tensor | None = None  # (N, seq_len) bool
    ordered: bool = False

    @classmethod
    def from_problems(
        cls, path: str | os.PathLike, tokenizer: PreTrainedTokenizerFast, max_len: int, seed: int = 0
    ) -> PackedSequences:
        """One row per problem, as long as the longest (at most ``max_len``), right-padded with EOS."""
        if tokenizer.eos_token_id is None:
            raise InvalidArgumentError("the tokenizer has no EOS token to pad problems with")
        rows = [encode_problem(tokenizer, p.prompt, p.answer) for p in read_problems(path)]
        seq_len = max(len(a) + len(b) for a, b in rows)
        if seq_len > max_len:
            raise DataError(f"{path}: a problem has {seq_len} tokens, more than --seq-len {max_len}")
        ids = torch.full((len(rows), seq_len), tokenizer.eos_token_id, dtype=torch.long)
        targets = torch.zeros(len(rows), seq_len, dtype=torch.bool)
        for i, (prompt, answer) in enumerate(rows):
            ids[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            targets[i, len(prompt) : len(prompt) + len(answer)] = True
        return cls(ids, seed, targets)

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        tokenizer: PreTrainedTokenizerFast,
        seq_len: int,
        seed: int = 0,
        text_field: str = "text",
    ) -> PackedSequences:
        if seq_len < 2:
            raise InvalidArgumentError(f"--seq-len must be >= 2, got {seq_len}")
        stream = load_token_stream(path, tokenizer, text_field)
        if len(stream) < seq_len:
            raise DataError(
                f"{path} has {len(stream)} tokens, fewer than one sequence of {seq_len}; add data or lower --seq-len"
            )
        n = len(stream) // seq_len
        return cls(stream[: n * seq_len].view(n, seq_len).long(), seed)

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def seq_len(self) -> int:
        return self.sequences.shape[1]

    def _order(self, epoch: int) -> torch.Tensor:
        if self.ordered:
            return torch.arange(len(self))
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def _picked(self, step: int, size: int) -> torch.Tensor:
        orders: dict[int, torch.Tensor] = {}
        picked = []
        for i in range(step * size, (step + 1) * size):
            epoch, pos = divmod(i, len(self))
            if epoch not in orders:
                orders[epoch] = self._order(epoch)
            picked.append(orders[epoch][pos])
        return torch.stack(picked)

    def batch(self, step: int, size: int) -> torch.Tensor:
        """The ``size`` sequences of global batch ``step`` (wrapping into reshuffled epochs)."""
        return self.sequences[self._picked(step, size)]

    def batch_with_targets(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``batch`` and the matching rows of ``targets`` (None when every token is a target)."""
        picked = self._picked(step, size)
        return self.sequences[picked], None if self.targets is None else self.targets[picked]


def training_sequences(
    path: str | os.PathLike,
    tokenizer: PreTrainedTokenizerFast,
    seq_len: int,
    seed: int = 0,
    text_field: str = "text",
) -> PackedSequences:
    """A problem file's rows (``from_problems``, ``seq_len`` their maximum), else packed text."""
    if is_problem_file(path):
        return PackedSequences.from_problems(path, tokenizer, seq_len, seed)
    return PackedSequences.from_path(path, tokenizer, seq_len, seed, text_field)

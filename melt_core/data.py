"""Training text: read documents, tokenise once (cached), pack into fixed-length sequences.

Accepted sources: a ``.txt`` file (one document), a ``.jsonl`` / ``.jsonl.gz`` file (one JSON
object per line, text under ``text_field``), a folder of those (recursively, sorted), or a
dataset saved with ``datasets.Dataset.save_to_disk``. Documents are joined with EOS and packed
into sequences of ``seq_len`` tokens; the order is shuffled deterministically from a seed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from .errors import InvalidArgumentError, MeltError

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")


class DataError(MeltError):
    """Training or evaluation data is missing, malformed, empty or too short."""


def cache_dir() -> Path:
    """Where tokenised data is cached: ``$MELT_CACHE_DIR`` or ``~/.cache/melt``."""
    return Path(os.environ.get("MELT_CACHE_DIR", Path.home() / ".cache" / "melt")) / "tokens"


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def data_files(path: str | os.PathLike) -> list[Path]:
    """The text files a data path stands for (a saved dataset counts as one entry)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {p} does not exist")
    if _is_saved_dataset(p):
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"{p} holds no {', '.join(TEXT_SUFFIXES)} files")
        return files
    if not p.name.endswith(TEXT_SUFFIXES):
        raise DataError(f"{p}: unsupported data file; use {', '.join(TEXT_SUFFIXES)}, a folder, or a saved dataset")
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


def read_text_file(file: str | os.PathLike, what: str = "text file") -> str:
    """A UTF-8 text file's contents; a missing, binary or non-UTF-8 file is a one-line error."""
    file = Path(file)
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


def read_jsonl_field(file: str | os.PathLike, field: str) -> Iterator[str]:
    """The string ``field`` of every non-blank line of a JSON-lines file (``.jsonl`` or ``.jsonl.gz``);
    a line that is not a JSON object with that string field is an error naming the file and line."""
    file = Path(file)
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
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise DataError(f"{file}:{lineno}: no string field {field!r}")
                yield record[field]
    except FileNotFoundError as e:
        raise DataError(f"{file} does not exist") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{file} is not UTF-8 text (a binary file?)") from e
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{file}: cannot read: {e}") from e


def _cache_key(path: str | os.PathLike, tokenizer: PreTrainedTokenizerFast, text_field: str) -> str:
    h = hashlib.sha256()
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(f"eos={tokenizer.eos_token_id};field={text_field}".encode())
    for file in data_files(path):
        stat = file.stat()
        h.update(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def tokenize_documents(
    path: str | os.PathLike, tokenizer: PreTrainedTokenizerFast, text_field: str = "text", batch_size: int = 64
) -> torch.Tensor:
    """One int32 token stream: every document followed by EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidArgumentError("the tokenizer has no EOS token to separate documents")
    pieces: list[torch.Tensor] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            pieces.append(torch.tensor(ids + [eos], dtype=torch.int32))
        batch.clear()

    for text in iter_documents(path, text_field):
        batch.append(text)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)


def load_token_stream(
    path: str | os.PathLike, tokenizer: PreTrainedTokenizerFast, text_field: str = "text"
) -> torch.Tensor:
    """``tokenize_documents``, cached on disk by data files (path, size, mtime) and tokenizer."""
    file = cache_dir() / f"{_cache_key(path, tokenizer, text_field)}.pt"
    if file.is_file():
        try:
            return torch.load(file, weights_only=True)
        except Exception:  # a corrupt cache entry is rebuilt, never trusted
            file.unlink(missing_ok=True)
    stream = tokenize_documents(path, tokenizer, text_field)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp-{os.getpid()}")
    torch.save(stream, tmp)
    os.replace(tmp, file)
    return stream


@dataclass
class PackedSequences:
    """Fixed-length training sequences (N, seq_len) served in a seeded order.

    The sequences of global batch ``step`` depend only on (seed, step), so a resumed run sees
    exactly the data it would have seen (the data position is the step).
    """

    sequences: torch.Tensor  # (N, seq_len) int64
    seed: int = 0

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
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def batch(self, step: int, size: int) -> torch.Tensor:
        """The ``size`` sequences of global batch ``step`` (wrapping into reshuffled epochs)."""
        orders: dict[int, torch.Tensor] = {}
        picked = []
        for i in range(step * size, (step + 1) * size):
            epoch, pos = divmod(i, len(self))
            if epoch not in orders:
                orders[epoch] = self._order(epoch)
            picked.append(orders[epoch][pos])
        return self.sequences[torch.stack(picked)]

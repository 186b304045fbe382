"""Training data: formats, EOS packing, deterministic order, the tokenisation cache, errors."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

import melt_core.data as data_module
from melt_core.data import DataError, PackedSequences, iter_documents, load_token_stream, tokenize_documents

DOCS = ["The first document.", "A second one, longer than the first.", "Third."]


def _write_all_formats(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": DOCS[1]}) + "\n\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": DOCS[2]}) + "\n")


def test_folder_of_txt_jsonl_and_gz(tmp_path):
    _write_all_formats(tmp_path)
    assert list(iter_documents(tmp_path, "body")) == DOCS


def test_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(tmp_path / "ds")) == DOCS
    with pytest.raises(DataError, match="no column 'body'"):
        list(iter_documents(tmp_path / "ds", "body"))


def test_saved_dataset_dict_reads_its_train_split(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    splits = {"train": DOCS, "test": ["Held out."]}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert list(iter_documents(tmp_path / "dd")) == DOCS
    assert list(iter_documents(tmp_path / "dd" / "test")) == ["Held out."]  # another split: its own folder
    assert torch.equal(load_token_stream(tmp_path / "dd", tokenizer), tokenize_documents(tmp_path / "dd", tokenizer))
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(
        str(tmp_path / "no-train")
    )
    with pytest.raises(DataError, match=r"without a 'train' split \(splits: validation\)") as error:
        list(iter_documents(tmp_path / "no-train"))
    assert "\n" not in str(error.value)


def test_eos_between_documents(tmp_path, tokenizer):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    stream = tokenize_documents(tmp_path / "d.jsonl", tokenizer)
    expected = []
    for d in DOCS:
        expected += tokenizer.encode(d, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert stream.tolist() == expected and stream.dtype == torch.int32


def test_packing_and_deterministic_order(text_file, tokenizer):
    a = PackedSequences.from_path(text_file, tokenizer, seq_len=32, seed=3)
    b = PackedSequences.from_path(text_file, tokenizer, seq_len=32, seed=3)
    c = PackedSequences.from_path(text_file, tokenizer, seq_len=32, seed=4)
    stream = load_token_stream(text_file, tokenizer)
    assert a.sequences.shape == (len(stream) // 32, 32)
    assert torch.equal(a.sequences.flatten(), stream[: a.sequences.numel()].long())
    assert torch.equal(a.batch(5, 4), b.batch(5, 4)) and not torch.equal(a.batch(5, 4), c.batch(5, 4))
    # one epoch visits every sequence once; the next epoch reshuffles
    epoch = torch.cat([a.batch(i, 1) for i in range(len(a))])
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, a.sequences.tolist()))
    assert not torch.equal(a.batch(0, 3), a.batch(len(a) // 3, 3))


def test_tokenisation_is_cached(text_file, tokenizer, monkeypatch):
    first = load_token_stream(text_file, tokenizer)

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(data_module, "tokenize_documents", fail)
    assert torch.equal(load_token_stream(text_file, tokenizer), first)


def test_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        PackedSequences.from_path(tmp_path / "nope.jsonl", tokenizer, 16)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="0 tokens, fewer than one sequence"):
        PackedSequences.from_path(tmp_path / "empty.jsonl", tokenizer, 16)
    (tmp_path / "short.txt").write_text("Hi.")
    with pytest.raises(DataError, match="fewer than one sequence of 512"):
        PackedSequences.from_path(tmp_path / "short.txt", tokenizer, 512)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "field.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match="no string field 'text'"):
        list(iter_documents(tmp_path / "field.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported data file"):
        list(iter_documents(tmp_path / "x.csv"))

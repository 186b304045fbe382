"""Tokenizers: Ouro's byte-level BPE, loaded with transformers from ``tokenizer.json``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from tokenizers import ByteLevelBPETokenizer, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, InvalidArgumentError
from . import builtin

if TYPE_CHECKING:  # transformers is imported when a tokenizer is made (it is slow to import)
    from transformers import PreTrainedTokenizerFast

# Ouro's special tokens, at ids 0, 1, 2 (docs/ouro-format.md, "Tokenizer").
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SAMPLE_TEXT = builtin.ASSETS / "sample.txt"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The tokenizer of a checkpoint directory (needs ``tokenizer.json``; no remote code)."""
    path = builtin.resolve(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file} not found: the checkpoint has no tokenizer")
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    except Exception as e:  # tokenizers raises its own exception types for a malformed file
        raise CorruptCheckpointError(f"{file} is not a valid tokenizer file: {str(e).splitlines()[0][:200]}") from e


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` at ids 0, 1, 2
    and Ouro's ChatML chat template. A byte-level BPE starts from all 256 bytes, so ``vocab_size``
    must leave room for them and the special tokens (it would be raised silently otherwise)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise InvalidArgumentError(
            f"vocab size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
            f"got {vocab_size}"
        )
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    return _with_ouro_specials(bpe._tokenizer, unk_token=None)


def _with_ouro_specials(backend: Tokenizer, unk_token: str | None) -> PreTrainedTokenizerFast:
    """``backend`` as a transformers tokenizer: ``<|endoftext|>`` as BOS, EOS and padding, ChatML."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[0],
        unk_token=unk_token,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


UNKNOWN_WORD = "<|unk|>"


def word_level_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A tokenizer whose tokens are whole whitespace-separated ``words`` (any other word is
    ``<|unk|>``), with Ouro's special tokens at ids 0, 1, 2: for synthetic tasks whose symbols
    should each be one token."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, UNKNOWN_WORD, *words])}
    if len(vocab) != len(SPECIAL_TOKENS) + 1 + len(words):
        raise InvalidArgumentError("the words of a word-level tokenizer must be distinct")
    backend = Tokenizer(WordLevel(vocab, unk_token=UNKNOWN_WORD))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return _with_ouro_specials(backend, unk_token=UNKNOWN_WORD)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: str | os.PathLike) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json, plus vocab.json and
    merges.txt as in a real Ouro checkpoint."""
    for key in ("is_local", "local_files_only"):  # how from_pretrained found the files, not the tokenizer's
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(str(out))
    tokenizer.backend_tokenizer.model.save(str(out))

"""Prompts in, text out: chat template, default stop tokens, and an incremental detokenizer with stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..checkpoints.tokenizer import SPECIAL_TOKENS
from ..errors import CorruptCheckpointError, InvalidArgumentError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IM_END = SPECIAL_TOKENS[2]  # "<|im_end|>": ChatML's end of turn


class TextStream:
    """Incremental detokenizer of one row, with stop strings.

    Byte-level BPE pieces can split a multi-byte character, so text is decoded from a window of
    the running ids and only the new suffix is released, once it no longer ends in U+FFFD (an
    incomplete UTF-8 sequence). Text that could be the start of a stop string is held back until
    it is known not to be one; a stop string cuts the text before it and ends the row.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # the complete characters decoded so far (cut at a stop string)
        self.released = 0  # characters of ``text`` already returned
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] decode to the tail of ``text`` (context for the next piece)
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now final (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what is held back (an incomplete character decodes as U+FFFD)."""
        if not self.stopped and self._read < len(self.ids):
            before = self._decode(self.ids[self._prefix : self._read])
            self.text += self._decode(self.ids[self._prefix :])[len(before) :]
            self._prefix = self._read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            search_from = max(0, self.released - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                final = True
        end = len(self.text)
        if not final and self.stop:
            end -= max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = max(end, self.released)
        out = self.text[self.released : end]
        self.released = end
        return out


def default_stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The model's EOS id(s), the tokenizer's EOS id and ``<|im_end|>`` when it is in the vocabulary."""
    ids = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return tuple(sorted(ids))


def _template_file(tokenizer: PreTrainedTokenizerBase) -> str:
    """Where a loaded tokenizer's chat template came from: chat_template.jinja, else tokenizer_config.json."""
    if not getattr(tokenizer, "name_or_path", None):
        return "the tokenizer"
    root = Path(tokenizer.name_or_path)
    return str(
        root / "chat_template.jinja" if (root / "chat_template.jinja").is_file() else root / "tokenizer_config.json"
    )


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, chat: bool) -> list[int]:
    """Token ids of a prompt; with ``chat`` as one user turn plus the assistant generation prompt."""
    if not prompt.strip():
        raise InvalidArgumentError("the prompt is empty; pass some text with --prompt, --prompt-file or stdin")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidArgumentError("--chat needs a chat template, and this tokenizer has none")
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # a template is a program: jinja's sandbox refusals, syntax or runtime errors
            raise CorruptCheckpointError(
                f"{_template_file(tokenizer)}: the chat template cannot be applied: "
                f"{type(e).__name__}: {next(iter(str(e).splitlines()), '')[:200]}"
            ) from e
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt)

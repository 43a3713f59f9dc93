"""Tokenizer use on the server side: loading, and streaming token ids as text."""

from __future__ import annotations

from tokenizers import Tokenizer

_INCOMPLETE = "\ufffd"


def load_tokenizer(tokenizer_json: str) -> Tokenizer | None:
    """The tokenizer a backend advertises; None when it serves token ids only."""
    return Tokenizer.from_str(tokenizer_json) if tokenizer_json else None


class IncrementalDetokenizer:
    """Turns a request's output token ids into text deltas as they arrive.

    Decodes a short window (the previous chunk plus the new ids), so the cost per chunk does
    not grow with the output; text ending in an incomplete UTF-8 sequence is held back until
    the sequence completes (or the request finishes).
    """

    __slots__ = ("_tokenizer", "_ids", "_prefix", "_read")

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token_ids: list[int], final: bool = False) -> str:
        self._ids.extend(token_ids)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        text = decode(self._ids[self._prefix:], skip_special_tokens=True)
        if len(text) <= len(prefix_text) or (text.endswith(_INCOMPLETE) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text):]

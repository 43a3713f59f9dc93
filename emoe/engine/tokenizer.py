"""The checkpoint's ``tokenizer.json``, through the ``tokenizers`` library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from emoe.core.errors import EmoeError

TOKENIZER_FILE = "tokenizer.json"


class TokenizerError(EmoeError):
    """A missing or unreadable tokenizer file."""


class Tokenizer:
    def __init__(self, inner: _HFTokenizer):
        self.inner = inner

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"{path}: not found")
        try:
            return cls(_HFTokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception on parse errors
            raise TokenizerError(f"{path}: cannot parse: {exc}") from None

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / TOKENIZER_FILE
        self.inner.save(str(path))
        return path

"""Chat templates: a checkpoint's Hugging Face ``chat_template`` (Jinja, in its
``tokenizer_config.json``) rendered as transformers renders it, in a sandbox.

The reference model's template (``emoe/engine/reference/chat_template.jinja``) maps messages
to its task prompt forms; it reads the request's ``task`` from the template context.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template refused the messages (its ``raise_exception``) or failed to render them."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent,
                                                                     ensure_ascii=False)
        self._template = env.from_string(source)
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def from_tokenizer_config(cls, config_json: str) -> "ChatTemplate | None":
        """The template of a ``tokenizer_config.json`` (None when it has none). A list of
        named templates gives the one named "default"."""
        if not config_json:
            return None
        config = json.loads(config_json)
        source = config.get("chat_template")
        if isinstance(source, list):
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str) or not source:
            return None
        return cls(source, _token_text(config.get("bos_token")),
                   _token_text(config.get("eos_token")))

    def render(self, messages: list[dict[str, str]], **context: Any) -> str:
        """The prompt text for ``messages`` with the generation prompt added; ``context``
        (e.g. ``task``) is passed to the template as variables."""
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                eos_token=self.eos_token, **context)
        except ChatTemplateError:
            raise
        except Exception as exc:  # noqa: BLE001 - the template is data; its failure is the input's
            raise ChatTemplateError(f"the model's chat template failed: {exc}") from None

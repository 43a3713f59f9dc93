"""OpenAI's completions and chat completions bodies: checked, and read into ``Params``; and the
response objects (whole and streamed chunks) built from a request's output.

Every bad value is an ``InvalidArgument`` naming the body parameter. Fields that would change
the result and that emoe does not implement (``n`` > 1, ``logprobs``, penalties, tools, ...)
are refused rather than ignored; fields that do not change the result (``user``,
``metadata``, ...) and unknown fields are ignored, as vLLM does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from emoe.rpc.errors import InvalidArgument

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
_ECHO_CHARS = 40
_UINT32 = 2**32
_INT32 = 2**31

# Refused unless absent or equal to one of the harmless values listed.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "logprobs": (False,),
    "top_logprobs": (0,), "logit_bias": ({},), "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0), "repetition_penalty": (1, 1.0), "min_tokens": (0,),
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "audio": (), "modalities": (["text"],),
    "prediction": (), "guided_json": (), "guided_regex": (), "guided_choice": (),
    "guided_grammar": (),
}
_WHY = {
    "min_tokens": "not supported; set ignore_eos to generate exactly max_tokens tokens",
    "n": "only 1 choice per request is supported; send several requests",
    "best_of": "only 1 is supported",
}
CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass(slots=True)
class Params:
    """One request's parameters. ``prompt`` is text or token ids (completions); ``messages``
    are the chat messages with their content as text. None: not given (server default)."""

    chat: bool
    model: str | None = None
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    max_tokens_param: str = "max_tokens"
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    return_token_ids: bool = False
    task: str = ""
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    priority: int = 0

    @property
    def prompt_param(self) -> str:
        return "messages" if self.chat else "prompt"

    def param_of(self, service_field: str) -> str:
        """The body parameter behind a field named in a scheduler-service error."""
        head, _, rest = service_field.partition(".")
        if head in ("text", "prompt"):
            return self.prompt_param
        if head == "token_ids":
            return "prompt" + rest.removeprefix("ids")
        if service_field == "sampling.max_tokens":
            return self.max_tokens_param
        if head == "sampling":
            return rest
        return service_field


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _ECHO_CHARS else text[:_ECHO_CHARS] + "..."


def _int(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(name, f"must be an integer, got {_show(value)}")
    if not low <= value < high:
        raise InvalidArgument(name, f"must be in [{low}, {high - 1}], got {value}")
    return value


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(name, f"must be a finite number, got {_show(value)}")
    return float(value)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(name, f"must be true or false, got {_show(value)}")
    return value


def _string(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(name, f"must be a string, got {_show(value)}")
    return value


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list):
        raise InvalidArgument(name, f"must be a list of token ids, got {_show(value)}")
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < _UINT32:
            raise InvalidArgument(f"{name}[{i}]", f"must be a token id (an integer >= 0), got {_show(t)}")
    return value


def _same(value: Any, harmless: Any) -> bool:
    """``value == harmless``, where True is not 1 and False is not 0 (but 0 is 0.0)."""
    if isinstance(value, bool) != isinstance(harmless, bool):
        return False
    return value == harmless


def _refuse_unsupported(body: dict) -> None:
    for name, harmless in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(_same(value, ok) for ok in harmless):
            raise InvalidArgument(name, _WHY.get(name, f"{_show(value)} is not supported by emoe"))


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidArgument("stop", f"must be a string or a list of strings, got {_show(value)}")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidArgument("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidArgument("stop", f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
    return tuple(stops)


def _slo(body: dict, params: Params) -> None:
    slo = body.get("slo")
    if slo is None:
        return
    if not isinstance(slo, dict):
        raise InvalidArgument("slo", f'must be an object like {{"ttft_s": 1.0, "tpot_s": 0.1}}, '
                                     f"got {_show(slo)}")
    unknown = set(slo) - {"ttft_s", "tpot_s"}
    if unknown:
        raise InvalidArgument(f"slo.{sorted(unknown)[0]}", "unknown; the SLO has ttft_s and tpot_s")
    for key in ("ttft_s", "tpot_s"):
        value = _number(slo, key)
        if value is not None and value <= 0:
            raise InvalidArgument(f"slo.{key}", f"must be a positive number of seconds, got {value}")
        setattr(params, f"{key.removesuffix('_s')}_slo_s", value)


def _prompt(body: dict) -> str | list[int]:
    value = body.get("prompt")
    if value is None:
        raise InvalidArgument("prompt", "required")
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        if len(value) > 1:
            raise InvalidArgument("prompt", f"one prompt per request is supported, got {len(value)}; "
                                            "send one request per prompt")
        value = value[0]
        return value if isinstance(value, str) else _token_ids(value, "prompt")
    if isinstance(value, list) and value:
        return _token_ids(value, "prompt")
    raise InvalidArgument("prompt", f"must be a string or a list of token ids, got {_show(value)}")


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else part
                raise InvalidArgument(f"{where}[{j}].type", f"only text content is supported, "
                                                            f"got {_show(kind)}")
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidArgument(f"{where}[{j}].text", "must be a string")
            texts.append(text)
        return "".join(texts)
    raise InvalidArgument(where, f"must be a string or a list of text parts, got {_show(value)}")


def _messages(body: dict) -> list[dict[str, str]]:
    value = body.get("messages")
    if not isinstance(value, list) or not value:
        raise InvalidArgument("messages", "must be a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InvalidArgument(f"messages[{i}]", f"must be an object, got {_show(m)}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise InvalidArgument(f"messages[{i}].role", f"{_show(role)} is not supported; "
                                                         f"use one of {', '.join(CHAT_ROLES)}")
        if m.get("tool_calls") or m.get("function_call"):
            raise InvalidArgument(f"messages[{i}].tool_calls", "tool calls are not supported")
        messages.append({"role": role, "content": _content(m.get("content"), f"messages[{i}].content")})
    return messages


def parse(body: Any, chat: bool) -> Params:
    """``Params`` of a completions (``chat`` False) or chat completions body."""
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    _refuse_unsupported(body)
    p = Params(chat=chat)
    p.model = _string(body, "model")
    if chat:
        p.messages = _messages(body)
    else:
        p.prompt = _prompt(body)
    p.stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not p.stream:
            raise InvalidArgument("stream_options", "only allowed when stream is true")
        if not isinstance(options, dict):
            raise InvalidArgument("stream_options", f"must be an object, got {_show(options)}")
        p.include_usage = _bool(options, "include_usage")
    for name in (("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)):
        value = _int(body, name, 1, _INT32)
        if value is not None:
            p.max_tokens, p.max_tokens_param = value, name
            break
    p.temperature = _number(body, "temperature")
    p.top_p = _number(body, "top_p")
    p.top_k = _int(body, "top_k", -1, _INT32)
    if p.top_k == -1:  # vLLM's spelling of "no top-k cut"
        p.top_k = 0
    p.seed = _int(body, "seed", 0, 2**63)
    p.stop = _stop(body)
    stop_ids = body.get("stop_token_ids")
    p.stop_token_ids = tuple(_token_ids(stop_ids, "stop_token_ids")) if stop_ids is not None else ()
    p.ignore_eos = _bool(body, "ignore_eos")
    p.return_token_ids = _bool(body, "return_token_ids")
    p.task = _string(body, "task") or ""
    _slo(body, p)
    p.priority = _int(body, "priority", -_INT32, _INT32) or 0
    return p


# -- responses -------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(p: Params, text: str, finish_reason: str | None, token_ids: list[int] | None,
           *, streamed: bool, first: bool = False) -> dict[str, Any]:
    """A choice of a whole response or of a streamed chunk (``first``: the first chunk)."""
    c: dict[str, Any] = {"index": 0}
    if not p.chat:
        c["text"] = text
    elif streamed:
        c["delta"] = {"role": "assistant", "content": text} if first else (
            {"content": text} if text else {})
    else:
        c["message"] = {"role": "assistant", "content": text}
    c["logprobs"] = None
    c["finish_reason"] = finish_reason
    if p.return_token_ids and token_ids is not None:
        c["token_ids"] = token_ids
    return c


def response(p: Params, request_id: str, created: int, model: str, choices: list[dict],
             *, streamed: bool, usage_: dict[str, int] | None = None,
             emoe: dict[str, Any] | None = None) -> dict[str, Any]:
    if p.chat:
        kind = "chat.completion.chunk" if streamed else "chat.completion"
    else:
        kind = "text_completion"
    r: dict[str, Any] = {"id": request_id, "object": kind, "created": created, "model": model,
                         "choices": choices}
    if usage_ is not None or not streamed or p.include_usage:
        r["usage"] = usage_
    if emoe is not None:
        r["emoe"] = emoe
    return r

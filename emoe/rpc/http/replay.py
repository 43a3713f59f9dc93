"""Trace replay against any OpenAI-compatible server (``emoe replay --target http://HOST:PORT/v1``).

Each request is a streamed ``POST /completions`` whose prompt is the trace's token ids and
whose ``max_tokens`` is the trace's output length. Output lengths are forced where the server
allows it, found out once before the replay starts by a one-token probe:

    ignore_eos   generate past EOS (emoe's field; vLLM and SGLang take it too)
    min_tokens   no EOS before max_tokens (vLLM's field)
    none         neither is accepted: requests may end sooner; the actual lengths are reported

Generated tokens are counted from the server's token ids where it returns them (emoe, with
``return_token_ids``), else from the usage it reports at the end of the stream, else one per
streamed chunk. The server's own measurements (queueing time, task, expert hits) are read
from emoe's ``emoe`` extension when present; other servers leave those columns empty.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from typing import Any

import aiohttp

from emoe.core.errors import ConfigError
from emoe.core.request import Request, RequestStatus
from emoe.rpc.replay import FIRST_NON_SPECIAL_ID, TargetModel

log = logging.getLogger(__name__)

FORCE_MODES = ("auto", "ignore_eos", "min_tokens", "none")
# Without a vocabulary size from the server, prompts use ids below this: the special and byte
# tokens every byte-level and SentencePiece vocabulary starts with.
DEFAULT_VOCAB = 259
MAX_CONNECTIONS = 1024
_CONTEXT_KEYS = ("max_model_len", "context_length", "max_context_length")


class HttpTarget:
    """``base_url`` is the API root, e.g. ``http://127.0.0.1:8000/v1``."""

    def __init__(self, base_url: str, *, auth_token: str | None = None,
                 ca_file: str | None = None, model: str | None = None,
                 force_length: str = "auto"):
        if force_length not in FORCE_MODES:
            raise ConfigError(f"--force-length: {force_length!r}; use one of {', '.join(FORCE_MODES)}")
        url = base_url.rstrip("/")
        if url.count("/") == 2:  # http://host:port
            url += "/v1"
        self.base_url = url
        self._headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        self._ssl = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self._model_name = model
        self.force_length = force_length
        self._emoe = False
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, ssl=self._ssl))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_ready(self, seconds: float, poll_s: float = 0.2) -> None:
        """Waits until ``GET /models`` answers 200 (emoe's answers 503 until warm); a clear
        error after ``seconds`` (0: no wait)."""
        if seconds <= 0:
            return
        url = f"{self.base_url}/models"
        deadline = time.monotonic() + seconds
        last = "no answer"
        while True:
            try:
                async with self._client().get(url) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}: {_error_message(await response.text())}"
            except aiohttp.ClientError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise ConfigError(f"--target {self.base_url}: not ready within {seconds:g} s "
                                  f"(--wait-ready); last answer: {last}")
            await asyncio.sleep(poll_s)

    async def model(self) -> TargetModel:
        """The model from ``GET /models`` (``--model``, else the first listed), and how output
        lengths will be forced."""
        url = f"{self.base_url}/models"
        try:
            async with self._client().get(url) as response:
                if response.status != 200:
                    raise ConfigError(f"--target: GET {url} answered {response.status}: "
                                      f"{_error_message(await response.text())}")
                listed = (await response.json()).get("data") or []
        except aiohttp.ClientError as exc:
            raise ConfigError(f"--target: cannot reach {url}: {exc}") from None
        entry = next((m for m in listed if m.get("id") == self._model_name), None)
        if entry is None:
            if self._model_name is not None or not listed:
                names = ", ".join(str(m.get("id")) for m in listed) or "none"
                raise ConfigError(f"--model: {self._model_name!r} is not served at {url} "
                                  f"(served: {names})")
            entry = listed[0]
        self._model_name = entry["id"]
        self._emoe = isinstance(entry.get("emoe"), dict)
        context = next((entry[k] for k in _CONTEXT_KEYS if isinstance(entry.get(k), int)), None)
        vocab = entry["emoe"].get("vocab_size") if self._emoe else None
        if not isinstance(vocab, int):
            vocab = DEFAULT_VOCAB
            log.info("the server does not say its vocabulary size: prompts use token ids %d-%d",
                     FIRST_NON_SPECIAL_ID, DEFAULT_VOCAB - 1)
        if context is None:
            log.warning("the server does not say its context length: requests are not fitted")
        if self.force_length == "auto":
            self.force_length = await self._probe()
        log.info("replaying against %s at %s; output lengths forced by: %s",
                 self._model_name, self.base_url, self.force_length)
        return TargetModel(self._model_name, context, vocab)

    async def _probe(self) -> str:
        """The first way of forcing output lengths that the server accepts."""
        url = f"{self.base_url}/completions"
        for mode in ("ignore_eos", "min_tokens"):
            body = {"model": self._model_name, "prompt": [FIRST_NON_SPECIAL_ID], "max_tokens": 1,
                    **self._forcing(mode, 1)}
            try:
                async with self._client().post(url, json=body) as response:
                    text = await response.text()
            except aiohttp.ClientError as exc:
                raise ConfigError(f"--target: cannot reach {url}: {exc}") from None
            if response.status == 200:
                return mode
            log.info("the server refused %s (HTTP %d: %s)", mode, response.status,
                     _error_message(text))
        return "none"

    @staticmethod
    def _forcing(mode: str, output_tokens: int) -> dict[str, Any]:
        if mode == "ignore_eos":
            return {"ignore_eos": True}
        if mode == "min_tokens":
            return {"min_tokens": output_tokens}
        return {}

    def _body(self, request: Request, prompt: list[int]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model_name, "prompt": prompt, "max_tokens": request.output_tokens,
            "stream": True, "stream_options": {"include_usage": True},
            **self._forcing(self.force_length, request.output_tokens)}
        if self._emoe:  # emoe's own fields; other servers may refuse unknown ones
            body.update(task=request.task, slo={"ttft_s": request.slo.ttft_s,
                                                "tpot_s": request.slo.tpot_s},
                        return_token_ids=True)
        return body

    async def send(self, request: Request, prompt: list[int], start: float) -> Request:
        clock = time.monotonic
        try:
            async with self._client().post(f"{self.base_url}/completions",
                                           json=self._body(request, prompt)) as response:
                if response.status != 200:
                    request.status = RequestStatus.REJECTED
                    request.reason = (f"HTTP {response.status}: "
                                      f"{_error_message(await response.text())}")
                else:
                    await self._read_stream(request, response, start)
        except (aiohttp.ClientError, TimeoutError) as exc:
            request.status = RequestStatus.REJECTED
            request.reason = f"connection: {exc or type(exc).__name__}"
        if request.finished_at is None:
            request.finished_at = clock() - start
        return request

    @staticmethod
    async def _read_stream(request: Request, response: aiohttp.ClientResponse,
                           start: float) -> None:
        counted = 0
        usage_tokens = None
        reason = None
        async for line in response.content:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                request.status = RequestStatus.REJECTED
                request.reason = f"error in stream: {_error_message(chunk)}"
                return
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
            for c in chunk.get("choices") or ():
                ids = c.get("token_ids")
                n = len(ids) if ids is not None else (1 if c.get("text") else 0)
                if n and request.first_token_at is None:
                    request.first_token_at = time.monotonic() - start
                counted += n
                reason = c.get("finish_reason") or reason
            extension = chunk.get("emoe")
            if isinstance(extension, dict):
                if extension.get("queue_s") is not None:
                    request.admitted_at = request.arrival + extension["queue_s"]
                request.expert_hits = extension.get("expert_hits", 0)
                request.expert_misses = extension.get("expert_misses", 0)
        request.finished_at = time.monotonic() - start
        request.generated_tokens = usage_tokens if usage_tokens is not None else counted
        if reason == "abort":
            request.status, request.reason = RequestStatus.ABORTED, "aborted"
        elif reason is None:
            request.status, request.reason = RequestStatus.REJECTED, "stream ended without a finish reason"
        else:
            request.status, request.reason = RequestStatus.FINISHED, reason


def _error_message(text: str | dict) -> str:
    """The message of an OpenAI error body (or the body itself, shortened)."""
    try:
        body = json.loads(text) if isinstance(text, str) else text
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return str(text)[:200]

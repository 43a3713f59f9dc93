"""The OpenAI-compatible HTTP front door of ``emoe serve --http-port`` (aiohttp).

It runs in the gRPC server's event loop over the same ``SchedulerService`` core as Generate: a
request is checked (``protocol``), turned into the GenerateRequest the gRPC service takes, its
caller identified (``service.identity``), validated within the service's input limits
(``service.submission``), admitted (``service.admit``) and streamed (``service.outputs``) back
as OpenAI objects or server-sent events. Whatever ends the HTTP exchange (the request finishing, a stop
string, the client going away) the request reaches a terminal status and its batch slot and KV
memory are freed.

    POST /v1/completions, /v1/chat/completions   GET /v1/models[/{model}]
    GET /health (503 until warm, while draining, with no engine)   GET /metrics (Prometheus)
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from tokenizers import Tokenizer

from emoe.core.errors import ConfigError
from emoe.rpc.auth import Identity
from emoe.rpc.backend import BackendInfo
from emoe.rpc.client import generate_request
from emoe.rpc.errors import InvalidArgument, ServiceError, Unavailable, clip
from emoe.rpc.http.chat import ChatTemplate, ChatTemplateError
from emoe.rpc.http.output import OutputText
from emoe.rpc.http.protocol import Params, choice, parse, response, usage
from emoe.rpc.intake import Intake
from emoe.rpc.metrics import Outcome
from emoe.rpc.replica import RequestStream
from emoe.rpc.service import SchedulerService
from emoe.rpc.v1 import scheduler_pb2 as pb
from emoe.rpc.task_detect import TaskDetector
from emoe.rpc.text import load_tokenizer

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 1.0

_STATUS = {  # grpc.StatusCode name -> HTTP status
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
               409: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable_error"}
_FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop",
           pb.FINISH_REASON_ABORTED: "abort"}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_DONE = b"data: [DONE]\n\n"


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": _ERROR_TYPE.get(status, "server_error"),
                      "param": param, "code": code}}


class HttpError(Exception):
    """A response status with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(status, message, param, code)


def _http_error(exc: Exception, params: Params | None = None) -> HttpError:
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, ServiceError):
        status = _STATUS.get(exc.code.name, 500)
        field = getattr(exc, "field", None)
        if field is not None:
            param = params.param_of(field) if params is not None else field
            return HttpError(status, param + exc.message[len(field):], param)
        return HttpError(status, exc.message, code="invalid_api_key" if status == 401 else None)
    if isinstance(exc, ConfigError):
        return HttpError(400, str(exc))
    if isinstance(exc, web.HTTPException) and exc.status >= 400:  # e.g. 413 from reading the body
        return HttpError(exc.status, exc.text or exc.reason)
    incident = uuid.uuid4().hex[:12]
    log.error("internal error, incident %s", incident, exc_info=exc)
    return HttpError(500, f"internal error (incident {incident}; see the server log)")


def _json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None
                   ) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(),
                        content_type="application/json", headers=headers)


def _error_response(error: HttpError) -> web.Response:
    retry = {"Retry-After": "1"} if error.status in (429, 503) else None
    return _json_response(error.status, error.body, retry)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@dataclass(frozen=True, slots=True)
class _Model:
    """The served model as the front door uses it. ``strip_bos``: the bos text a rendered chat
    prompt must lose because the tokenizer adds the bos token itself."""

    info: BackendInfo
    tokenizer: Tokenizer | None
    template: ChatTemplate | None
    strip_bos: str

    @classmethod
    def of(cls, info: BackendInfo) -> "_Model":
        tokenizer = load_tokenizer(info.tokenizer_json)
        template = None
        try:
            template = ChatTemplate.from_tokenizer_config(info.tokenizer_config)
        except Exception as exc:  # noqa: BLE001 - a broken template disables chat only
            log.warning("the model's chat template cannot be used: %s", exc)
        strip = ""
        if template is not None and tokenizer is not None and template.bos_token:
            if tokenizer.encode("").ids[:1] == [tokenizer.token_to_id(template.bos_token)]:
                strip = template.bos_token
        return cls(info, tokenizer, template, strip)


class HttpFrontDoor:
    """The HTTP server; ``start`` binds ``host``:``port`` (0: any free port, see ``port``)."""

    def __init__(self, service: SchedulerService, registry: CollectorRegistry, host: str,
                 port: int, *, ssl_context: ssl.SSLContext | None = None,
                 intake: Intake | None = None):
        self.service = service
        self._intake = intake if intake is not None else Intake()
        self._registry = registry
        self._host, self._requested_port = host, port
        self._ssl = ssl_context
        self._runner: web.AppRunner | None = None
        self._detector = TaskDetector(service.config.tasks, service.config.default_task)
        self._model: _Model | None = None
        self._created = int(time.time())
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware],
                              client_max_size=self.service.config.max_message_bytes)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._model_entry)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._requested_port, ssl_context=self._ssl,
                           reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise ConfigError(f"--http-port: cannot listen on {self._host}:{self._requested_port}: "
                              f"{exc.strerror or exc}") from None
        self.port = self._runner.addresses[0][1]
        scheme = "https" if self._ssl is not None else "http"
        log.info("OpenAI-compatible HTTP on %s://%s:%d/v1", scheme, self._host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- plumbing ----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        """Maps every failure to an OpenAI error."""
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own: 404, 405, ...
            if exc.status < 400:
                raise
            return _error_response(HttpError(exc.status, f"{exc.reason}: {request.method} "
                                                         f"{request.path}"))
        except Exception as exc:  # noqa: BLE001 - the one place that maps them all
            return _error_response(_http_error(exc))

    def _caller(self, request: web.Request) -> Identity:
        """Who sent ``request`` (Unauthenticated without a valid token when auth is on)."""
        return self.service.identity(request.headers.get("Authorization"))

    def _served(self) -> _Model:
        """The served model, once an engine is warm (Unavailable before)."""
        if self._model is None:
            if not self.service.model_known:
                raise Unavailable("the engine is not warm yet")
            self._model = _Model.of(next(r.info for r in self.service.replicas
                                         if r.info is not None))
        return self._model

    async def _body(self, request: web.Request) -> Any:
        """The request's JSON body, read and parsed in a receive slot (emoe.rpc.intake)."""
        async with self._intake.slot():
            raw = await self._intake.read(request.read())
            try:
                return json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                error = InvalidArgument("body", f"not valid JSON: {exc}")
        raise error

    # -- endpoints ---------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        serving, why = self.service.health()
        if serving and self.service.model_known:
            return _json_response(200, {"status": "serving"})
        return _json_response(503, {"status": "not serving",
                                    "reason": why or "the engine is not warm yet"},
                              {"Retry-After": "1"})

    async def _metrics(self, request: web.Request) -> web.Response:
        if not self._caller(request).admin:  # as on --metrics-port
            raise HttpError(403, "an admin bearer token is required")
        return web.Response(body=generate_latest(self._registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _model_object(self) -> dict[str, Any]:
        info = self._served().info
        config = self.service.config
        return {"id": info.model.name, "object": "model", "created": self._created,
                "owned_by": "emoe",
                "max_model_len": info.max_context,
                "emoe": {"vocab_size": info.vocab_size, "eos_token_id": info.eos_token_id,
                         "num_layers": info.model.num_layers,
                         "num_experts": info.model.num_experts, "top_k": info.model.top_k,
                         "policy": config.policy, "default_task": config.default_task,
                         "default_max_tokens": config.default_max_tokens,
                         "chat_template": self._served().template is not None,
                         "tasks": {t.name: {"ttft_s": t.slo.ttft_s, "tpot_s": t.slo.tpot_s}
                                   for t in config.tasks.values()}}}

    async def _models(self, request: web.Request) -> web.Response:
        self._caller(request)
        return _json_response(200, {"object": "list", "data": [self._model_object()]})

    async def _model_entry(self, request: web.Request) -> web.Response:
        self._caller(request)
        name = request.match_info["model"]
        if name != self._served().info.model.name:
            raise HttpError(404, f"the model {clip(name)} does not exist", "model",
                            "model_not_found")
        return _json_response(200, self._model_object())

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    # -- generation --------------------------------------------------------------------------

    def _generate_request(self, p: Params, request_id: str):
        served = self._served()
        info, template = served.info, served.template
        if p.model is not None and p.model != info.model.name:
            raise HttpError(404, f"the model {clip(p.model)} does not exist; this server serves "
                                 f"{info.model.name!r}", "model", "model_not_found")
        task, prompt = p.task, p.prompt
        if p.chat:
            if template is None:
                raise InvalidArgument("messages", f"the model {info.model.name} has no chat "
                                                  "template; use /v1/completions")
            if not task:
                task = self._detector.detect(" ".join(m["content"] for m in p.messages
                                                      if m["role"] == "user"))
            try:
                prompt = template.render(p.messages, task=task)
            except ChatTemplateError as exc:
                raise InvalidArgument("messages", str(exc)) from None
            if served.strip_bos and prompt.startswith(served.strip_bos):
                prompt = prompt[len(served.strip_bos):]
        if p.stop and served.tokenizer is None:
            raise InvalidArgument("stop", f"the model {info.model.name} serves token ids only "
                                          "(no tokenizer); use stop_token_ids")
        return generate_request(
            prompt, request_id=request_id, task=task, ttft_s=p.ttft_slo_s, tpot_s=p.tpot_slo_s,
            max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
            seed=p.seed, stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos,
            priority=p.priority)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        params = None
        try:
            caller = self._caller(request)
            params = parse(await self._body(request), chat)
            request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            submission = await self.service.submission(
                self._generate_request(params, request_id), caller)
            stream = self.service.admit(submission)
        except Exception as exc:  # noqa: BLE001 - mapped with the body's parameter names
            return _error_response(_http_error(exc, params))
        try:
            if params.stream:
                return await self._stream(request, params, stream)
            return await self._whole(params, stream)
        finally:
            if not stream.done:  # the client went away (or a write failed)
                stream.replica.abort(stream, Outcome.ABORTED, None)

    @staticmethod
    def _emoe(stream: RequestStream) -> dict[str, Any]:
        queue, ttft, tpot, total = stream.timings()
        return {"task": stream.submission.task, "queue_s": queue, "ttft_s": ttft,
                "tpot_s": tpot, "total_s": total, "slo_met": stream.slo_met(),
                "expert_hits": stream.expert_hits, "expert_misses": stream.expert_misses}

    async def _pieces(self, p: Params, stream: RequestStream
                      ) -> AsyncIterator[tuple[str, list[int], str | None, dict | None]]:
        """(text, its token ids, finish reason, emoe's report) per piece of the request's
        output, the last with its finish reason and report; stop strings cut it short (the
        request then finishes at once)."""
        stops = OutputText(self._served().tokenizer, p.stop) if p.stop else None
        async with contextlib.aclosing(self.service.outputs(stream)) as outputs:
            async for out in outputs:
                final = out.completion is not None
                text, ids = out.text, out.token_ids
                if stops is not None:
                    text, used = stops.add(ids, final=final)
                    ids = ids[:used]
                    if stops.stopped:
                        stream.replica.abort(stream, Outcome.FINISHED, None)
                        yield text, ids, "stop", self._emoe(stream)
                        return
                if final:
                    yield text, ids, _FINISH.get(out.completion.finish_reason, "stop"), \
                        self._emoe(stream)
                    return
                yield text, ids, None, None

    async def _whole(self, p: Params, stream: RequestStream) -> web.Response:
        texts: list[str] = []
        token_ids: list[int] = []
        reason = report = None
        try:
            async for text, ids, reason, report in self._pieces(p, stream):
                texts.append(text)
                token_ids.extend(ids)
        except Exception as exc:  # noqa: BLE001
            return _error_response(_http_error(exc, p))
        body = response(
            p, stream.submission.request_id, int(time.time()), self._served().info.model.name,
            [choice(p, "".join(texts), reason, token_ids, streamed=False)],
            streamed=False, usage_=usage(len(stream.submission.prompt), len(token_ids)),
            emoe=report)
        return _json_response(200, body, {"X-Request-Id": stream.submission.request_id})

    async def _stream(self, request: web.Request, p: Params,
                      stream: RequestStream) -> web.StreamResponse:
        """Server-sent events; the headers go out with the first tokens, so a request refused
        before then (rejected by the scheduler, its engine lost) still gets its status."""
        out = web.StreamResponse(headers={**_SSE_HEADERS, "X-Request-Id": stream.submission.request_id})
        try:
            async for payload in self._sse_payloads(p, stream):
                if not out.prepared:
                    await out.prepare(request)
                await out.write(payload)
            await out.write_eof()
        except ConnectionError:  # the client went away; _generate aborts the request
            pass
        except Exception as exc:  # noqa: BLE001
            error = _http_error(exc, p)
            if not out.prepared:
                return _error_response(error)
            try:
                await out.write(_sse(error.body) + _DONE)
                await out.write_eof()
            except ConnectionError:
                pass
        return out

    async def _sse_payloads(self, p: Params, stream: RequestStream) -> AsyncIterator[bytes]:
        """The output as SSE bytes, one item per piece; the last ends with the usage chunk (if
        asked for) and ``[DONE]``."""
        created, model = int(time.time()), self._served().info.model.name
        completion_tokens = 0
        first = True
        async for text, ids, reason, report in self._pieces(p, stream):
            completion_tokens += len(ids)
            if not (text or ids or reason):
                continue
            payload = _sse(response(p, stream.submission.request_id, created, model,
                                    [choice(p, text, reason, ids, streamed=True, first=first)],
                                    streamed=True, emoe=report))
            first = False
            if reason is not None:
                if p.include_usage:
                    payload += _sse(response(
                        p, stream.submission.request_id, created, model, [], streamed=True,
                        usage_=usage(len(stream.submission.prompt), completion_tokens)))
                payload += _DONE
            yield payload

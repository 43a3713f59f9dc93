"""The OpenAI-compatible HTTP front door on the no-work backend, through the official `openai`
client: response shapes, stop strings, and every kind of error with its status and parameter.
(The same on the reference model: test_http_engine.py.)"""

from __future__ import annotations

import asyncio
import io
import shutil
import socket
import ssl
from contextlib import asynccontextmanager

import aiohttp
import grpc
import openai
import pytest

from emoe.core.errors import ConfigError
from emoe.core.policy_file import PolicyConfig
from emoe.core.specs import get_hardware
from emoe.rpc.backend import BackendUnavailable
from emoe.rpc.fake import FakeBackend
from emoe.rpc.auth import TokenTable
from emoe.rpc.service import DEFAULT_MAX_MESSAGE_BYTES
from emoe.rpc.remote import RemoteBackend
from emoe.rpc.server import Listen, SchedulerServer, WorkerServer

from .conftest import connected, serving
from .test_security import TOKENS, self_signed

pytestmark = pytest.mark.anyio

MODEL = "fake-moe"


def client(server, **kwargs) -> openai.AsyncOpenAI:
    kwargs.setdefault("api_key", "none")
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", max_retries=0,
                              **kwargs)


@asynccontextmanager
async def http_serving(backends=None, **kwargs):
    async with serving(backends, http_port=0, **kwargs) as server:
        yield server


async def create(server, kind: str = "completions", api_key: str = "none", **body):
    """One call of ``client.<kind>.create(**body)`` (a stream is read to its end)."""
    async with client(server, api_key=api_key) as c:
        endpoint = c.completions if kind == "completions" else c.chat.completions
        result = await endpoint.create(**body)
        if body.get("stream"):
            return [chunk async for chunk in result]
        return result


async def get(server, path: str, **kwargs) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.http_port}{path}", **kwargs) as r:
            return r.status, await r.json(content_type=None), dict(r.headers)


async def post(server, path: str, **kwargs) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{server.http_port}{path}", **kwargs) as r:
            return r.status, await r.json(content_type=None)


async def test_completion_whole_and_streamed_agree_and_usage_counts_the_streamed_tokens():
    async with http_serving() as server:
        async with client(server) as c:
            whole = await c.completions.create(model=MODEL, prompt="hello", max_tokens=7, seed=3,
                                               extra_body={"return_token_ids": True})
            chunks = [chunk async for chunk in await c.completions.create(
                model=MODEL, prompt="hello", max_tokens=7, seed=3, stream=True,
                stream_options={"include_usage": True}, extra_body={"return_token_ids": True})]
            models = await c.models.list()
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == 5 and whole.usage.completion_tokens == 7
    assert len(whole.choices[0].token_ids) == 7
    *content, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 7
    assert all(chunk.usage is None for chunk in content)
    assert "".join(ch.choices[0].text for ch in content) == whole.choices[0].text
    assert sum(len(ch.choices[0].token_ids) for ch in content) == last.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in content][-1] == "length"
    assert content[-1].emoe["task"] == "conversation" and content[-1].emoe["ttft_s"] > 0
    assert models.data[0].id == MODEL and models.data[0].max_model_len == 4096


async def test_chat_completion_whole_and_streamed():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    async with http_serving() as server:
        async with client(server) as c:
            whole = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
            chunks = [chunk async for chunk in await c.chat.completions.create(
                model=MODEL, messages=messages, max_completion_tokens=4, stream=True)]
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    # the fake backend's template: "system: be brief\nuser: hi\nassistant:" in bytes
    assert whole.usage.prompt_tokens == len("system: be brief\nuser: hi\nassistant:")
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_stop_strings_end_the_output_before_the_stop_and_count_its_last_token():
    # The fake backend's output for a 5-byte prompt starts "&'()*+,"; one token per byte.
    async with http_serving() as server:
        async with client(server) as c:
            plain = await c.completions.create(model=MODEL, prompt="hello", max_tokens=7)
            stopped = await c.completions.create(model=MODEL, prompt="hello", max_tokens=7,
                                                 stop=["()"])
            streamed = [ch async for ch in await c.completions.create(
                model=MODEL, prompt="hello", max_tokens=7, stop=["+", "()"], stream=True,
                stream_options={"include_usage": True})]
            never = await c.completions.create(model=MODEL, prompt="hello", max_tokens=7, stop="zz")
            await asyncio.sleep(0.05)
            assert server.service.load()[:2] == (0, 0)
    assert plain.choices[0].text == "&'()*+,"
    assert stopped.choices[0].text == "&'" and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == 4  # up to the ")" that completed the stop
    assert "".join(ch.choices[0].text for ch in streamed[:-1]) == "&'"
    assert streamed[-2].choices[0].finish_reason == "stop"
    assert streamed[-1].usage.completion_tokens == 4
    assert never.choices[0].text == plain.choices[0].text
    assert never.choices[0].finish_reason == "length"


@pytest.mark.parametrize("fields, param", [
    (dict(n=2), "n"),
    (dict(logprobs=2), "logprobs"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=5000), "max_tokens"),  # prompt + max_tokens beyond the 4096-token context
    (dict(temperature=-1), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(seed=-1), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(prompt=["one", "two"]), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=[3, 4, 9999]), "prompt[2]"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(extra_body={"task": "poetry"}), "task"),
    (dict(extra_body={"slo": {"ttft_s": 0}}), "slo.ttft_s"),
    (dict(extra_body={"min_tokens": 3}), "min_tokens"),
    (dict(extra_body={"priority": "high"}), "priority"),
])
async def test_bad_completion_parameters_are_400_naming_the_parameter(fields, param):
    body = dict(model=MODEL, prompt="hello", max_tokens=3)
    body.update(fields)
    async with http_serving() as server:
        with pytest.raises(openai.BadRequestError) as err:
            await create(server, **body)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
    assert err.value.body["message"].startswith(param + ":")


@pytest.mark.parametrize("messages, fields, param", [
    ([], {}, "messages"),
    ([{"role": "tool", "content": "x"}], {}, "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {},
     "messages[0].content[0].type"),
    ([{"role": "user", "content": "hi"}], dict(max_completion_tokens=0), "max_completion_tokens"),
    ([{"role": "user", "content": "hi"}], dict(logprobs=True), "logprobs"),
    ([{"role": "user", "content": "hi"}],
     dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
])
async def test_bad_chat_parameters_are_400_naming_the_parameter(messages, fields, param):
    async with http_serving() as server:
        with pytest.raises(openai.BadRequestError) as err:
            await create(server, "chat", model=MODEL, messages=messages, **fields)
    assert err.value.body["param"] == param


async def test_unknown_model_is_404_and_bad_bodies_are_400():
    async with http_serving() as server:
        with pytest.raises(openai.NotFoundError) as err:
            await create(server, model="gpt-4", prompt="hi")
        not_json = await post(server, "/v1/completions", data=b"{nope")
        not_object = await post(server, "/v1/completions", json=[1, 2])
        too_big = await post(server, "/v1/completions", data=io.BytesIO(b" " * (DEFAULT_MAX_MESSAGE_BYTES + 1)))
        no_route = await get(server, "/v2/everything")
        wrong_method = await get(server, "/v1/completions")
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    assert not_json[0] == 400 and not_json[1]["error"]["param"] == "body"
    assert not_object[0] == 400 and not_object[1]["error"]["param"] == "body"
    assert too_big[0] == 413 and "error" in too_big[1]
    assert no_route[0] == 404 and no_route[1]["error"]["type"] == "not_found_error"
    assert wrong_method[0] == 405 and "error" in wrong_method[1]


async def test_bearer_token_required_except_for_health():
    async with http_serving(listen=Listen(port=0, auth=TokenTable.single("s3cret"))) as server:
        missing = await post(server, "/v1/completions", json={"model": MODEL, "prompt": "hi"})
        with pytest.raises(openai.AuthenticationError) as wrong:
            await create(server, api_key="wrong", model=MODEL, prompt="hi")
        ok = await create(server, api_key="s3cret", model=MODEL, prompt="hi", max_tokens=2)
        health = await get(server, "/health")
        metrics_anonymous = (await get(server, "/metrics"))[0]
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as s:
            async with s.get(f"http://127.0.0.1:{server.http_port}/metrics") as r:
                metrics = r.status, await r.text()
    assert missing[0] == wrong.value.status_code == 401
    assert missing[1]["error"]["type"] == "authentication_error"
    assert wrong.value.body["code"] == "invalid_api_key"
    assert ok.usage.completion_tokens == 2
    assert health[0] == 200 and metrics_anonymous == 401
    assert metrics[0] == 200 and 'emoe_requests_total{outcome="finished"' in metrics[1]


async def test_queue_full_is_429_with_retry_after():
    backend = FakeBackend(step_delay_s=0.05, max_running=1)
    async with http_serving([backend], max_queue=1) as server:
        async with client(server) as c:
            running = asyncio.create_task(c.completions.create(model=MODEL, prompt="a", max_tokens=20))
            await asyncio.sleep(0.2)
            waiting = asyncio.create_task(c.completions.create(model=MODEL, prompt="b", max_tokens=2))
            await asyncio.sleep(0.1)
            with pytest.raises(openai.RateLimitError) as err:
                await c.completions.create(model=MODEL, prompt="c", max_tokens=2)
            results = await asyncio.gather(running, waiting)
    assert err.value.status_code == 429 and err.value.response.headers["Retry-After"] == "1"
    assert "queue full" in err.value.body["message"]
    assert [r.usage.completion_tokens for r in results] == [20, 2]


class _SlowStart(FakeBackend):
    def __init__(self):
        super().__init__()
        self.go = asyncio.Event()

    async def start(self):
        await self.go.wait()
        return await super().start()


async def test_health_and_requests_are_503_until_warm_and_while_draining():
    backend = _SlowStart()
    async with http_serving([backend], wait=False) as server:
        cold_health = await get(server, "/health")
        with pytest.raises(openai.InternalServerError) as cold:
            await create(server, model=MODEL, prompt="hi")
        cold_models = await get(server, "/v1/models")
        backend.go.set()
        await server.wait_serving()
        warm_health = await get(server, "/health")
        server.service.start_draining()
        draining_health = await get(server, "/health")
        with pytest.raises(openai.InternalServerError) as draining:
            await create(server, model=MODEL, prompt="hi")
    assert cold_health[0] == 503 and cold_health[1]["status"] == "not serving"
    assert cold.value.status_code == 503 and "not warm" in cold.value.body["message"]
    assert cold_models[0] == 503
    assert warm_health[0] == 200
    assert draining_health[0] == 503 and "draining" in draining_health[1]["reason"]
    assert draining.value.status_code == 503 and "draining" in draining.value.body["message"]


class _LostAfter(FakeBackend):
    """An engine that is lost at its ``steps``-th step."""

    def __init__(self, steps: int):
        super().__init__(step_delay_s=0.01)
        self.steps = steps

    async def execute(self, plan):
        self.steps -= 1
        if self.steps == 0:
            raise BackendUnavailable("worker gone")
        return await super().execute(plan)


async def test_an_engine_lost_before_the_first_token_gets_its_status_even_when_streaming():
    async with http_serving([_LostAfter(steps=1)]) as server:
        with pytest.raises(openai.InternalServerError) as err:
            await create(server, model=MODEL, prompt="hi", max_tokens=5, stream=True)
    assert err.value.status_code == 503 and "lost" in err.value.body["message"]


async def test_an_engine_lost_mid_stream_ends_the_stream_with_an_error_event():
    async with http_serving([_LostAfter(steps=4)]) as server:
        texts = []
        async with client(server) as c:
            stream = await c.completions.create(model=MODEL, prompt="hi", max_tokens=50,
                                                stream=True)
            with pytest.raises(openai.APIError) as err:
                async for chunk in stream:
                    texts.append(chunk.choices[0].text)
    assert texts  # tokens came before the loss
    assert "lost" in err.value.message


async def test_an_internal_error_is_500_with_an_incident_id_and_no_traceback(monkeypatch):
    async with http_serving() as server:
        def broken(submission):
            raise RuntimeError("secret detail")

        monkeypatch.setattr(server.service, "admit", broken)
        with pytest.raises(openai.InternalServerError) as err:
            await create(server, model=MODEL, prompt="hi")
    assert err.value.status_code == 500
    assert "incident" in err.value.body["message"]
    assert "secret" not in err.value.response.text and "Traceback" not in err.value.response.text


async def test_a_client_that_goes_away_mid_stream_frees_its_slot():
    backend = FakeBackend(step_delay_s=0.005, max_running=2)
    async with http_serving([backend]) as server:
        async with client(server) as c:
            for _ in range(2):
                stream = await c.completions.create(model=MODEL, prompt="hi", max_tokens=3000,
                                                    stream=True)
                async for _ in stream:
                    break
                await stream.close()
            for _ in range(200):
                if backend.num_requests == 0:
                    break
                await asyncio.sleep(0.01)
            assert backend.num_requests == 0 and server.service.load()[:2] == (0, 0)
            burst = await asyncio.gather(*(c.completions.create(model=MODEL, prompt="hi",
                                                                max_tokens=5) for _ in range(2)))
    assert [r.usage.completion_tokens for r in burst] == [5, 5]


async def test_drain_lets_streams_in_flight_finish_and_refuses_new_requests():
    backend = FakeBackend(step_delay_s=0.01)
    async with http_serving([backend]) as server, client(server) as c:
        stream = await c.completions.create(model=MODEL, prompt="hi", max_tokens=40, stream=True)
        first = await stream.__anext__()
        drain = asyncio.create_task(server.drain(grace_s=20))
        await asyncio.sleep(0.05)
        health = await get(server, "/health")
        with pytest.raises(openai.InternalServerError) as refused:
            await c.completions.create(model=MODEL, prompt="hi", max_tokens=1)
        rest = [chunk async for chunk in stream]
        await asyncio.wait_for(drain, 10)
    assert health[0] == 503 and refused.value.status_code == 503
    assert len(first.choices[0].text + "".join(ch.choices[0].text for ch in rest)) == 40
    assert rest[-1].choices[0].finish_reason == "length"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
async def test_tls_serves_https_with_the_grpc_certificate(tmp_path):
    cert, key = self_signed(tmp_path)
    async with http_serving(listen=Listen(port=0, tls_cert=cert, tls_key=key)) as server:
        trusted = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as session:
            async with session.post(f"https://localhost:{server.http_port}/v1/completions",
                                    json={"prompt": "hi", "max_tokens": 2}, ssl=trusted) as r:
                body = await r.json()
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://localhost:{server.http_port}/health") as r:
                    await r.read()
    assert body["usage"]["completion_tokens"] == 2


async def test_chat_over_a_remote_worker_uses_the_template_it_reports():
    worker = WorkerServer(FakeBackend(), Listen(port=0))
    await worker.start()
    try:
        async with http_serving([RemoteBackend(f"127.0.0.1:{worker.port}")]) as server:
            result = await create(server, "chat", model=MODEL, max_tokens=2,
                                  messages=[{"role": "user", "content": "hi"}])
    finally:
        await worker.stop()
    assert result.usage.prompt_tokens == len("user: hi\nassistant:")


async def test_a_taken_http_port_is_a_config_error_naming_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = SchedulerServer([FakeBackend()], PolicyConfig(), get_hardware("a100-40gb"),
                                 Listen(port=0), http_port=taken.getsockname()[1])
        with pytest.raises(ConfigError, match="--http-port: cannot listen"):
            await server.start()


async def metrics_status(server, token: str) -> int:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session:
        async with session.get(f"http://127.0.0.1:{server.http_port}/metrics") as r:
            await r.read()
            return r.status


async def test_http_requests_belong_to_the_callers_identity():
    backend = FakeBackend(step_delay_s=0.01)
    listen = Listen(port=0, auth=TokenTable.parse(TOKENS, "tokens"))
    async with http_serving([backend], listen=listen) as server, \
            client(server, api_key="tok-alice") as alice:
        stream = await alice.completions.create(model=MODEL, prompt="hi", max_tokens=3000,
                                                stream=True)
        first = await stream.__anext__()
        async with connected(server, auth_token="tok-bob") as bob:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await bob.abort(first.id)
            bob_stats = await bob.stats()
        async with connected(server, auth_token="tok-alice") as alice_grpc:
            alice_stats = await alice_grpc.stats()
            await alice_grpc.abort(first.id)
        rest = [chunk async for chunk in stream]
        metrics_alice, metrics_ops = [await metrics_status(server, token)
                                      for token in ("tok-alice", "tok-ops")]
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert (bob_stats.running, alice_stats.running) == (0, 1)
    assert rest[-1].choices[0].finish_reason == "abort"
    assert (metrics_alice, metrics_ops) == (403, 200)

"""`emoe serve --http-port` on the reference model (the real engine), through the official
`openai` client: answers equal to the engine's own, usage equal to the tokens streamed, errors,
a client going away mid-stream, 64 concurrent streaming clients, and replay over HTTP."""

from __future__ import annotations

import asyncio
import csv
import json
import random
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emoe.cli import main as emoe_main
from emoe.core.metrics import REQUEST_COLUMNS
from emoe.rpc.client import EmoeClient
from emoe.rpc.local import REFERENCE_CHECKPOINT

from .conftest import REPO, free_port

MODEL = "emoe-tiny"
SLOTS = 8
CONTEXT = 256
STARTUP_S = 180


@dataclass(frozen=True)
class Served:
    grpc_port: int
    http_port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, name: str) -> float:
        """The sum of a Prometheus metric's samples whose line starts with ``name``."""
        text = self.get("/metrics")[1]
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    served = Served(free_port(), free_port(), log)
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "emoe", "serve", "--port", str(served.grpc_port),
             "--http-port", str(served.http_port), "--metrics-port", "0",
             "--max-batch-size", str(SLOTS), "--log-level", "WARNING"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"emoe serve exited {process.returncode}: {log.read_text()}")
            try:
                if served.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"emoe serve not healthy after {STARTUP_S} s: {log.read_text()}")
            time.sleep(0.2)
        yield served
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def offline():
    """Greedy continuation of a prompt text by the engine in this process, as token ids."""
    from emoe.engine.engine import Engine
    from emoe.engine.sampling import SamplingParams
    from emoe.engine.tokenizer import Tokenizer

    engine = Engine.from_pretrained(REFERENCE_CHECKPOINT, max_batch_size=1)
    tokenizer = Tokenizer.from_folder(REFERENCE_CHECKPOINT)

    def generate(prompt: str, max_tokens: int) -> tuple[list[int], str, str, int]:
        """(output token ids, their text, finish reason, prompt tokens)."""
        ids = tokenizer.encode(prompt)
        out = engine.generate([ids], SamplingParams(max_new_tokens=max_tokens, temperature=0.0))[0]
        finish = "stop" if out.finish_reason == "stop" else "length"
        return out.token_ids, tokenizer.decode(out.token_ids), finish, len(ids)

    return generate


def sync_client(server: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)


def async_client(server: Served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0)


CONVERSATION = [{"role": "user", "content": "hello, I am Karl from Bergen."},
                {"role": "assistant", "content": "hello Karl, nice to meet you."},
                {"role": "user", "content": "please remind me of my name."}]
CONVERSATION_PROMPT = ("chat with the bot.\nuser: hello, I am Karl from Bergen.\n"
                       "bot: hello Karl, nice to meet you.\nuser: please remind me of my name.\nbot:")
REVIEW = "Sam said the piano from Prague was not lovely."
REVIEW_PROMPT = f"classify the sentiment of the review.\nreview: {REVIEW}\nlabel:"


def _streamed(chunks, chat: bool) -> tuple[str, list[int], str | None, int]:
    """(text, token ids, finish reason, usage completion tokens) of a stream's chunks."""
    text, ids, reason = "", [], None
    for chunk in chunks[:-1]:
        c = chunk.choices[0]
        text += (c.delta.content or "") if chat else c.text
        ids += c.token_ids
        reason = c.finish_reason or reason
    assert chunks[-1].choices == []
    return text, ids, reason, chunks[-1].usage.completion_tokens


def test_completion_whole_and_streamed_equal_the_engine_offline(server, offline):
    ids, text, finish, prompt_tokens = offline(REVIEW_PROMPT, 16)
    body = dict(model=MODEL, prompt=REVIEW_PROMPT, max_tokens=16, temperature=0,
                extra_body={"return_token_ids": True})
    with sync_client(server) as client:
        whole = client.completions.create(**body)
        chunks = list(client.completions.create(**body, stream=True,
                                                stream_options={"include_usage": True}))
    assert whole.choices[0].token_ids == ids and whole.choices[0].text == text
    assert whole.choices[0].finish_reason == finish
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, len(ids))
    assert _streamed(chunks, chat=False) == (text, ids, finish, len(ids))
    assert whole.emoe["task"] == "classification"
    assert text.strip() == "negative"


def test_chat_whole_and_streamed_equal_the_engine_offline_on_the_templated_prompt(server, offline):
    with sync_client(server) as client:
        for messages, task, prompt in ((CONVERSATION, None, CONVERSATION_PROMPT),
                                       ([{"role": "user", "content": REVIEW}], "classification",
                                        REVIEW_PROMPT)):
            ids, text, finish, prompt_tokens = offline(prompt, 16)
            extra = {"return_token_ids": True, **({"task": task} if task else {})}
            whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                                   temperature=0, extra_body=extra)
            chunks = list(client.chat.completions.create(
                model=MODEL, messages=messages, max_completion_tokens=16, temperature=0,
                extra_body=extra, stream=True, stream_options={"include_usage": True}))
            assert whole.choices[0].message.content == text
            assert whole.choices[0].token_ids == ids
            assert whole.usage.completion_tokens == len(ids)
            assert whole.usage.prompt_tokens == prompt_tokens
            assert _streamed(chunks, chat=True) == (text, ids, finish, len(ids))
            assert chunks[0].choices[0].delta.role == "assistant"
    assert whole.emoe["task"] == "classification"
    assert offline(CONVERSATION_PROMPT, 16)[1] == " your name is Karl."


@pytest.mark.parametrize("fields, param", [
    (dict(max_tokens=CONTEXT), "max_tokens"),  # prompt + max_tokens beyond the context
    (dict(prompt="hello " * CONTEXT), "prompt"),  # the prompt alone fills the context
    (dict(n=3), "n"),
    (dict(extra_body={"task": "poetry"}), "task"),
])
def test_bad_input_on_the_engine_is_400_naming_the_parameter(server, fields, param):
    body = dict(model=MODEL, prompt=REVIEW_PROMPT, max_tokens=4)
    body.update(fields)
    with sync_client(server) as client, pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**body)
    assert err.value.body["param"] == param


@pytest.mark.anyio
async def test_a_client_gone_mid_stream_frees_its_slot_and_a_full_burst_is_admitted(server):
    aborted = server.metric('emoe_requests_total{outcome="aborted"')
    async with async_client(server) as client:
        streams = [await client.completions.create(
            model=MODEL, prompt=[3 + i, 40, 50], max_tokens=CONTEXT - 4, stream=True,
            extra_body={"ignore_eos": True}) for i in range(SLOTS)]
        for stream in streams:
            await stream.__anext__()
        for stream in streams:
            await stream.close()
        for _ in range(200):
            if server.metric("emoe_requests_running") == server.metric("emoe_requests_waiting") == 0:
                break
            await asyncio.sleep(0.05)
        # each ended as aborted, not by running to its last token
        assert server.metric('emoe_requests_total{outcome="aborted"') - aborted == SLOTS
        assert server.metric("emoe_requests_running") == 0
        burst = await asyncio.gather(*(client.completions.create(
            model=MODEL, prompt=[3 + i, 7], max_tokens=6, extra_body={"ignore_eos": True})
            for i in range(SLOTS)))
    assert [r.usage.completion_tokens for r in burst] == [6] * SLOTS


CLIENTS = 64
DURATION_S = 4.0


@pytest.mark.anyio
async def test_64_concurrent_streaming_clients_every_request_ends_once(server):
    outcomes: dict[str, str] = {}

    async def client_loop(n: int, client: openai.AsyncOpenAI) -> None:
        rng = random.Random(n)
        deadline = time.monotonic() + DURATION_S
        while time.monotonic() < deadline:
            max_tokens = rng.randint(1, 12)
            leave_early = rng.random() < 0.05
            key = f"{n}-{len(outcomes)}-{rng.random()}"
            try:
                stream = await client.completions.create(
                    model=MODEL, prompt=[rng.randint(3, 959) for _ in range(rng.randint(1, 32))],
                    max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
                    extra_body={"return_token_ids": True, "ignore_eos": rng.random() < 0.5})
                tokens, reason, used = 0, None, None
                async for chunk in stream:
                    if chunk.usage is not None:
                        used = chunk.usage.completion_tokens
                    for c in chunk.choices:
                        tokens += len(c.token_ids)
                        reason = c.finish_reason or reason
                    if leave_early and tokens:
                        await stream.close()
                        reason = "left"
                        break
                if reason != "left":
                    assert used == tokens <= max_tokens and reason in ("stop", "length")
                outcome = reason
            except openai.APIError as exc:
                outcome = f"error: {exc}"
            assert key not in outcomes
            outcomes[key] = outcome

    async with EmoeClient(f"127.0.0.1:{server.grpc_port}") as grpc_client:
        before = await grpc_client.stats()
        async with async_client(server) as client:
            await asyncio.wait_for(asyncio.gather(*(client_loop(n, client) for n in range(CLIENTS))),
                                   DURATION_S + 60)
        for _ in range(200):
            stats = await grpc_client.stats()
            if (stats.waiting, stats.running) == (0, 0):
                break
            await asyncio.sleep(0.05)

    def total(s, name):
        return sum(getattr(t, name) for t in s.tasks)

    submitted = total(stats, "submitted") - total(before, "submitted")
    ended = sum(total(stats, k) - total(before, k) for k in ("finished", "aborted", "failed"))
    assert len(outcomes) >= CLIENTS
    assert set(outcomes.values()) <= {"stop", "length", "left"}, \
        [o for o in outcomes.values() if o.startswith("error")][:3]
    assert submitted == ended == len(outcomes)
    assert total(stats, "failed") == total(before, "failed")
    assert (stats.waiting, stats.running) == (0, 0)
    assert server.get("/health")[0] == 200


def test_replay_over_http_writes_the_same_columns_as_over_grpc(server, tmp_path):
    trace = tmp_path / "trace.csv"
    rows = [(0.1 * i, 4 + 7 * i, 2 + i, task) for i, task in
            enumerate(["qa", "classification", "summarization", "conversation", "similarity",
                       "qa", "qa", "conversation"])]
    with trace.open("w", newline="") as f:
        csv.writer(f).writerows([("arrival_s", "input_tokens", "output_tokens", "task"), *rows])
    results = {}
    for name, target in (("grpc", f"127.0.0.1:{server.grpc_port}"), ("http", server.base_url)):
        out = tmp_path / f"{name}.csv"
        assert emoe_main(["replay", "--trace", str(trace), "--target", target,
                          "--out", str(out)]) == 0
        with out.open() as f:
            reader = csv.DictReader(f)
            assert tuple(reader.fieldnames) == REQUEST_COLUMNS
            results[name] = {r["id"]: r for r in reader}
    assert results["grpc"].keys() == results["http"].keys() == {str(i) for i in range(len(rows))}
    for i, (_, input_tokens, output_tokens, task) in enumerate(rows):
        for name in ("grpc", "http"):
            row = results[name][str(i)]
            assert row["status"] == "finished" and row["task"] == task, (name, row)
            assert int(row["input_tokens"]) == input_tokens
            # EOS ignored on both: every output has the trace's length
            assert int(row["generated_tokens"]) == int(row["output_tokens"]) == output_tokens
            assert re.fullmatch(r"[0-9.e-]+", row["admitted_at_s"]), (name, row)
            assert float(row["arrival_s"]) <= float(row["first_token_at_s"]) <= float(row["finished_at_s"])


def _fuzz_value():
    scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
               | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=16))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


FUZZ_KEYS = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
             "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n", "logprobs", "echo",
             "ignore_eos", "task", "slo", "priority", "return_token_ids", "stop_token_ids",
             "frequency_penalty", "response_format", "user", "unknown_field")


@st.composite
def bodies(draw) -> tuple[str, dict]:
    chat = draw(st.booleans())
    body = {"model": MODEL, "max_tokens": 2}
    if chat:
        body["messages"] = [{"role": "user", "content": draw(st.text(max_size=40))}]
    else:
        body["prompt"] = draw(st.text(max_size=40) | st.lists(st.integers(0, 1000), max_size=8))
    for key in draw(st.lists(st.sampled_from(FUZZ_KEYS), max_size=3)):
        value = draw(_fuzz_value() | st.integers(0, 12) | st.floats(0, 2)
                     | st.floats(0, 1e-3))  # tiny temperatures once crashed the engine step
        if key in ("max_tokens", "max_completion_tokens") and isinstance(value, int) \
                and 8 < value <= CONTEXT:
            value = 8  # long outputs only cost time
        body[key] = value
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=bodies())
def test_fuzzed_bodies_get_a_result_or_an_openai_error_never_a_500(server, case):
    path, body = case
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    assert status in (200, 400, 404), (status, text)
    if status != 200:
        error = json.loads(text)["error"]
        assert error["message"] and (status == 404 or error["param"]), error
    elif body.get("stream") is True:
        assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text, text
    else:
        assert json.loads(text)["choices"][0]["finish_reason"] in ("stop", "length")

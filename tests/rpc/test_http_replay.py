"""Replay over HTTP against servers that are not emoe: a strict OpenAI-like server that refuses
unknown fields and stops at its own EOS, and one that takes vLLM's min_tokens."""

from __future__ import annotations

import csv
import json
import logging

import pytest
from aiohttp import web

from emoe.core.metrics import REQUEST_COLUMNS
from emoe.rpc.http.replay import DEFAULT_VOCAB, HttpTarget
from emoe.rpc.replay import TargetModel, replay_file

pytestmark = pytest.mark.anyio

EOS_AFTER = 3  # the server's model "ends" after this many tokens unless forced


def foreign_server(accepts: set[str]) -> web.Application:
    """An OpenAI-compatible server: /v1/models without emoe's extension, streamed
    completions of text chunks (no token ids), usage only when asked for; request fields
    outside OpenAI's and ``accepts`` are refused with 400, as OpenAI does."""
    known = {"model", "prompt", "max_tokens", "stream", "stream_options"} | accepts

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "other-model", "object": "model", "max_model_len": 64}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        unknown = sorted(set(body) - known)
        if unknown:
            return web.json_response({"error": {
                "message": f"Unrecognized request argument supplied: {unknown[0]}",
                "type": "invalid_request_error", "param": None, "code": None}}, status=400)
        forced = body.get("ignore_eos") or body.get("min_tokens") == body["max_tokens"]
        n = body["max_tokens"] if forced else min(body["max_tokens"], EOS_AFTER)
        if not body.get("stream"):
            return web.json_response({"choices": [{"text": "x" * n, "finish_reason": "length"}]})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for i in range(n):
            reason = None if i < n - 1 else ("length" if n == body["max_tokens"] else "stop")
            chunk = {"choices": [{"index": 0, "text": "x", "finish_reason": reason}]}
            await out.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]),
                                              "completion_tokens": n}}
            await out.write(f"data: {json.dumps(usage)}\n\n".encode())
        await out.write(b"data: [DONE]\n\n")
        return out

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    return app


async def replay_against(accepts: set[str], tmp_path, caplog) -> tuple[HttpTarget, list[dict]]:
    runner = web.AppRunner(foreign_server(accepts))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens,task\n"
                     "0.0,5,2,qa\n0.01,8,6,qa\n0.02,40,10,conversation\n")
    out = tmp_path / "out.csv"
    target = HttpTarget(f"http://127.0.0.1:{runner.addresses[0][1]}")  # /v1 is added
    try:
        with caplog.at_level(logging.INFO):
            assert await target.model() == TargetModel("other-model", 64, DEFAULT_VOCAB)
            assert await replay_file(trace, target, out=out) == 0
    finally:
        await runner.cleanup()
    with out.open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == REQUEST_COLUMNS
        return target, sorted(reader, key=lambda r: int(r["id"]))


async def test_a_server_that_refuses_both_ways_of_forcing_lengths_reports_actual_lengths(
        tmp_path, caplog):
    target, rows = await replay_against(set(), tmp_path, caplog)
    assert target.force_length == "none"
    assert [r["status"] for r in rows] == ["finished"] * 3
    assert [int(r["output_tokens"]) for r in rows] == [2, 6, 10]
    assert [int(r["generated_tokens"]) for r in rows] == [2, 3, 3]  # from the usage
    assert [r["reason"] for r in rows] == ["length", "stop", "stop"]
    assert [int(r["input_tokens"]) for r in rows] == [5, 8, 40]
    assert all(r["admitted_at_s"] == "" and r["first_token_at_s"] != "" for r in rows)
    assert "2 finished requests generated fewer tokens than the trace asks" in caplog.text


async def test_a_server_that_takes_min_tokens_gets_the_trace_lengths(tmp_path, caplog):
    target, rows = await replay_against({"min_tokens"}, tmp_path, caplog)
    assert target.force_length == "min_tokens"
    assert [int(r["generated_tokens"]) for r in rows] == [2, 6, 10]
    assert "fewer tokens" not in caplog.text

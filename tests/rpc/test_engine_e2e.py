"""End to end on the torch engine: the reference model when it is built, else a tiny random
model of the same architecture written here."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from emoe.rpc.client import generate_request
from emoe.rpc.fake import byte_tokenizer
from emoe.rpc.local import REFERENCE_CHECKPOINT, LocalEngineBackend
from emoe.rpc.v1 import scheduler_pb2 as pb

from .conftest import connected, serving

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if (REFERENCE_CHECKPOINT / "config.json").is_file():
        return REFERENCE_CHECKPOINT
    import torch

    from emoe.engine.checkpoint import save_hf
    from emoe.engine.config import MoEConfig
    from emoe.engine.model import MoEModel

    config = MoEConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, num_experts=4, top_k=2,
                       max_position_embeddings=1024, bos_token_id=0, eos_token_ids=(1,))
    model = MoEModel(config).init_weights(generator=torch.Generator().manual_seed(0))
    return save_hf(model, tmp_path_factory.mktemp("tiny-moe"), tokenizer=byte_tokenizer())


def backend(checkpoint) -> LocalEngineBackend:
    return LocalEngineBackend(checkpoint, max_batch_size=4)


async def test_greedy_stream_matches_the_engine_offline(checkpoint):
    from emoe.engine.engine import Engine
    from emoe.engine.sampling import SamplingParams
    from emoe.engine.tokenizer import Tokenizer

    prompt = "Summarize: the cat sat on the mat."
    tokenizer = Tokenizer.from_folder(checkpoint)
    ids = tokenizer.encode(prompt)
    offline = Engine.from_pretrained(checkpoint, max_batch_size=1).generate(
        [ids], SamplingParams(max_new_tokens=12, temperature=0.0))[0]
    async with serving([backend(checkpoint)]) as server, connected(server) as client:
        responses = [r async for r in client.generate(prompt, max_tokens=12, temperature=0.0)]
        info = await client.server_info()
    tokens = [t for r in responses for t in r.token_ids]
    c = responses[-1].completion
    assert tokens == offline.token_ids
    assert "".join(r.text for r in responses) == tokenizer.decode(tokens)
    assert c.prompt_tokens == len(ids) and c.output_tokens == len(tokens)
    assert c.finish_reason == (pb.FINISH_REASON_STOP if offline.finish_reason == "stop"
                               else pb.FINISH_REASON_LENGTH)
    assert c.task == "summarization"
    assert info.model.max_context == offline_context(checkpoint)


def offline_context(checkpoint) -> int:
    from emoe.engine.checkpoint import load_config

    return load_config(checkpoint).max_position_embeddings


async def test_concurrent_requests_batch_and_all_finish(checkpoint):
    async with serving([backend(checkpoint)]) as server, connected(server) as client:
        results = await asyncio.gather(*(
            client.complete([3 + i, 40, 50], max_tokens=6, temperature=0.0, ignore_eos=True)
            for i in range(6)))  # more requests than the engine's 4 KV slots
    assert [r.completion.output_tokens for r in results] == [6] * 6


@pytest.mark.parametrize("how", ["abort", "deadline"])
async def test_abort_and_deadline_free_the_engine(checkpoint, how):
    engine_backend = backend(checkpoint)
    async with serving([engine_backend]) as server, connected(server) as client:
        engine = engine_backend._engine
        execute = engine.execute
        engine.execute = lambda plan: (time.sleep(0.01), execute(plan))[1]  # outlasts the deadline
        longest = offline_context(checkpoint) - 3
        call = client.stream(generate_request([3, 4, 5], request_id="long", max_tokens=longest,
                                              ignore_eos=True),
                             timeout=0.3 if how == "deadline" else None)
        await call.read()
        if how == "abort":
            await client.abort("long")
        last = None
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                last = response
        except grpc.aio.AioRpcError as exc:
            assert how == "deadline" and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            assert how == "abort" and last.completion.finish_reason == pb.FINISH_REASON_ABORTED
        for _ in range(500):
            if engine_backend._engine.num_requests == 0 and engine_backend._engine.cache.num_free == 4:
                break
            await asyncio.sleep(0.01)
        assert engine_backend._engine.num_requests == 0
        assert engine_backend._engine.cache.num_free == 4
        after = await client.complete([3], max_tokens=2, ignore_eos=True)
    assert after.completion.output_tokens == 2


@pytest.mark.parametrize("fields, field", [
    (dict(prompt=""), "text"),
    (dict(task="poetry"), "task"),
    (dict(ttft_s=-1.0), "slo.ttft_s"),
    (dict(tpot_s=0.0), "slo.tpot_s"),
    (dict(max_tokens=2**20), "sampling.max_tokens"),  # prompt + max_tokens beyond the context
])
async def test_bad_input_on_the_engine(checkpoint, fields, field):
    fields = dict(fields)
    prompt = fields.pop("prompt", "Classify the sentiment: a fine day")
    async with serving([backend(checkpoint)]) as server, connected(server) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete(prompt, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)

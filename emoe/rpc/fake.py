"""A backend that does no model work: for tests and the service benchmark.

It follows the step protocol exactly (prefill chunks complete a prompt, then one token per
decode; max tokens, stop tokens and EOS honoured) but its "model" is arithmetic: output
token i of a request is ``first + i`` cycled over the non-special byte tokens, where ``first``
depends on the prompt length and the seed. Its tokenizer is a real byte-level tokenizer.json,
so text prompts and streamed text work as they do with the reference model.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from emoe.core.plan import RequestStepOutput, StepPlan, StepResult
from emoe.core.specs import ModelSpec
from emoe.rpc.backend import BackendInfo, SamplingParams

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
EOS_ID = 1
# A plain "role: content" chat template, so chat completions work on this backend too.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "assistant:")

FAKE_MODEL = ModelSpec(
    name="fake-moe", num_layers=4, num_experts=8, top_k=2, expert_bytes=1 << 20,
    non_expert_bytes=8 << 20, kv_bytes_per_token=4096, hidden_size=64,
    provenance="made up: a backend that does no model work")


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer without merges: ids 0-2 special, then one id per byte."""
    vocab = {t: i for i, t in enumerate((*SPECIAL_TOKENS, *sorted(pre_tokenizers.ByteLevel.alphabet())))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


@dataclass(slots=True)
class _State:
    prompt_len: int
    sampling: SamplingParams
    prefilled: int = 0
    generated: int = 0
    next_token: int = 0


class FakeBackend:
    """``step_delay_s`` > 0 makes every step take that long (to keep requests in flight);
    ``emit_eos_after`` = n makes the (n+1)-th token of every request EOS unless ignore_eos."""

    name = "fake"
    draining = False

    def __init__(self, step_delay_s: float = 0.0, max_context: int = 4096, max_running: int = 256,
                 emit_eos_after: int | None = None):
        self._delay = step_delay_s
        self._max_context = max_context
        self._max_running = max_running
        self._emit_eos_after = emit_eos_after
        self._tokenizer = byte_tokenizer()
        self._vocab = self._tokenizer.get_vocab_size()
        self._requests: dict[str, _State] = {}
        self._instance = uuid.uuid4().hex

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    async def start(self) -> BackendInfo:
        return BackendInfo(model=FAKE_MODEL, vocab_size=self._vocab, max_context=self._max_context,
                           eos_token_id=EOS_ID, tokenizer_json=self._tokenizer.to_str(),
                           max_running=self._max_running,
                           instance_id=self._instance,
                           tokenizer_config=json.dumps({"chat_template": CHAT_TEMPLATE,
                                                        "eos_token": SPECIAL_TOKENS[EOS_ID]}))

    def add_request(self, request_id: str, prompt: list[int], sampling: SamplingParams) -> None:
        first = (len(prompt) + (sampling.seed or 0)) % (self._vocab - len(SPECIAL_TOKENS))
        self._requests[request_id] = _State(len(prompt), sampling, next_token=first)

    def remove_request(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    async def execute(self, plan: StepPlan) -> StepResult:
        started = time.monotonic()
        if self._delay:
            await asyncio.sleep(self._delay)
        outputs: list[RequestStepOutput] = []
        for chunk in plan.prefill:
            state = self._requests[chunk.request_id]
            state.prefilled = chunk.start + chunk.num_tokens
            if state.prefilled >= state.prompt_len:
                outputs.append(self._sample(chunk.request_id, state))
        for request_id in plan.decode:
            outputs.append(self._sample(request_id, self._requests[request_id]))
        return StepResult(started_at=started, finished_at=time.monotonic(), outputs=outputs,
                          bytes_loaded=len(plan.load) * FAKE_MODEL.expert_bytes)

    def _sample(self, request_id: str, state: _State) -> RequestStepOutput:
        sampling = state.sampling
        span = self._vocab - len(SPECIAL_TOKENS)
        if not sampling.ignore_eos and state.generated == self._emit_eos_after:
            token = EOS_ID
        else:
            token = len(SPECIAL_TOKENS) + state.next_token % span
            state.next_token += 1
        state.generated += 1
        reason = ""
        if token in sampling.stop_token_ids or token == EOS_ID:
            reason = "stop"
        elif state.generated >= sampling.max_tokens:
            reason = "length"
        return RequestStepOutput(request_id=request_id, new_tokens=1, token_ids=[token],
                                 finished=bool(reason), finish_reason=reason)

    async def recover(self) -> tuple:
        self._requests.clear()
        return ()

    async def check(self) -> None:
        """In-process: answers whenever the loop asks."""

    async def close(self) -> None:
        self._requests.clear()

"""What the server's engine loop drives: an engine that holds prompts and runs step plans.

Three implementations: the torch engine in this process (``emoe.rpc.local``), a remote engine
worker over gRPC (``emoe.rpc.remote``) and one that does no model work (``emoe.rpc.fake``,
for tests and the service benchmark).

The loop calls ``add_request``/``remove_request`` only between steps, never while
``execute`` runs; a backend may apply them at once or with the next step. After a step that
raised, the loop calls ``recover``: the backend drops every request and reports the experts
it holds, which the scheduler then starts from (the engine's state is the truth).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from emoe.core.plan import ExpertKey, StepPlan, StepResult
from emoe.core.specs import ModelSpec


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Resolved sampling parameters: every field has its value (server defaults applied)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """The model a backend serves. ``tokenizer_json`` is a Hugging Face tokenizer.json (empty:
    token ids only), ``tokenizer_config`` its tokenizer_config.json (the chat template; empty:
    none); ``max_running`` is how many requests the engine holds at once;
    ``expert_slots`` the size of an offloading engine's expert cache (0: every expert stays
    resident); ``resident`` the experts resident once it is warm."""

    model: ModelSpec
    vocab_size: int
    max_context: int
    eos_token_id: int
    tokenizer_json: str
    max_running: int
    resident: tuple[ExpertKey, ...] = ()
    instance_id: str = ""
    expert_slots: int = 0
    tokenizer_config: str = ""


class BackendUnavailable(Exception):
    """The backend cannot run steps (a worker died or restarted); its requests are lost."""


class Backend(Protocol):
    name: str
    draining: bool
    """True while the engine finishes what it holds but takes no new requests."""

    async def start(self) -> BackendInfo:
        """Loads and warms up the model (or connects); returns what it serves."""

    def add_request(self, request_id: str, prompt: list[int], sampling: SamplingParams) -> None:
        """Registers a request's prompt; the scheduler's plans then prefill and decode it."""

    def remove_request(self, request_id: str) -> None:
        """Forgets a request, finished or not, freeing its KV memory. Unknown ids are ignored."""

    async def execute(self, plan: StepPlan) -> StepResult:
        """Runs one step. Raises BackendUnavailable when the engine is gone."""

    async def recover(self) -> tuple[ExpertKey, ...]:
        """After a step that raised: drops every request, brings the engine back to a state it
        can run steps from, and returns its resident experts. Raises BackendUnavailable when
        the engine is gone, anything else when it cannot be brought back."""

    async def check(self) -> None:
        """Between steps: raises BackendUnavailable when the engine stops answering; updates
        ``draining``."""

    async def close(self) -> None:
        """Releases the engine or connection."""

"""The torch engine in this process, as a backend.

Steps run on one dedicated thread, so the event loop stays responsive while torch computes;
the loop never adds or removes requests while a step runs (see backend.py), so the engine is
only ever touched by one thread at a time.

A step that hangs (a deadlocked kernel, a transfer that never completes) is found by its
progress: every decoder layer the step enters is a heartbeat, and a step that goes
``stall_timeout_s`` without one, or runs longer than ``step_timeout_s`` in all, marks the
engine lost (BackendUnavailable: the server fails its requests with UNAVAILABLE and says why).
A thread cannot be stopped from outside, so the engine stays lost until that step returns;
then ``start`` resets it (every request dropped, the expert cache resynchronised) and it
serves again. The engine thread is a daemon: a step that never returns does not keep the
process from exiting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from emoe.core.errors import ConfigError
from emoe.core.plan import ExpertKey, StepPlan, StepResult
from emoe.core.profile import decode_context
from emoe.rpc.backend import BackendInfo, BackendUnavailable, SamplingParams
from emoe.rpc.engine_speed import EngineSpeed
from emoe.rpc.offload import OffloadConfig, engine_slots, miss_policy

REFERENCE_CHECKPOINT = Path(__file__).resolve().parents[1] / "engine" / "reference" / "emoe-tiny"
DEFAULT_STEP_TIMEOUT_S = 60.0
DEFAULT_STALL_TIMEOUT_S = 10.0
WATCH_INTERVAL_S = 0.1  # how often a running step's progress is looked at

log = logging.getLogger(__name__)


class EngineThread:
    """Runs calls one after another on a daemon thread of its own."""

    def __init__(self, name: str):
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._calls.put((future, fn, args))
        return future

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self.submit(fn, *args))

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)

    def stop(self, wait: bool) -> None:
        self._calls.put(None)
        if wait:
            self._thread.join()


class LocalEngineBackend:
    """``checkpoint``: a Hugging Face model folder (config.json, safetensors, tokenizer.json).

    With ``offload`` (a policy whose planner is not ``all``) the engine keeps its experts in
    an ``OffloadedExperts`` slot cache and carries out each plan's load/evict lists; ``experts``
    is that executor once started (None: every expert resident). ``step_timeout_s`` and
    ``stall_timeout_s``: when a step counts as hung (module docstring). ``speed``: given a
    profile's step model, every step's compute against it (``emoe.rpc.engine_speed``).
    """

    def __init__(self, checkpoint: Path, device: str = "cpu", dtype: str | None = None,
                 max_batch_size: int = 16, max_seq_len: int | None = None,
                 offload: OffloadConfig | None = None, threads: int | None = None,
                 step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
                 stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S):
        self.name = f"local:{checkpoint.name}"
        self.threads = threads
        self.step_timeout_s, self.stall_timeout_s = step_timeout_s, stall_timeout_s
        self._checkpoint = checkpoint
        self._device, self._dtype = device, dtype
        self._max_batch_size, self._max_seq_len = max_batch_size, max_seq_len
        self._offload = offload if offload is not None and offload.enabled else None
        self._thread = EngineThread("emoe-engine")
        self._engine = None
        self._info: BackendInfo | None = None
        self._beat = 0.0  # time.monotonic() when the running step last entered a layer
        self.speed: EngineSpeed | None = None  # against a profile, once given one
        self._hung: asyncio.Future | None = None  # the step that stopped making progress
        self._hung_reason = ""
        self.experts = None
        self.draining = False

    async def start(self) -> BackendInfo:
        """Loads and warms up the model; after a hung step, waits for it to return and
        brings the engine back (every request dropped)."""
        if self._info is None:
            self._info = await self._thread.run(self._load)
            return self._info
        if self._hung is not None:
            await asyncio.wait((self._hung,))
        try:
            resident = await self.recover()
        except Exception as exc:  # noqa: BLE001 - the loop retries
            raise BackendUnavailable(f"cannot be reset after a hung step: "
                                     f"{type(exc).__name__}: {exc}") from exc
        return dataclasses.replace(self._info, resident=resident)

    def _load(self) -> BackendInfo:
        import torch

        from emoe.engine.engine import Engine

        if self.threads:
            torch.set_num_threads(self.threads)

        folder = self._checkpoint
        tokenizer_file = folder / "tokenizer.json"
        tokenizer_config = folder / "tokenizer_config.json"
        if not (folder / "config.json").is_file():
            raise ConfigError(f"checkpoint: {folder} has no config.json (a Hugging Face model folder "
                              "with config.json, *.safetensors and tokenizer.json is expected)")
        tokenizer_json = _tokenizer_json(tokenizer_file)
        if self._offload is None:
            engine = Engine.from_pretrained(folder, device=self._device, dtype=self._dtype,
                                            max_batch_size=self._max_batch_size,
                                            max_seq_len=self._max_seq_len)
        else:
            engine = self._offloaded_engine(folder)
        engine.warm_up()
        for layer in engine.model.layers:
            layer.register_forward_pre_hook(self._heartbeat)
        self._engine = engine
        cfg = engine.config
        dtype = str(engine.dtype).removeprefix("torch.")
        model = cfg.to_model_spec(folder.name, dtype=dtype, max_context=engine.max_seq_len,
                                  provenance=f"computed from {folder / 'config.json'}")
        eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else 0
        if self.experts is None:
            resident = self._all_experts()
        else:
            self._reset_experts()
            resident = tuple(sorted(self.experts.cache.resident()))
        return BackendInfo(
            model=model, vocab_size=cfg.vocab_size, max_context=engine.max_seq_len, eos_token_id=eos,
            tokenizer_json=tokenizer_json,
            max_running=engine.cache.num_slots, resident=resident, instance_id=uuid.uuid4().hex,
            expert_slots=0 if self.experts is None else self.experts.cache.num_slots,
            tokenizer_config=tokenizer_config.read_text() if tokenizer_config.is_file() else "")

    def _offloaded_engine(self, folder: Path):
        from emoe.engine.checkpoint import load_model
        from emoe.engine.engine import Engine
        from emoe.core.budget import ExpertBudget
        from emoe.engine.offload.executor import OffloadedExperts

        offload = self._offload
        miss = miss_policy(offload.policy.planner, offload.miss)
        model = load_model(folder, device="cpu", dtype=self._dtype)
        dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
        spec = model.config.to_model_spec(folder.name, dtype=dtype)
        _, per_layer = engine_slots(offload, spec)
        slots = int(per_layer.sum())
        self.experts = OffloadedExperts.install(
            model, ExpertBudget(bytes=slots * spec.expert_bytes), miss, device=self._device,
            slots_per_layer=per_layer.tolist())
        return Engine(model, max_batch_size=self._max_batch_size, max_seq_len=self._max_seq_len,
                      expert_handler=self.experts)

    def _reset_experts(self) -> None:
        """Empties the expert cache after warm-up: the scheduler's planner starts from none."""
        from emoe.core.experts import LruExpertCache

        experts = self.experts
        experts.cache.apply(sorted(experts.cache.resident()), [])
        if experts.lru is not None:
            experts.lru = LruExpertCache(experts.slots_per_layer)
        experts.fetches = 0

    def add_request(self, request_id: str, prompt: list[int], sampling: SamplingParams) -> None:
        from emoe.engine.sampling import SamplingParams as EngineSampling

        if self._hung is not None:
            raise BackendUnavailable(self._hung_reason)

        self._engine.add_request(request_id, prompt, EngineSampling(
            max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed,
            stop_token_ids=sampling.stop_token_ids, ignore_eos=sampling.ignore_eos))

    def remove_request(self, request_id: str) -> None:
        if self._hung is None:  # else the hung step owns the engine; start() drops everything
            self._engine.abort(request_id)

    def _heartbeat(self, module: Any, args: Any) -> None:
        self._beat = time.monotonic()

    async def execute(self, plan: StepPlan) -> StepResult:
        if self._hung is not None:
            raise BackendUnavailable(self._hung_reason)
        started = self._beat = time.monotonic()
        if self.speed is not None:  # what the decodes attend, before the step adds to it
            seqs = self._engine.seqs
            context = decode_context([seqs[r].num_tokens for r in plan.decode if r in seqs])
        step = asyncio.wrap_future(self._thread.submit(self._engine.execute, plan))
        while not (await asyncio.wait((step,), timeout=WATCH_INTERVAL_S))[0]:
            now = time.monotonic()
            if now - self._beat > self.stall_timeout_s:
                why = (f"a step made no progress (entered no model layer) for "
                       f"{now - self._beat:.1f} s (--engine-timeout {self.stall_timeout_s:g} s)")
            elif now - started > self.step_timeout_s:
                why = f"a step ran past --step-timeout ({self.step_timeout_s:g} s)"
            else:
                continue
            self._hung, self._hung_reason = step, f"hung: {why}; it serves again once the step returns"
            raise BackendUnavailable(self._hung_reason)
        result = step.result()
        if self.speed is not None:
            self.speed.observe(plan, result, context, started)
        return result

    async def recover(self) -> tuple[ExpertKey, ...]:
        """Also after a hung step, once it returned (BackendUnavailable while it runs)."""
        hung = self._hung
        if hung is not None:
            if not hung.done():
                raise BackendUnavailable(self._hung_reason)
            failed = None if hung.cancelled() else hung.exception()
            log.warning("engine %s: the hung step returned%s; resetting the engine", self.name,
                        f" ({type(failed).__name__}: {failed})" if failed else "")
            self._hung = None
        if self.speed is not None:
            self.speed.idle()
        return await self._thread.run(self._recover)

    def _recover(self) -> tuple[ExpertKey, ...]:
        self._engine.reset()
        if self.experts is None:
            return self._all_experts()
        return tuple(sorted(self.experts.resync()))

    def _all_experts(self) -> tuple[ExpertKey, ...]:
        cfg = self._engine.config
        return tuple((layer, e) for layer in range(cfg.num_layers) for e in range(cfg.num_experts))

    async def check(self) -> None:
        """In-process: answers whenever the loop asks."""

    async def close(self) -> None:
        self._thread.stop(wait=self._hung is None)
        self._engine = None


def _tokenizer_json(path: Path) -> str:
    """The checkpoint's tokenizer.json, checked to load ("" when there is none)."""
    from emoe.rpc.text import load_tokenizer

    if not path.is_file():
        return ""
    try:
        text = path.read_text()
        load_tokenizer(text)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises its own exception type
        raise ConfigError(f"{path}: not a tokenizer.json the tokenizers library can load: "
                          f"{exc}") from None
    return text

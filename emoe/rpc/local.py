"""The torch engine in this process, as a backend.

Steps run on one dedicated thread, so the event loop stays responsive while torch computes;
the loop never adds or removes requests while a step runs (see backend.py), so the engine is
only ever touched by one thread at a time.
"""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from emoe.core.errors import ConfigError
from emoe.core.plan import ExpertKey, StepPlan, StepResult
from emoe.rpc.backend import BackendInfo, SamplingParams
from emoe.rpc.offload import OffloadConfig, engine_slots, miss_policy

REFERENCE_CHECKPOINT = Path(__file__).resolve().parents[1] / "engine" / "reference" / "emoe-tiny"


class LocalEngineBackend:
    """``checkpoint``: a Hugging Face model folder (config.json, safetensors, tokenizer.json).

    With ``offload`` (a policy whose planner is not ``all``) the engine keeps its experts in
    an ``OffloadedExperts`` slot cache and carries out each plan's load/evict lists; ``experts``
    is that executor once started (None: every expert resident).
    """

    def __init__(self, checkpoint: Path, device: str = "cpu", dtype: str | None = None,
                 max_batch_size: int = 16, max_seq_len: int | None = None,
                 offload: OffloadConfig | None = None, threads: int | None = None):
        self.name = f"local:{checkpoint.name}"
        self.threads = threads
        self._checkpoint = checkpoint
        self._device, self._dtype = device, dtype
        self._max_batch_size, self._max_seq_len = max_batch_size, max_seq_len
        self._offload = offload if offload is not None and offload.enabled else None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emoe-engine")
        self._engine = None
        self.experts = None
        self.draining = False

    async def start(self) -> BackendInfo:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._load)

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
        from emoe.engine.offload.budget import ExpertBudget
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

        self._engine.add_request(request_id, prompt, EngineSampling(
            max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed,
            stop_token_ids=sampling.stop_token_ids, ignore_eos=sampling.ignore_eos))

    def remove_request(self, request_id: str) -> None:
        self._engine.abort(request_id)

    async def execute(self, plan: StepPlan) -> StepResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._engine.execute, plan)

    async def recover(self) -> tuple[ExpertKey, ...]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._recover)

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
        self._thread.shutdown(wait=True, cancel_futures=True)
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

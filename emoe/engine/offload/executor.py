"""The offloading expert executor: routes over the resident experts and computes from slots.

One ``OffloadedExperts`` serves every MoE layer of a model (``install``): it owns the host
``ExpertStore`` and the device ``SlotCache``, carries out each plan's evict/load lists (the
engine's ``ExpertPlanHandler``), and computes a layer's experts from the slot pool. A token
whose router-chosen expert is not resident is a miss, handled by the ``MissPolicy``:

- ``reroute`` (the paper's): the token goes to the router's next-ranked resident experts, i.e.
  the top-k over the resident experts of the layer, ranked by router probability. Gate weights
  are renormalised over the experts actually used: the used experts' probabilities scaled to
  sum to what the router's own top-k weights sum to (1 for Mixtral, which renormalises top-k;
  the top-k probability mass for models that do not). With every chosen expert resident this
  is exactly the model's own routing. A layer with fewer than k resident experts uses them all;
  a layer with none contributes nothing (the residual passes through).
- ``fetch``: on-demand offloading. A missing expert is copied in and waited for; each layer
  keeps at most ``slots_per_layer[layer]`` experts, evicting its least recently used first
  (``emoe.core.experts.LruExpertCache``, the rule the ``lru`` planner assumes).
- ``drop``: a missing expert contributes nothing; the resident ones keep their gate weights.

Hit counts are taken before miss handling: a choice is a hit when the router's chosen expert is
resident (or in flight) when the layer runs.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from emoe.core.budget import ExpertBudget
from emoe.core.errors import ConfigError, UnknownNameError
from emoe.core.experts import LruExpertCache
from emoe.core.plan import ExpertKey, StepPlan, StepResult
from emoe.engine import cpu_kernels
from emoe.engine.model import MoEModel, expert_mlp, route
from emoe.engine.offload.cache import SlotCache
from emoe.engine.offload.store import ExpertStore


class MissPolicy(str, enum.Enum):
    REROUTE = "reroute"
    FETCH = "fetch"
    DROP = "drop"

    @classmethod
    def parse(cls, name: str) -> "MissPolicy":
        try:
            return cls(name)
        except ValueError:
            raise UnknownNameError("miss policy", name, [m.value for m in cls]) from None


class OffloadedExperts:
    """Expert executor of every MoE layer over one slot cache; also the engine's plan handler."""

    def __init__(self, cache: SlotCache, top_k: int, normalize: bool, miss: MissPolicy,
                 slots_per_layer: Iterable[int] | None = None):
        self.cache, self.top_k, self.normalize, self.miss = cache, top_k, normalize, miss
        layers = cache.store.num_layers
        if slots_per_layer is None:
            per_layer = [cache.num_slots // layers] * layers
            for i in range(cache.num_slots % layers):
                per_layer[layers - 1 - i] += 1
        else:
            per_layer = [int(s) for s in slots_per_layer]
        if len(per_layer) != layers or sum(per_layer) > cache.num_slots or min(per_layer) < 1:
            raise ConfigError(f"slots_per_layer: {per_layer} must give each of {layers} layers at "
                              f"least one slot, {cache.num_slots} slots in all")
        self.slots_per_layer = per_layer
        self.lru = LruExpertCache(per_layer) if miss is MissPolicy.FETCH else None
        self._table = cache.table.to(cache.device)  # [L, E] device copy of the slot table
        self._not_resident = torch.zeros(self._table.shape, device=cache.device)  # [L, E] 0 or -inf
        self._resident_count: list[int] = []  # per layer
        self._table_version = -1
        self._hits: list[Tensor] = []  # per layer of the current forward: [T, K] choice resident
        self.fetched: list[ExpertKey] = []  # net cache changes by fetch-on-miss in this step
        self.evicted: list[ExpertKey] = []
        self.fetches = 0  # experts copied in on a miss, all steps
        self.wait_s = 0.0
        # finish_step's weighting: request id -> task, task -> [L] sensitivity
        self.tasks: Mapping[str, str] | None = None
        self.sensitivity: Mapping[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def install(cls, model: MoEModel, budget: ExpertBudget, miss: MissPolicy = MissPolicy.REROUTE,
                device: torch.device | str | None = None,
                slots_per_layer: Iterable[int] | None = None,
                device_memory_bytes: int | None = None) -> "OffloadedExperts":
        """Move ``model``'s experts into a host store, keep a slot pool of ``budget`` on
        ``device`` (default: where the model is), and make this the executor of every layer.

        The model's own expert tensors are released; its other weights move to ``device``.
        """
        device = torch.device(device) if device is not None else model.embed_tokens.weight.device
        cfg = model.config
        blocks = [layer.moe for layer in model.layers]
        store = ExpertStore.from_stacked(
            [(b.experts.w1.detach(), b.experts.w3.detach(), b.experts.w2.detach()) for b in blocks],
            pin=device.type == "cuda")
        non_expert = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                         if ".experts." not in n)
        slots = budget.num_slots(cfg.num_layers, cfg.num_experts, store.expert_bytes,
                                 non_expert_bytes=non_expert,
                                 device_memory_bytes=device_memory_bytes)
        for b in blocks:
            for name in ("w1", "w3", "w2"):
                shape = getattr(b.experts, name).shape[1:]
                setattr(b.experts, name, nn.Parameter(torch.empty(0, *shape, dtype=store.layout.dtype),
                                                      requires_grad=False))
        model.to(device)
        executor = cls(SlotCache(store, slots, device), cfg.top_k, cfg.norm_topk_prob, miss,
                       slots_per_layer)
        model.set_executors(lambda i, block: executor)
        return executor

    # ------------------------------------------------------------------ plan handler
    def apply(self, load: list[ExpertKey], evict: list[ExpertKey]) -> tuple[int, float]:
        """Evict, then submit loads (asynchronous); returns (bytes submitted, seconds waited)."""
        if self.lru is not None and (load or evict):
            raise ConfigError("miss policy 'fetch' manages the expert cache itself (the 'lru' "
                              "planner); a plan that loads or evicts experts needs 'reroute' "
                              "or 'drop'")
        t0 = time.perf_counter()
        submitted = self.cache.apply(evict, load)
        return submitted, time.perf_counter() - t0

    def resync(self) -> set[ExpertKey]:
        """After a step that raised part-way: forgets the step's records and rebuilds the LRU
        order from the slot cache's resident map, the truth; returns the resident experts.
        Raises AssertionError when the cache's own state is inconsistent."""
        self.cache.check_invariants()
        self._hits, self.fetched, self.evicted, self.wait_s = [], [], [], 0.0
        if self.lru is not None:
            self.lru = LruExpertCache(self.slots_per_layer, resident=self.cache.table.numpy() >= 0)
        return self.cache.resident()

    def finish_step(self, plan: StepPlan, result: StepResult) -> None:
        """Fold the step's expert activity into ``result``: fetches/evictions on miss, time
        waited for loads, and per request the hits and choices over its tokens, weighted by
        the task's per-layer sensitivity where ``self.tasks``/``self.sensitivity`` are set
        (else unweighted). ``Engine.execute`` calls this once for every step.

        Token rows follow the engine's batch order: one per decode request, then each prefill
        chunk's tokens.
        """
        result.fetched_on_miss.extend(self.fetched)
        result.evicted_on_miss.extend(self.evicted)
        result.load_wait_s += self.wait_s
        self.fetched, self.evicted, self.wait_s = [], [], 0.0
        if not self._hits:
            return
        hits = torch.stack(self._hits, dim=1).sum(dim=2).tolist()  # [T][L] hits per token and layer
        self._hits = []
        rids = list(plan.decode) + [c.request_id for c in plan.prefill]
        sizes = [1] * len(plan.decode) + [c.num_tokens for c in plan.prefill]  # token rows
        if sum(sizes) != len(hits):
            raise RuntimeError(f"finish_step: plan has {sum(sizes)} token rows, the "
                               f"forward ran {len(hits)}")
        num_layers = len(hits[0])
        outputs = {o.request_id: o for o in result.outputs}
        row = 0
        for rid, n in zip(rids, sizes):
            layer_hits = hits[row] if n == 1 else [sum(col) for col in zip(*hits[row:row + n])]  # [L]
            row += n
            out = outputs.get(rid)
            if out is None:
                continue
            choices = n * self.top_k  # per layer
            total = sum(layer_hits)
            out.expert_hits += total
            out.expert_misses += choices * num_layers - total
            weights = self._layer_weights(rid)
            if weights is None:
                out.weighted_hits += float(total)
                out.weighted_choices += float(choices * num_layers)
            else:
                out.weighted_hits += float(sum(h * w for h, w in zip(layer_hits, weights)))
                out.weighted_choices += float(choices * sum(weights))

    def _layer_weights(self, request_id: str) -> np.ndarray | None:
        """The request's task's per-layer sensitivity [L], or None (unweighted)."""
        if self.tasks is None or self.sensitivity is None:
            return None
        return self.sensitivity.get(self.tasks.get(request_id, ""))

    # ------------------------------------------------------------------ compute
    def _slot_table(self) -> Tensor:
        if self._table_version != self.cache.version:
            self._table.copy_(self.cache.table)
            resident = self._table >= 0  # [L, E]
            self._not_resident = torch.zeros_like(self._not_resident).masked_fill_(~resident, float("-inf"))
            self._resident_count = resident.sum(dim=1).tolist()
            self._table_version = self.cache.version
        return self._table  # [L, E]

    def __call__(self, hidden: Tensor, router_logits: Tensor, layer: int) -> Tensor:
        """hidden [T, H], router_logits [T, E] -> routed-expert output [T, H]."""
        if layer == 0:
            self._hits = []  # a new forward: the last one's counts were collected or unwanted
        t0 = time.perf_counter()
        self.cache.wait_layer(layer)
        self.wait_s += time.perf_counter() - t0
        slot_of = self._slot_table()[layer]  # [E]
        if self.miss is MissPolicy.REROUTE and self.normalize:
            # renormalised routing over the resident experts is the router's own when every
            # choice is resident, so one path serves both; the router's choices count hits
            ids = router_logits.float().topk(self.top_k, dim=-1).indices  # [T, K]
            self._hits.append(slot_of[ids] >= 0)  # [T, K]
            return self._reroute(hidden, router_logits, None, slot_of, layer, self.cache.slots_in(layer))
        gates, ids = route(router_logits, self.top_k, self.normalize)  # [T, K] x2
        slots = slot_of[ids]  # [T, K]
        hit = slots >= 0  # [T, K]
        self._hits.append(hit)  # [T, K], counted per step in finish_step
        if self.miss is MissPolicy.FETCH:
            return self._fetch(hidden, gates, ids, layer)
        resident = self.cache.slots_in(layer)
        if bool(hit.all()):
            return self._compute(hidden, gates, slots, resident)
        if self.miss is MissPolicy.DROP:
            return self._compute(hidden, gates, slots, resident, hit)
        return self._reroute(hidden, router_logits, gates, slot_of, layer, resident)

    def _compute(self, x: Tensor, gates: Tensor, slots: Tensor, used: list[int],
                 valid: Tensor | None = None) -> Tensor:
        """sum over valid (t, k) of gates[t, k] * slot_expert_{slots[t, k]}(x[t]) -> [T, H];
        ``used`` (a superset of the slots read) stay pinned meanwhile."""
        c = self.cache
        c.pin(used)
        try:
            if valid is None:
                return expert_mlp(x, gates, slots, c.w1, c.w3, c.w2)  # [T, H]
            tok, k = valid.nonzero(as_tuple=True)  # [P] x2
            if tok.numel() == 0:
                return torch.zeros_like(x)
            y = expert_mlp(x[tok], gates[tok, k, None], slots[tok, k, None], c.w1, c.w3, c.w2)  # [P, H]
            return torch.zeros_like(x).index_add_(0, tok, y)  # [T, H]
        finally:
            c.unpin(used)

    def _reroute(self, x: Tensor, router_logits: Tensor, gates: Tensor | None, slot_of: Tensor,
                 layer: int, used: list[int]) -> Tensor:
        """Each token's top-k among the layer's resident experts, weighted p_i / sum_used p_j
        times the router's own top-k mass (``gates`` [T, K]; 1 with renormalised routing,
        where gates may be None; docs/offloading.md)."""
        k = min(self.top_k, self._resident_count[layer])
        if k == 0:
            return torch.zeros_like(x)
        masked = router_logits.float() + self._not_resident[layer]  # [T, E]
        top_logits, used_ids = masked.topk(k, dim=-1)  # [T, k] x2
        weights = cpu_kernels.softmax(top_logits)  # [T, k]: p_i / sum_used p_j
        if not self.normalize:  # renormalised routing has top-k mass 1
            weights = weights * gates.sum(dim=-1, keepdim=True)
        return self._compute(x, weights, slot_of[used_ids], used)  # [T, H]

    def _fetch(self, x: Tensor, gates: Tensor, ids: Tensor, layer: int) -> Tensor:
        """Bring each chosen expert in (the layer's LRU rule), in waves that fit the layer."""
        order = self.lru.step_order(layer, ids.unique().tolist())
        width = self.slots_per_layer[layer]
        waves = [order[i:i + width] for i in range(0, len(order), width)]
        out = None
        for wave in waves:
            t0 = time.perf_counter()
            for expert in wave:
                hit, victim = self.lru.access(layer, expert)
                if victim is not None:
                    self.cache.evict((layer, victim))
                    _net_change(self.evicted, self.fetched, (layer, victim))
                if not hit:
                    self.cache.load([(layer, expert)])
                    self.fetches += 1
                    _net_change(self.fetched, self.evicted, (layer, expert))
            self.cache.wait_layer(layer)
            self.wait_s += time.perf_counter() - t0
            slots = self._slot_table()[layer][ids]  # [T, K]
            wave_slots = [self.cache.slot_of((layer, e)) for e in wave]
            if len(waves) == 1:
                return self._compute(x, gates, slots, wave_slots)
            in_wave = torch.isin(ids, torch.tensor(wave, device=ids.device))  # [T, K]
            y = self._compute(x, gates, slots, wave_slots, in_wave)
            out = y if out is None else out + y
        return out


def _net_change(added: list[ExpertKey], undone: list[ExpertKey], key: ExpertKey) -> None:
    """Record ``key`` in ``added`` unless it cancels an earlier change of this step."""
    if key in undone:
        undone.remove(key)
    else:
        added.append(key)

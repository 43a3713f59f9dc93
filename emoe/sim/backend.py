"""The simulated backend: carries out a step plan on modelled GPU memory, PCIe link and compute.

``execute`` is plain computation (no SimPy): it returns the step's result, with the simulated
time at which the step ends; the world (emoe/sim/world.py) waits until then.

What a step costs, in order:
1. evictions free memory at once;
2. the predictor, when the plan runs it, takes ``predictor_s`` before anything else;
3. expert loads are issued on the PCIe link; layer l's compute waits for its loads (the
   paper's engine guards each layer with an event), so loads overlap with the compute of the
   layers before them and only the rest is a stall (``load_wait_s``);
4. compute follows the cost model over prefill tokens, decode tokens and attended context
   (measured step times when a profile has them, there with the prefill chunks' count and
   attended pairs and the decodes' context padded to the longest as the engine computes it,
   ``emoe.core.profile.decode_context``, plus the expert handler's overhead when the policy
   serves through an expert cache and the profile measured it), plus what the serving path
   adds per step and per streamed token when the profile measured it;
   a decode-only plan runs up to ``plan.iterations`` iterations at once, stopping after the
   iteration in which the next request arrives (the scheduler's bound already stops at the
   first iteration in which a request reaches its output length);
5. under fetch-on-miss (``lru``) each iteration fetches the experts it touches that are not
   resident, evicting the layer's least recently used (in the engine's order:
   ``LruExpertCache.step_order``); a layer's fetches are issued when that layer starts (its
   router decides them), so they stall it in full.
"""

from __future__ import annotations

import math
from operator import itemgetter

import numpy as np

from emoe.core.experts import LruExpertCache, MissMode
from emoe.core.plan import ExpertKey, StepPlan, StepResult
from emoe.core.profile import HandlerOverhead, ServingCosts, StepTimes, chunk_pairs
from emoe.core.request import Request
from emoe.core.specs import HardwareSpec, ModelSpec
from emoe.sim.cost import CostModel
from emoe.sim.memory import GpuMemory
from emoe.sim.pcie import PcieLink
from emoe.sim.routing import RoutingSource
from emoe.sim.speed import SpeedTimeline, StepScatter


class SimBackend:
    def __init__(self, *, model: ModelSpec, hardware: HardwareSpec, memory_bytes: int,
                 routing: RoutingSource, miss_mode: MissMode, slots_per_layer: np.ndarray,
                 steps: StepTimes | None = None, serving: ServingCosts | None = None,
                 offload: HandlerOverhead | None = None,
                 speed: SpeedTimeline = SpeedTimeline.constant(1.0),
                 scatter: StepScatter = StepScatter(), seed: int | tuple[int, int] = 0):
        """``scatter``: how each step's time is drawn around its model, seeded by ``seed``
        (``SimConfig.step_scatter``, with ``scatter_draw``; a served engine's profile only)."""
        self.model = model
        self.hardware = hardware
        self.cost = CostModel(hardware, model, steps, serving, offload, speed)
        self._scatter_model = scatter if serving is not None and scatter.drawn else None
        self._draws = np.random.default_rng(seed)
        self._scatter_state = 0.0  # the AR(1) series' last standard-normal value
        self.memory = GpuMemory(memory_bytes, model)
        self.link = PcieLink(hardware.pcie_bandwidth_bytes_per_s, hardware.pcie_latency_s)
        self.routing = routing
        self.miss_mode = miss_mode
        self.resident = np.zeros((model.num_layers, model.num_experts), dtype=bool)
        self._version = 0
        self._lru = LruExpertCache(slots_per_layer) if miss_mode is MissMode.FETCH else None
        self.predictor_invocations = 0
        self._decode_routing: dict[str, np.ndarray] = {}
        self.live: dict[str, Request] = {}
        self._decode_ids: list[str] | None = None
        self._decode_slots = np.zeros(0, dtype=np.intp)
        # the engine as profiled pads its decodes to the longest context (the presets' linear
        # model attends their sum, the KV held): per decoding request its context less the
        # iterations run, as every iteration adds one token to every decode
        self._padded = steps is not None
        self._iterations = 0
        self._context_origin: dict[str, int] = {}
        self._longest_origin = 0
        # layer l's compute ends (L - l) layer-times after it starts, when it waits for loads
        self._layers_left = np.arange(model.num_layers, 0, -1, dtype=np.float64)

    # -- requests -----------------------------------------------------------------------------

    def admit(self, request: Request) -> None:
        self.live[request.id] = request
        self.routing.admit(request)

    def finish(self, requests: list[Request], now: float) -> None:
        """Free what ended requests hold; their expert hit counters are written into them at
        the next ``flush``, and their generated tokens' routing goes out with the next step's
        result (``decode_routing``)."""
        held = 0
        for request in requests:
            del self.live[request.id]
            self._context_origin.pop(request.id, None)
            if request.generated_tokens > 1:
                self._decode_routing[request.id] = self.routing.decode_counts(request)
            held += (request.input_tokens + request.generated_tokens - 1
                     if request.generated_tokens else request.prefilled_tokens)
        self.routing.retire(requests)
        if held:
            self.memory.change(now, kv_tokens=-held)

    def flush(self) -> None:
        """Write the expert hit counters of the requests ended since the last flush."""
        self.routing.flush()

    # -- the step -----------------------------------------------------------------------------

    def execute(self, plan: StepPlan, now: float, next_arrival: float = math.inf) -> StepResult:
        hw, model, memory = self.hardware, self.model, self.memory
        # a macro step ends where the machine's speed changes, as at an arrival
        next_arrival = min(next_arrival, self.cost.at(now))
        if plan.evict:
            for layer, expert in plan.evict:
                self.resident[layer, expert] = False
            memory.change(now, experts=-len(plan.evict))
        predictor_s = hw.predictor_s if plan.run_predictor else 0.0
        self.predictor_invocations += plan.run_predictor
        start = now + predictor_s
        ready = self._load(plan.load, now, start)
        if plan.evict or plan.load:
            self._version += 1

        live, slot_of = self.live, self.routing.slot
        completed: list[Request] = []  # requests whose chunk ends their prompt
        if plan.prefill:
            prefill_slots = np.array([slot_of[c.request_id] for c in plan.prefill], np.intp)
            token_counts = [c.num_tokens for c in plan.prefill]
            prefill_tokens = np.array(token_counts, np.int64)
            prefill = sum(token_counts)
            pairs = chunk_pairs(plan.prefill)
            for chunk in plan.prefill:
                request = live[chunk.request_id]
                if chunk.start + chunk.num_tokens == request.input_tokens:
                    completed.append(request)
        else:
            prefill_slots, prefill_tokens, prefill, pairs = _NO_SLOTS, _NO_TOKENS, 0, 0
        chunks = len(plan.prefill)
        if plan.decode is not self._decode_ids:
            self._decode_ids = plan.decode
            self._decode_slots = _slots(slot_of, plan.decode)
            if self._padded:
                origin = self._context_origin
                self._longest_origin = max((origin[r] for r in plan.decode), default=0)
        decode_slots = self._decode_slots
        decode = len(decode_slots)
        if self._padded:  # every decode attends as many tokens as the longest
            context = decode * (self._longest_origin + self._iterations)
        else:  # the KV held by running requests
            context = memory.kv_tokens

        first_tokens = len(completed)
        result = StepResult(started_at=now, finished_at=now, predictor_s=predictor_s)
        result.decode_routing, self._decode_routing = self._decode_routing, {}
        if self._lru is not None:
            self._fetch_on_miss_steps(plan, result, start, ready, next_arrival, prefill_slots,
                                      prefill_tokens, pairs, decode_slots, context, first_tokens)
        else:
            cost = self.cost
            iterations = 1 if plan.prefill else plan.iterations
            scatter = None
            if iterations > 1 and next_arrival < math.inf:
                shape = dict(decode_tokens=decode, context_tokens=context,
                             resident_experts=memory.experts)
                if self._scatter_model is None:
                    iterations = min(iterations, cost.iterations_within(next_arrival - start,
                                                                         **shape))
                else:  # its iterations as drawn decide which one the arrival falls in
                    iterations, scatter = self._scattered_within(
                        iterations, next_arrival - start, *cost.decode_iteration_line(**shape))
            if plan.prefill:
                self.routing.count(prefill_slots, prefill_tokens, False, self.resident,
                                   self._version)
            if decode:
                self.routing.count(decode_slots, iterations, True, self.resident, self._version)
            if scatter is None:
                scatter = self._scatter(iterations, bool(plan.prefill))
            compute = scatter * cost.step_s(prefill_tokens=prefill, decode_tokens=decode,
                                            context_tokens=context,
                                            resident_experts=memory.experts,
                                            iterations=iterations, prefill_chunks=chunks,
                                            prefill_pairs=pairs)
            if ready is None:
                wait = 0.0
            else:  # the first iteration waits for the loads
                first = compute if iterations == 1 else cost.step_s(
                    prefill_tokens=prefill, decode_tokens=decode, context_tokens=context,
                    resident_experts=memory.experts, prefill_chunks=chunks,
                    prefill_pairs=pairs)
                wait = self._load_wait(start, first, ready)
            serving = scatter * cost.serving_s(decode_tokens=decode, first_tokens=first_tokens,
                                               iterations=iterations, prefill_tokens=prefill)
            result.iterations = iterations
            result.compute_s = compute + wait  # as the engine times its forward pass
            result.load_wait_s = wait
            # the loop's work between iterations is inside the step; after the last, outside
            result.serving_s = serving / iterations
            result.finished_at = start + compute + wait + serving - result.serving_s
        memory.change(result.finished_at, kv_tokens=prefill + decode * result.iterations)
        self._iterations += result.iterations
        for request in completed:  # its first decode attends its prompt and first token
            self._context_origin[request.id] = request.input_tokens + 1 - self._iterations
        result.bytes_loaded += len(plan.load) * model.expert_bytes

        for request in completed:
            result.routing[request.id] = self.routing.prefill_counts(request)
        return result

    def _scatter(self, iterations: int, prefill: bool) -> float:
        """A step's draw around its model: of a macro step of n iterations, the mean of its
        iterations' draws (``StepScatter``: lognormal, AR(1) from step to step)."""
        scatter = self._scatter_model
        if scatter is None:
            return 1.0
        sigma, centre, rho = scatter.sigma_of(prefill), scatter.centre_of(prefill), scatter.lag1
        innovation = math.sqrt(1.0 - rho * rho)
        state, total = self._scatter_state, 0.0
        for z in self._draws.standard_normal(iterations).tolist():
            state = rho * state + innovation * z
            total += math.exp(centre + sigma * state)
        self._scatter_state = state
        return total / iterations

    def _scattered_within(self, limit: int, budget_s: float, a: float, b: float
                          ) -> tuple[int, float]:
        """A decode-only macro step of at most ``limit`` iterations, iteration i modelled at
        a + b i, that must stop after the iteration in which ``budget_s`` runs out, drawn
        iteration by iteration: (its iterations, its draw: the drawn time over the modelled).
        The budget is spent at the drawn pace, as single steps would spend it; judged at the
        modelled pace, a macro step drawn slow would run past the event by its draw."""
        scatter = self._scatter_model
        sigma, centre, rho = scatter.sigma_of(False), scatter.centre_of(False), scatter.lag1
        innovation = math.sqrt(1.0 - rho * rho)
        state, drawn, modelled, n = self._scatter_state, 0.0, 0.0, 0
        while n < limit and (n == 0 or drawn < budget_s):
            state = rho * state + innovation * float(self._draws.standard_normal())
            cost = a + b * n
            drawn += math.exp(centre + sigma * state) * cost
            modelled += cost
            n += 1
        self._scatter_state = state
        return n, drawn / modelled if modelled > 0 else 1.0

    def _load(self, keys: list[ExpertKey], now: float, issue_at: float) -> np.ndarray | None:
        """Issue expert copies; the per-layer time the last one lands (-inf: none)."""
        if not keys:
            return None
        self.memory.change(now, experts=len(keys))
        ready = np.full(self.model.num_layers, -math.inf)
        nbytes = self.model.expert_bytes
        for layer, expert in keys:
            ready[layer] = self.link.copy(issue_at, nbytes)
            self.resident[layer, expert] = True
        return ready

    def _load_wait(self, start: float, compute_s: float, ready: np.ndarray | None) -> float:
        """Stall of one iteration of ``compute_s`` whose layers wait for loads landing at
        ``ready``: layer l ends at max(end of layer l - 1, ready[l]) + compute_s / layers."""
        if ready is None:
            return 0.0
        per_layer = compute_s / self.model.num_layers
        end = max(start + compute_s, float(np.max(ready + self._layers_left * per_layer)))
        return end - start - compute_s

    def _fetch_wait(self, start: float, compute_s: float, fetches: dict[int, int]) -> float:
        """Stall of one iteration of ``compute_s`` whose layer l fetches ``fetches[l]`` experts
        on a miss: only the router of layer l knows what it misses, so its copies are issued as
        layer l starts and the layer waits for them (nothing overlaps them but earlier copies
        still on the link)."""
        per_layer = compute_s / self.model.num_layers
        nbytes = self.model.expert_bytes
        stall = 0.0
        for layer in sorted(fetches):
            issued = start + layer * per_layer + stall
            landed = issued
            for _ in range(fetches[layer]):
                landed = self.link.copy(issued, nbytes)
            stall += landed - issued
        return stall

    def _fetch_on_miss_steps(self, plan: StepPlan, result: StepResult, start: float,
                             ready: np.ndarray | None, next_arrival: float,
                             prefill_slots: np.ndarray, prefill_tokens: np.ndarray,
                             prefill_pairs: int, decode_slots: np.ndarray, context: int,
                             first_tokens: int) -> None:
        """Iteration by iteration: fetch touched experts that are missing, then compute
        (``context``: what the decodes attend in the first iteration).

        The result reports the step's net expert changes (an expert fetched and evicted again
        within the step appears in neither list), which is what the planner folds in.
        """
        routing, memory, lru = self.routing, self.memory, self._lru
        resident_before = self.resident.copy()
        nbytes = self.model.expert_bytes
        decode = len(decode_slots)
        prefill = int(prefill_tokens.sum())
        limit = 1 if plan.prefill else plan.iterations
        t = start
        compute_total = wait_total = 0.0
        iteration = 0
        while True:
            touched = routing.touched(decode_slots, 1, True) if decode else None
            if len(prefill_slots):
                more = routing.touched(prefill_slots, prefill_tokens, False)
                touched = more if touched is None else touched | more
                routing.count(prefill_slots, prefill_tokens, False, self.resident,
                              self._version, served_all=True)
            if decode:
                routing.count(decode_slots, 1, True, self.resident, self._version,
                              served_all=True)
            fetches: dict[int, int] = {}  # layer -> experts fetched
            for layer in np.flatnonzero(touched.any(axis=1)).tolist():
                for expert in lru.step_order(layer, np.flatnonzero(touched[layer]).tolist()):
                    hit, evicted = lru.access(layer, expert)
                    if hit:
                        continue
                    if evicted is not None:
                        self.resident[layer, evicted] = False
                        memory.change(t, experts=-1)
                    memory.change(t, experts=1)
                    self.resident[layer, expert] = True
                    fetches[layer] = fetches.get(layer, 0) + 1
            if fetches:
                self._version += 1
            scatter = self._scatter(1, iteration == 0 and prefill > 0)
            compute = scatter * self.cost.step_s(
                prefill_tokens=prefill if iteration == 0 else 0, decode_tokens=decode,
                context_tokens=context + decode * iteration,
                resident_experts=memory.experts, prefill_chunks=len(prefill_slots),
                prefill_pairs=prefill_pairs if iteration == 0 else 0)
            wait = self._load_wait(t, compute, ready) + self._fetch_wait(t, compute, fetches)
            ready = None
            result.bytes_loaded += nbytes * sum(fetches.values())
            serving = scatter * self.cost.serving_s(
                decode_tokens=decode, first_tokens=first_tokens if iteration == 0 else 0,
                prefill_tokens=prefill if iteration == 0 else 0)
            t += compute + wait + serving
            compute_total += compute
            wait_total += wait
            iteration += 1
            if iteration >= limit or t >= next_arrival:
                break
        result.evicted_on_miss = _keys(resident_before & ~self.resident)
        result.fetched_on_miss = _keys(self.resident & ~resident_before)
        result.iterations = iteration
        result.compute_s = compute_total + wait_total  # as the engine times its forward pass
        result.load_wait_s = wait_total
        result.serving_s = serving  # the last iteration's, after the engine's end
        result.finished_at = t - serving


_NO_SLOTS = np.zeros(0, dtype=np.intp)
_NO_TOKENS = np.zeros(0, dtype=np.int64)


def _keys(mask: np.ndarray) -> list[ExpertKey]:
    return [(int(layer), int(expert)) for layer, expert in zip(*np.nonzero(mask))]


def _slots(slot_of: dict[str, int], request_ids: list[str]) -> np.ndarray:
    if len(request_ids) > 1:
        return np.array(itemgetter(*request_ids)(slot_of), dtype=np.intp)
    return np.array([slot_of[r] for r in request_ids], dtype=np.intp)

"""The clock-agnostic scheduler: iteration-level continuous batching under token, sequence and
memory budgets, with a scheduling policy and an expert planner.

The loop, the same for the simulator and the real engine:

    scheduler.add_request(req)                   # whenever a request arrives
    plan = scheduler.next_step(now, max_iterations=None)   # engine: max_iterations=1
    if plan.empty: wait for the next arrival     # nothing runs until add_request
    else:
        result = backend.execute(plan)
        finished = scheduler.on_step_done(result)

Contract with the backend (see emoe/core/plan.py for the data):

- At most one plan is in flight; ``on_step_done`` must answer every non-empty plan. An empty
  plan is not in flight (it may still carry ``rejected``/``aborted`` to drop).
- Evict ``plan.evict``, then load ``plan.load``; charge the predictor when ``run_predictor``.
- A plan with prefill chunks has ``iterations == 1``: the chunks and one decode token for every
  request in ``plan.decode`` run in one iteration; a request whose chunk ends its prompt
  produces its first token in that iteration. A plan without prefill covers up to
  ``iterations`` decode iterations: every request in ``plan.decode`` makes one token per
  iteration. The backend stops early after the first iteration in which a request finishes or a
  new request arrives, and reports ``StepResult.iterations`` it ran.
- A request finishes at the last iteration of the step that reports it in ``outputs`` with
  ``finished=True`` (end of sequence), or when it reaches ``output_tokens`` (its max tokens),
  which the scheduler knows without being told. ``outputs`` need list only finished requests;
  listing others (for streamed token ids, expert hit counts) is allowed. The scheduler never
  reads a request's true output length for anything but that max-tokens cap.
- ``routing`` carries each completed prefill's ``[layers, experts]`` router-choice counts,
  ``decode_routing`` each finished request's over its generated tokens (optional; in the step
  it finishes, or the next one for a backend that learns of a finish from the scheduler);
  ``fetched_on_miss``/``evicted_on_miss`` report fetch-on-miss expert changes (``lru`` only).

Eq. 2's expected output per task is measured online: the mean output of the task's last
``OUTPUT_WINDOW`` finished requests, the task profile's ``mean_output_tokens`` before any.
Eq. 2's demand covers the requests in play and, beyond the paper, the other requests among
the last ``max(p, max_num_seqs)`` admitted: a resident set chosen at a prediction serves the
next p prompts, and the recent mix of tasks is the best guess of theirs (with the requests in
play alone, a task that happens to have none running at that moment gets no experts for the
whole interval).

Per-step work is O(changes): token counts of running requests are derived from one global
decode-iteration counter, finishes come from heaps, and the decode list is rebuilt only when the
running set changes. The ``emoe`` policy's Eq. 3 check costs a few vectorised operations per
step while requests wait, and O(log batch) per candidate. State is bounded by the live
(waiting and running) requests: heaps drop stale items once those outnumber the live ones.

Memory: GPU bytes = non-expert weights + ``planner.capacity_bytes`` (reserved for experts) +
the KV cache of running requests, each reserving ``(input_tokens + output_tokens) *
kv_bytes_per_token`` at admission (no preemption is ever needed). A request whose reservation
exceeds what is left beside the weights is rejected when added, and so is one whose prompt +
output exceed the model's context (``ModelSpec.max_context``; the server's reason, from
``emoe.core.serving.context_error``). ``fixed_expert_slots=True``
tells the planner the backend's expert memory is a fixed pool of exactly the planner's slots
(the real engine): it then never plans more resident experts than slots, not even for the
``emoe`` first prompt (see ``emoe.core.experts``).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Iterable

import numpy as np

from emoe.core.errors import ConfigError, RequestError
from emoe.core.estimates import CostEstimate, DecodeTargets, TaskDemand
from emoe.core.experts import ExpertPlanner, PlannerSetup, make_planner
from emoe.core.plan import ExpertKey, PrefillChunk, StepPlan, StepResult
from emoe.core.policies import BatchEstimate, make_policy
from emoe.core.policy_file import PolicyConfig
from emoe.core.predictor import ExpertPredictor, make_predictor, predictor_cost
from emoe.core.request import Request, RequestStatus
from emoe.core.serving import context_error
from emoe.core.specs import HardwareSpec, ModelSpec
from emoe.core.tasks import get_task

UNBOUNDED_ITERATIONS = 1 << 30
OUTPUT_WINDOW = 64


class _Entry:
    """Scheduler-private state of one request."""

    __slots__ = ("request", "expected_output", "kv_bytes", "target", "join_iter", "queued")

    def __init__(self, request: Request, expected_output: int, kv_bytes: int, target: float):
        self.request = request
        self.expected_output = expected_output
        self.kv_bytes = kv_bytes
        self.target = target
        self.join_iter = -1
        self.queued = True


class Scheduler:
    """Decides, step by step, what a backend runs. Side-effect free apart from its own state
    and the status fields of the ``Request`` objects it is given."""

    def __init__(self, model: ModelSpec, hardware: HardwareSpec,
                 policy: PolicyConfig | None = None, *,
                 predictor: ExpertPredictor | None = None, fixed_expert_slots: bool = False):
        config = policy if policy is not None else PolicyConfig()
        config.check_model(model)
        predictor = predictor or make_predictor(config.predictor, model.num_layers,
                                                model.num_experts)
        hardware = predictor_cost(hardware, predictor)  # what the backend charges, too
        self.model, self.hardware, self.config = model, hardware, config
        self.tasks = config.tasks
        self.policy = make_policy(config.scheduling)
        self.planner: ExpertPlanner = make_planner(config.planner, model, PlannerSetup(
            slots_per_layer=config.slots_per_layer(model),
            predictor=predictor,
            sensitivity=config.layer_sensitivity(model),
            prediction_interval=config.prediction_interval,
            frequencies=config.frequencies(model), fixed_slots=fixed_expert_slots,
            allocate=(config.slot_allocation == "sensitivity"
                      and not isinstance(config.experts_per_layer, list)),
            min_slots=config.min_experts_per_layer,
            adaptive_interval=config.adaptive_interval, seed=config.random_seed))
        self.cost = CostEstimate(model, hardware)

        budget = config.memory_budget_bytes or hardware.gpu_memory_bytes
        field = "memory_budget_bytes" if config.memory_budget_bytes else "gpu_memory_bytes"
        if budget < model.non_expert_bytes:
            raise ConfigError(f"{field}: {budget} B cannot hold the non-expert weights of "
                              f"{model.name or 'the model'} ({model.non_expert_bytes} B)")
        if budget < model.non_expert_bytes + self.planner.capacity_bytes:
            raise ConfigError(
                f"{field}: {budget} B cannot hold the non-expert weights "
                f"({model.non_expert_bytes} B) and the {config.planner!r} planner's experts "
                f"({self.planner.capacity_bytes} B); lower experts_per_layer/expert_budget_bytes")
        self.memory_budget_bytes = budget
        self.kv_capacity_bytes = budget - model.non_expert_bytes - self.planner.capacity_bytes
        self.kv_used_bytes = 0

        self._entries: dict[str, _Entry] = {}
        self._waiting: list[tuple[float, int, _Entry]] = []
        self._late: list[tuple[float, int, _Entry]] = []
        self._num_waiting = 0
        self._seq = 0
        self._decoding: dict[str, _Entry] = {}
        self._decode_ids: list[str] | None = []  # None: to rebuild from _decoding
        self._partial: _Entry | None = None
        self._iters = 0
        self._max_end: list[tuple[int, int, _Entry]] = []
        self._expected_end: list[tuple[int, int, _Entry]] = []
        self._targets = DecodeTargets()
        self._demand: dict[str, list[int]] = {}
        self._recent: deque[tuple[str, str, int]] = deque(maxlen=max(
            config.max_num_seqs, getattr(self.planner, "prediction_interval", 1)))
        self._outputs: dict[str, deque[int]] = {}
        self._just_finished: dict[str, str] = {}  # finished in the last step: id -> task
        self._admission_blocked = False
        self._estimate_blocked = False
        self._inflight: StepPlan | None = None
        self._inflight_at = 0.0
        # the last step (planned at, prefill tokens, decode tokens, iterations), until the next
        # plan's time closes its cycle for the cost estimate
        self._cycle: tuple[float, int, int, int] | None = None
        self._rejected: list[tuple[str, str]] = []
        self._aborted: list[tuple[str, str]] = []

    # -- queries ------------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        """Anything waiting, running or left to report. When False, ``next_step`` returns an
        empty plan until ``add_request``; the scheduler never needs a timer to wake it."""
        return bool(self._num_waiting or self._decoding or self._partial
                    or self._rejected or self._aborted)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self._decoding) + (self._partial is not None)

    @property
    def memory_used_bytes(self) -> int:
        """Non-expert weights + resident experts (at least their reservation) + reserved KV."""
        experts = max(self.planner.capacity_bytes, self.planner.resident_bytes)
        return self.model.non_expert_bytes + experts + self.kv_used_bytes

    def generated_tokens(self, request_id: str) -> int:
        """Tokens a live request has produced so far (``Request.generated_tokens`` is brought up
        to date only when the request leaves the scheduler)."""
        entry = self._entries.get(request_id)
        if entry is None:
            raise RequestError(f"request {request_id!r}: not waiting or running")
        return self._generated(entry)

    # -- inputs -------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request; one that can never fit in memory is rejected in the next plan."""
        if request.id in self._entries:
            raise RequestError(f"request {request.id!r}: id already waiting or running")
        if request.input_tokens < 1:
            raise RequestError(f"request {request.id!r}: field 'input_tokens' must be >= 1, "
                               f"got {request.input_tokens}")
        if request.output_tokens < 1:
            raise RequestError(f"request {request.id!r}: field 'output_tokens' must be >= 1, "
                               f"got {request.output_tokens}")
        task = get_task(request.task, self.tasks)
        expected = request.expected_output_tokens or task.mean_output_tokens
        kv_bytes = (request.input_tokens + request.output_tokens) * self.model.kv_bytes_per_token
        too_long = context_error(request.input_tokens, request.output_tokens,
                                 self.model.max_context)
        if too_long is not None:
            self._reject(request, ": ".join(too_long))
            return
        if kv_bytes > self.kv_capacity_bytes:
            self._reject(request, f"needs {kv_bytes} B of KV cache for {request.input_tokens} "
                                  f"input + {request.output_tokens} output tokens; at most "
                                  f"{self.kv_capacity_bytes} B fit beside the weights")
            return
        # Eq. 3's target until the first token (then DecodeTargets'): the end of a request that
        # meets both SLOs with its expected output
        target = request.arrival + request.slo.ttft_s + request.slo.tpot_s * (expected - 1)
        entry = _Entry(request, expected, kv_bytes, target)
        request.status = RequestStatus.WAITING
        self._entries[request.id] = entry
        self._seq += 1
        key = self.policy.queue_key(request, expected)
        heapq.heappush(self._waiting, (key, self._seq, entry))
        self._num_waiting += 1
        self._admission_blocked = False

    def _reject(self, request: Request, reason: str) -> None:
        request.status, request.reason = RequestStatus.REJECTED, reason
        self._rejected.append((request.id, reason))

    def abort(self, request_id: str, reason: str = "aborted") -> bool:
        """Stop a waiting or running request; False if it is not live. The next plan lists it
        in ``aborted`` so the backend frees its state."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return False
        request = entry.request
        if entry.queued:
            entry.queued = False
            self._num_waiting -= 1
            for heap in (self._waiting, self._late):
                _compact(heap, self._num_waiting, _is_queued)
        else:
            request.generated_tokens = self._generated(entry)
            self._release(entry)
        request.status, request.reason = RequestStatus.ABORTED, reason
        self._aborted.append((request_id, reason))
        return True

    def set_resident_experts(self, resident: Iterable[ExpertKey]) -> None:
        """Start the planner from the experts a backend already holds (one that reconnects, or
        recovers from a failed step, with a warm expert cache): its next plan is relative to
        them. Call before the first plan of a fresh scheduler."""
        mask = np.zeros_like(self.planner.resident)
        for layer, expert in resident:
            mask[layer, expert] = True
        self.planner.resident = mask

    # -- the step -----------------------------------------------------------------------------

    def next_step(self, now: float, max_iterations: int | None = None,
                  loop_s: float = 0.0) -> StepPlan:
        """The next step's plan. ``max_iterations`` caps ``plan.iterations`` (1 for an engine
        that reports after every iteration; None for a simulator). ``loop_s``: of the time
        since the last step ended, the loop's work just before this plan (a simulator's
        acceptance of new requests), which belongs to the last iteration of a macro step."""
        if self._inflight is not None:
            raise RuntimeError("next_step called before on_step_done for the plan in flight")
        if self._cycle is not None:
            self._close_cycle(now, loop_s)
        if self._decode_ids is None:
            self._decode_ids = list(self._decoding)
        plan = StepPlan(decode=self._decode_ids)
        if self._rejected:
            plan.rejected, self._rejected = self._rejected, []
        if self._aborted:
            plan.aborted, self._aborted = self._aborted, []
        budget = self.config.max_batch_tokens - len(self._decoding)
        if self._partial is not None:
            entry = self._partial
            start = entry.request.prefilled_tokens
            take = min(entry.request.input_tokens - start, budget)
            plan.prefill.append(PrefillChunk(entry.request.id, start, take))
            budget -= take
            if start + take < entry.request.input_tokens:
                budget = 0
            else:
                self._partial = None
        if self._num_waiting and budget > 0 and not self._admission_blocked:
            self._admit(now, plan, budget)
        if plan.prefill:
            plan.iterations = 1
        elif self._decoding:
            plan.iterations = self._iteration_bound(max_iterations)
        else:
            return plan
        self._inflight, self._inflight_at = plan, now
        return plan

    def on_step_done(self, result: StepResult) -> list[Request]:
        """Fold a step's result in; returns the requests that finished in it."""
        plan, self._inflight = self._inflight, None
        if plan is None:
            raise RuntimeError("on_step_done called with no plan in flight")
        iterations = result.iterations
        if not 1 <= iterations <= plan.iterations:
            raise ValueError(f"step result: iterations {iterations} outside 1..{plan.iterations}")
        if plan.decode:
            self._iters += iterations
        entries = self._entries
        for request_id, counts in result.routing.items():
            entry = entries.get(request_id)
            if entry is not None:
                self.planner.observe_routing(entry.request.task, counts)
        for request_id, counts in result.decode_routing.items():
            entry = entries.get(request_id)
            task = entry.request.task if entry is not None else self._just_finished.get(request_id)
            if task is not None:
                self.planner.observe_routing(task, counts, "decode")
        self.planner.observe_step(result)
        if result.compute_s > 0:  # a backend that did model work: its cycle counts
            prefill_tokens = sum([chunk.num_tokens for chunk in plan.prefill])
            self._cycle = (self._inflight_at, prefill_tokens, len(plan.decode), iterations)

        finished: list[Request] = []
        self._just_finished = {}
        at = result.finished_at
        for chunk in plan.prefill:
            entry = entries.get(chunk.request_id)
            if entry is None or entry.queued:
                continue
            request = entry.request
            request.prefilled_tokens = chunk.start + chunk.num_tokens
            if request.prefilled_tokens == request.input_tokens:
                request.first_token_at = at
                self._start_decoding(entry)
                if request.output_tokens == 1:
                    finished.append(self._finish(entry, at, "length"))
        for output in result.outputs:
            entry = entries.get(output.request_id)
            if entry is None:
                continue
            request = entry.request
            request.expert_hits += output.expert_hits
            request.expert_misses += output.expert_misses
            request.weighted_hits += output.weighted_hits
            request.weighted_choices += output.weighted_choices
            if output.finished and entry.join_iter >= 0:
                finished.append(self._finish(entry, at, output.finish_reason or "stop"))
        heap = self._max_end
        while heap and heap[0][0] <= self._iters:
            _, _, entry = heapq.heappop(heap)
            if entry.join_iter >= 0 and entries.get(entry.request.id) is entry:
                finished.append(self._finish(entry, at, "length"))
        if not self.has_work and self._cycle is not None:
            self._close_cycle(at)  # the loop idles next: the step's end closes its cycle
        return finished

    def _close_cycle(self, now: float, loop_s: float = 0.0) -> None:
        planned_at, prefill_tokens, decode_tokens, iterations = self._cycle
        self._cycle = None
        self.cost.observe_step(prefill_tokens, decode_tokens, iterations, now - planned_at,
                               loop_s)

    # -- internals ----------------------------------------------------------------------------

    def _admit(self, now: float, plan: StepPlan, budget: int) -> None:
        policy, config = self.policy, self.config
        seats = config.max_num_seqs - len(self._decoding) - len(plan.prefill)
        batch = None
        if policy.uses_estimates:
            batch, plan.slowdown = self._batch_estimate(now), self.cost.scale
        waiting, late = self._waiting, self._late
        if policy.defers_late:
            while waiting and waiting[0][0] < now:
                heapq.heappush(late, heapq.heappop(waiting))
        admitted: list[_Entry] = []
        skipped: list[tuple[list, tuple[float, int, _Entry]]] = []
        looked = 0
        blocked = False
        self._estimate_blocked = False
        while (waiting or late) and seats > 0 and budget > 0 \
                and looked < config.admission_lookahead:
            heap = waiting if waiting else late
            item = heapq.heappop(heap)
            entry = item[2]
            if not entry.queued:
                continue
            looked += 1
            request = entry.request
            fits = self.kv_used_bytes + entry.kv_bytes <= self.kv_capacity_bytes
            if not fits or not policy.admits(request, entry.expected_output, batch):
                skipped.append((heap, item))
                blocked = True
                if fits:  # held back by the policy's estimate, not by memory
                    self._estimate_blocked = True
                    plan.deferred += 1
                if policy.skip_blocked:
                    continue
                break
            entry.queued = False
            self._num_waiting -= 1
            request.status, request.admitted_at = RequestStatus.RUNNING, now
            self.kv_used_bytes += entry.kv_bytes
            self._recent.append((request.id, request.task, request.input_tokens))
            demand = self._demand.setdefault(request.task, [0, 0])
            demand[0] += 1
            demand[1] += request.input_tokens
            take = min(request.input_tokens, budget)
            plan.prefill.append(PrefillChunk(request.id, 0, take))
            budget -= take
            seats -= 1
            admitted.append(entry)
            if batch is not None:
                batch.add(entry.expected_output, entry.target, request.input_tokens)
            if take < request.input_tokens:
                self._partial = entry
                break
        for heap, item in skipped:
            heapq.heappush(heap, item)
        self._admission_blocked = blocked and not admitted and not policy.uses_estimates
        if admitted:
            change = self.planner.plan(
                [e.request.task for e in admitted], self._task_demand,
                self.kv_capacity_bytes - self.kv_used_bytes)
            plan.load, plan.evict, plan.run_predictor = (change.load, change.evict,
                                                         change.run_predictor)

    def _batch_estimate(self, now: float) -> BatchEstimate:
        loads, predicts = self.planner.admission_cost()
        load_s = self.cost.load_s(loads) + (self.cost.predictor_s if predicts else 0.0)
        batch = BatchEstimate(now, self.cost, load_s, *self._targets.at(self._iters))
        if self._partial is not None:
            batch.add(self._partial.expected_output, self._partial.target, 0)
        return batch

    def _task_demand(self) -> dict[str, TaskDemand]:
        """Eq. 2's inputs per task: the requests in play and the other recent admissions."""
        demand = {task: list(counts) for task, counts in self._demand.items() if counts[0]}
        for request_id, task, inputs in self._recent:
            entry = self._entries.get(request_id)
            if entry is None or entry.queued:  # finished (or aborted): not counted in play
                counts = demand.setdefault(task, [0, 0])
                counts[0] += 1
                counts[1] += inputs
        return {task: TaskDemand(count, inputs, self.expected_output(task))
                for task, (count, inputs) in demand.items()}

    def expected_output(self, task: str) -> float:
        """Eq. 2's W_o: the mean output of the task's recent finished requests, else the task
        profile's ``mean_output_tokens``."""
        recent = self._outputs.get(task)
        if recent:
            return sum(recent) / len(recent)
        return float(self.tasks[task].mean_output_tokens)

    def _iteration_bound(self, max_iterations: int | None) -> int:
        if self._num_waiting and self._estimate_blocked:
            # Eq. 3 refused a request that fits: its margins move with every iteration, so
            # admission is re-checked after each one, as an engine stepping singly does.
            return 1
        bound = UNBOUNDED_ITERATIONS if max_iterations is None else max_iterations
        iters, entries = self._iters, self._entries
        heap = self._max_end
        while heap and entries.get(heap[0][2].request.id) is not heap[0][2]:
            heapq.heappop(heap)
        if heap:
            bound = min(bound, heap[0][0] - iters)
        if self._num_waiting and self.policy.uses_estimates:
            heap = self._expected_end
            while heap and (heap[0][0] <= iters
                            or entries.get(heap[0][2].request.id) is not heap[0][2]):
                heapq.heappop(heap)
            if heap:
                bound = min(bound, heap[0][0] - iters)
        return max(bound, 1)

    def _start_decoding(self, entry: _Entry) -> None:
        entry.join_iter = self._iters
        request = entry.request
        request.generated_tokens = 1
        self._decoding[request.id] = entry
        self._decode_ids = None
        self._seq += 1
        heapq.heappush(self._max_end,
                       (entry.join_iter + request.output_tokens - 1, self._seq, entry))
        if self.policy.uses_estimates:
            heapq.heappush(self._expected_end, (entry.join_iter + math.ceil(entry.expected_output)
                                                - 1, self._seq, entry))
            self._targets.join(request.id, entry.join_iter, entry.expected_output,
                               request.first_token_at, request.slo.tpot_s)

    def _generated(self, entry: _Entry) -> int:
        if entry.join_iter < 0:
            return 0
        return min(1 + self._iters - entry.join_iter, entry.request.output_tokens)

    def _finish(self, entry: _Entry, at: float, reason: str) -> Request:
        request = entry.request
        request.generated_tokens = self._generated(entry)
        request.status, request.finished_at, request.reason = RequestStatus.FINISHED, at, reason
        outputs = self._outputs.get(request.task)
        if outputs is None:
            outputs = self._outputs[request.task] = deque(maxlen=OUTPUT_WINDOW)
        outputs.append(request.generated_tokens)
        self._just_finished[request.id] = request.task
        del self._entries[request.id]
        self._release(entry)
        return request

    def _release(self, entry: _Entry) -> None:
        """Give back a running request's KV reservation and its place in the batch."""
        request = entry.request
        self.kv_used_bytes -= entry.kv_bytes
        self._demand[request.task][0] -= 1
        self._demand[request.task][1] -= request.input_tokens
        if self._decoding.pop(request.id, None) is not None:
            self._decode_ids = None
            live = len(self._decoding)
            _compact(self._max_end, live, self._is_decoding)
            if self.policy.uses_estimates:
                self._targets.leave(request.id)
                _compact(self._expected_end, live, self._is_expected_later)
        if self._partial is entry:
            self._partial = None
        self._admission_blocked = False

    def _is_decoding(self, item: tuple[int, int, _Entry]) -> bool:
        return self._decoding.get(item[2].request.id) is item[2]

    def _is_expected_later(self, item: tuple[int, int, _Entry]) -> bool:
        return item[0] > self._iters and self._is_decoding(item)


def _is_queued(item: tuple[float, int, _Entry]) -> bool:
    return item[2].queued


def _compact(heap: list, live: int, keep) -> None:
    """Drop a heap's stale items once they outnumber its live ones (amortised O(1) per item),
    so the scheduler holds nothing of requests that have left."""
    if len(heap) > 2 * live:
        heap[:] = [item for item in heap if keep(item)]
        heapq.heapify(heap)

"""The learned expert predictor (the paper's eMoE-A: all layers at once) and its training.

From the previous request of a task (its prompt's and its generated tokens' per-layer expert
distributions: the bag of its expert sequence, which is what backends report) and the task,
predict the next request's per-layer distributions, prompt and generated tokens, for every
layer in one call. The network is residual over the frequency predictor: its logits are the
log of the task's running (exponentially weighted) frequencies plus a per-task bias plus a small
MLP of the previous request, the running frequencies and the task; with the learned parts at
zero it *is* the frequency predictor, so training can only move it where the data says so.

Trained on routing traces (``emoe predictor train --routing-trace ...``) by per-token cross
entropy: each next request's router choices, in order per task. ``evaluate_recall`` replays a
held-out trace through any predictors and measures set recall: per layer the top m experts of
the prediction, the share of the next request's router choices (prompt and generated tokens)
that fall in them, for m = 25, 50 and 75% of the experts.

The file (safetensors, metadata ``emoe.predictor.*``) holds the weights, the task list, the
shape and the measured recall and call time. ``learned:FILE`` names it wherever a predictor is
named (``emoe eval --predictor``, a policy file's ``predictor``): importing this module
registers the ``learned`` loader with ``emoe.core.predictor``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from emoe.core.errors import ConfigError
from emoe.core.predictor import PHASES, ExpertPredictor, register_predictor_loader
from emoe.core.routing_trace import RoutingTrace

FILE_KIND = "emoe-learned-predictor"
DECAY = 0.2  # the running frequencies' decay: the frequency predictor's
RECALL_FRACTIONS = (0.25, 0.5, 0.75)


class PredictorNet(nn.Module):
    """[prev 2xLxE, running 2xLxE, task] -> log-probabilities [2, L, E] (phase, layer, expert)."""

    def __init__(self, num_layers: int, num_experts: int, num_tasks: int, hidden: int = 64):
        super().__init__()
        self.shape = (len(PHASES), num_layers, num_experts)
        size = int(np.prod(self.shape))
        self.num_tasks = num_tasks
        self.hidden = hidden
        self.bias = nn.Parameter(torch.zeros(num_tasks + 1, *self.shape))  # +1: unknown task
        self.body = nn.Sequential(nn.Linear(2 * size + num_tasks + 1, hidden), nn.GELU(),
                                  nn.Linear(hidden, size))
        nn.init.zeros_(self.body[2].weight)
        nn.init.zeros_(self.body[2].bias)

    def forward(self, previous: Tensor, running: Tensor, task: Tensor) -> Tensor:
        """previous, running [B, 2, L, E] (rows sum to 1), task [B] -> log-probs [B, 2, L, E]."""
        onehot = nn.functional.one_hot(task, self.num_tasks + 1).float()  # [B, T+1]
        x = torch.cat([previous.flatten(1), running.flatten(1), onehot], dim=1)  # [B, in]
        logits = (running.clamp_min(1e-4).log() + self.bias[task]
                  + self.body(x).view(-1, *self.shape))  # [B, 2, L, E]
        return logits.log_softmax(dim=-1)


def _normalised(counts: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    totals = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, totals, out=np.broadcast_to(uniform, counts.shape).copy(),
                     where=totals > 0)


class _TaskState:
    """What the predictor keeps per task: the previous request and the running frequencies."""

    def __init__(self, shape: tuple[int, int, int]):
        uniform = np.full(shape, 1.0 / shape[-1])
        self.previous = uniform.copy()
        self.running = uniform.copy()
        self.seen = np.zeros(shape[0], dtype=bool)  # per phase

    def observe(self, phase: int, counts: np.ndarray, uniform: np.ndarray) -> None:
        observed = _normalised(counts, uniform)
        self.previous[phase] = observed
        self.running[phase] = observed if not self.seen[phase] else \
            (1 - DECAY) * self.running[phase] + DECAY * observed
        self.seen[phase] = True


class LearnedPredictor(ExpertPredictor):
    """``ExpertPredictor`` over a trained ``PredictorNet`` (see module)."""

    name = "learned"

    def __init__(self, net: PredictorNet, tasks: Sequence[str]):
        _, layers, experts = net.shape
        super().__init__(layers, experts)
        self.net = net.eval()
        self.task_index = {t: i for i, t in enumerate(tasks)}
        self._states: dict[str, _TaskState] = {}
        self._cache: dict[str, np.ndarray] = {}
        self._uniform = np.full(experts, 1.0 / experts)

    @property
    def observed(self) -> bool:
        return bool(self._states)

    def observe(self, task: str, routing: np.ndarray, phase: str = "prefill") -> None:
        counts = self._check(routing, phase)
        state = self._states.setdefault(task, _TaskState(self.net.shape))
        state.observe(PHASES.index(phase), counts, self._uniform)
        self._cache.pop(task, None)

    def predict(self, task: str, phase: str = "prefill") -> np.ndarray:
        state = self._states.get(task)
        if state is None:
            if not self._states:
                return self._uniform_table()
            state = _TaskState(self.net.shape)  # an unseen task: all tasks' running mean
            state.running = np.mean([s.running for s in self._states.values()], axis=0)
            state.previous = state.running.copy()
        if task not in self._cache:
            for p in range(len(PHASES)):  # a phase never seen: the other phase stands in
                if not state.seen[p] and state.seen[1 - p]:
                    state.running[p], state.previous[p] = state.running[1 - p], state.previous[1 - p]
            index = self.task_index.get(task, self.net.num_tasks)
            with torch.inference_mode():
                out = self.net(torch.as_tensor(state.previous[None], dtype=torch.float32),
                               torch.as_tensor(state.running[None], dtype=torch.float32),
                               torch.tensor([index]))[0].exp().numpy()
            self._cache[task] = out.astype(np.float64)
        return self._cache[task][PHASES.index(phase)].copy()

    def _uniform_table(self) -> np.ndarray:
        return np.full((self.num_layers, self.num_experts), 1.0 / self.num_experts)


# ---------------------------------------------------------------------- training data
@dataclass(slots=True)
class Sequences:
    """Consecutive requests per task: per request ``[2, L, E]`` counts, in trace order."""

    tasks: list[str]
    counts: dict[str, list[np.ndarray]]

    @classmethod
    def from_traces(cls, traces: Sequence[RoutingTrace]) -> "Sequences":
        counts: dict[str, list[np.ndarray]] = {}
        for trace in traces:
            for routing in trace.requests.values():
                counts.setdefault(routing.task, []).append(np.stack(
                    [routing.counts(p, trace.num_experts) for p in PHASES]).astype(np.float64))
        return cls(sorted(counts), counts)

    def examples(self, task_index: dict[str, int]) -> tuple[np.ndarray, ...]:
        """(previous, running, task, target counts) for every request after its task's first."""
        prev, run, idx, target = [], [], [], []
        for task, requests in self.counts.items():
            state = _TaskState(requests[0].shape)
            uniform = np.full(requests[0].shape[-1], 1.0 / requests[0].shape[-1])
            for i, counts in enumerate(requests):
                if i:
                    prev.append(state.previous.copy())
                    run.append(state.running.copy())
                    idx.append(task_index.get(task, len(task_index)))
                    target.append(counts)
                for p in range(len(PHASES)):
                    if counts[p].sum():
                        state.observe(p, counts[p], uniform)
        return (np.array(prev), np.array(run), np.array(idx), np.array(target))


def train_predictor(traces: Sequence[RoutingTrace], hidden: int = 64, steps: int = 300,
                    lr: float = 3e-3, weight_decay: float = 1e-3, seed: int = 0,
                    log: Callable[[str], None] | None = None) -> LearnedPredictor:
    """Fit a ``PredictorNet`` on the traces' consecutive requests per task (full batch)."""
    data = Sequences.from_traces(traces)
    if not data.counts or sum(len(v) - 1 for v in data.counts.values()) < 1:
        raise ConfigError("predictor training: the routing traces need at least two requests "
                          "of one task")
    layers, experts = next(iter(data.counts.values()))[0].shape[1:]
    torch.manual_seed(seed)
    net = PredictorNet(layers, experts, len(data.tasks), hidden)
    prev, run, idx, target = (torch.as_tensor(a) for a in
                              data.examples({t: i for i, t in enumerate(data.tasks)}))
    prev, run, target = prev.float(), run.float(), target.float()
    choices = target.sum().clamp_min(1)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        logp = net(prev, run, idx)  # [N, 2, L, E]
        loss = -(target * logp).sum() / choices
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"step {step}: loss {loss.item():.4f} nats per choice")
    return LearnedPredictor(net, data.tasks)


# ---------------------------------------------------------------------- set recall
def _whole_request(prediction: Callable[[str, str], np.ndarray], task: str,
                   lengths: dict[str, tuple[float, float]]) -> np.ndarray:
    """The request's predicted [L, E] distribution over all its tokens (prompt and output
    weighted by the task's mean lengths)."""
    prompt, output = lengths.get(task, (1.0, 0.0))
    return prompt * prediction(task, "prefill") + output * prediction(task, "decode")


def evaluate_recall(predictors: dict[str, ExpertPredictor], warm: Sequence[RoutingTrace],
                    held_out: RoutingTrace,
                    fractions: Sequence[float] = RECALL_FRACTIONS) -> dict[str, list[float]]:
    """Set recall of each predictor on ``held_out``, replayed request by request in trace order
    after every predictor has observed ``warm``; ``oracle`` (each request's own top m) is the
    ceiling."""
    experts = held_out.num_experts
    lengths: dict[str, tuple[float, float]] = {}
    for task, routings in Sequences.from_traces(warm).counts.items():
        lengths[task] = (statistics.fmean(c[0].sum() for c in routings),
                         statistics.fmean(c[1].sum() for c in routings))
    for predictor in predictors.values():
        for trace in warm:
            _feed(predictor, trace)
    sizes = [max(1, round(f * experts)) for f in fractions]
    hits = {name: np.zeros(len(sizes)) for name in [*predictors, "oracle"]}
    total = 0.0
    for routing in held_out.requests.values():
        counts = routing.counts("prefill", experts) + routing.counts("decode", experts)
        total += counts.sum()
        for name, predictor in predictors.items():
            scores = _whole_request(predictor.predict, routing.task, lengths)
            hits[name] += _covered(scores, counts, sizes)
        hits["oracle"] += _covered(counts.astype(np.float64), counts, sizes)
        for predictor in predictors.values():
            predictor.observe(routing.task, routing.counts("prefill", experts))
            if len(routing.decode_ids):
                predictor.observe(routing.task, routing.counts("decode", experts), "decode")
    return {name: (h / total).tolist() for name, h in hits.items()}


def _covered(scores: np.ndarray, counts: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    order = np.argsort(-scores, axis=1, kind="stable")  # [L, E]
    ranked = np.take_along_axis(counts, order, axis=1).cumsum(axis=1)  # [L, E]
    return np.array([ranked[:, m - 1].sum() for m in sizes], dtype=np.float64)


def _feed(predictor: ExpertPredictor, trace: RoutingTrace) -> None:
    for routing in trace.requests.values():
        predictor.observe(routing.task, routing.counts("prefill", trace.num_experts))
        if len(routing.decode_ids):
            predictor.observe(routing.task, routing.counts("decode", trace.num_experts), "decode")


def call_seconds(predictor: ExpertPredictor, tasks: Sequence[str], calls: int = 200) -> float:
    """Median seconds of one ``predict`` after an ``observe`` (the cache is cold each time)."""
    layers, experts = predictor.num_layers, predictor.num_experts
    counts = np.ones((layers, experts))
    times = []
    for i in range(calls):
        task = tasks[i % len(tasks)]
        predictor.observe(task, counts)
        t0 = time.perf_counter()
        predictor.predict(task)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------- the file
def save_predictor(predictor: LearnedPredictor, path: str | Path, report: dict) -> None:
    from safetensors.torch import save_file

    net = predictor.net
    meta = {"emoe.predictor.kind": FILE_KIND,
            "emoe.predictor.tasks": json.dumps(list(predictor.task_index)),
            "emoe.predictor.shape": json.dumps([net.shape[1], net.shape[2], net.hidden]),
            "emoe.predictor.report": json.dumps(report)}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)


def load_predictor(path: str | Path) -> tuple[PredictorNet, list[str], dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: learned predictor file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ConfigError(f"{path}: not a readable safetensors file: {exc}") from None
    if meta.get("emoe.predictor.kind") != FILE_KIND:
        raise ConfigError(f"{path}: not an emoe learned predictor (metadata "
                          f"'emoe.predictor.kind' is {meta.get('emoe.predictor.kind')!r})")
    tasks = json.loads(meta["emoe.predictor.tasks"])
    layers, experts, hidden = json.loads(meta["emoe.predictor.shape"])
    net = PredictorNet(layers, experts, len(tasks), hidden)
    net.load_state_dict(tensors)
    return net, tasks, json.loads(meta.get("emoe.predictor.report", "{}"))


def loader(path: str) -> Callable[[int, int], ExpertPredictor]:
    """The factory of the predictor in ``path`` (for ``learned:PATH`` names); its predictors
    carry the call time measured when it was trained (``call_s``), which the scheduler and the
    simulator charge for each prediction."""
    net, tasks, report = load_predictor(path)
    call_s = report.get("call_seconds")
    if not isinstance(call_s, (int, float)) or not call_s >= 0:
        raise ConfigError(f"{path}: no measured call time in the learned predictor file "
                          "(report.call_seconds; train it with `emoe predictor train`)")

    def factory(num_layers: int, num_experts: int) -> ExpertPredictor:
        if (num_layers, num_experts) != net.shape[1:]:
            raise ConfigError(f"{path}: predictor trained for {net.shape[1]} layers x "
                              f"{net.shape[2]} experts; the model has {num_layers} x "
                              f"{num_experts}")
        predictor = LearnedPredictor(net, tasks)
        predictor.call_s = float(call_s)
        return predictor

    return factory


register_predictor_loader("learned", loader)

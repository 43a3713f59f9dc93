"""Replaying `emoe eval` runs in the simulator: the machinery of ``emoe calibrate-proxy``
(emoe/sim/calibrate.py, where what is replayed and how is described) and of
benchmarks/proxy_calibration.py."""

from __future__ import annotations

import json
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emoe.core.accuracy import AccuracyCalibration, fit_calibration, pearson, read_json
from emoe.core.errors import ConfigError
from emoe.core.paths import resolve_path
from emoe.core.policy_file import PolicyConfig, model_shape
from emoe.core.routing_trace import RoutingTrace, read_routing_trace
from emoe.core.sensitivity import load_sensitivity
from emoe.core.specs import ModelSpec, get_model
from emoe.sim.runner import SimConfig, Workload, simulate

ARRIVAL_GAP_S = 0.003
"""Seconds between the replayed prompts' arrivals: about one simulated step of the reference
model, as eval adds one prompt per engine step (0.5, 3 and 10 ms gave the same proxies)."""
EXACT = ("all", "lru")


@dataclass(frozen=True, slots=True)
class Replayed:
    """One eval row and the simulator's replay of it (means over random draws)."""

    row: dict[str, Any]
    proxy: float
    hit_rate: float
    slots_per_layer: tuple[int, ...]
    draws: int

    def point(self) -> dict[str, Any]:
        """What a calibration keeps of the run."""
        row, run = self.row, self.row.get("run", {})
        return {"experiment": row.get("experiment", ""), "planner": row["planner"],
                "budget": row["budget"], "slots_per_layer": row.get("slots_per_layer", []),
                "sim_slots_per_layer": list(self.slots_per_layer),
                "planner_sensitivity": row.get("sensitivity", "hand-set"),
                "slot_allocation": run.get("slot_allocation"),
                "proxy": self.proxy, "hit_rate": self.hit_rate,
                "engine_proxy": row.get("proxy"), "engine_hit_rate": row.get("hit_rate"),
                "agreement": row["agreement"], "quality": row["quality"]}


def eval_rows(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The rows of ``emoe eval --json`` files that the simulator can replay (``all`` and
    ``lru`` left out), each labelled with its file's stem as ``experiment`` unless it has one."""
    rows = []
    for path in paths:
        data = read_json(path, "`emoe eval --json` rows")
        if not isinstance(data, list):
            raise ConfigError(f"{path}: a list of `emoe eval --json` rows is needed")
        for i, row in enumerate(data):
            if not isinstance(row, dict) or "planner" not in row:
                raise ConfigError(f"{path}: row {i}: not an `emoe eval --json` row")
            if row["planner"] in EXACT:
                continue
            if not isinstance(row.get("run"), dict):
                raise ConfigError(f"{path}: row {i} ({row['planner']} at {row.get('budget')}): "
                                  f"no 'run' settings; rows written by `emoe eval --json` "
                                  f"since the proxy calibration carry them")
            rows.append({"experiment": Path(path).stem, **row})
    if not rows:
        raise ConfigError("no rows to replay (planners all and lru are exact by construction)")
    return rows


class EvalReplay:
    """Replays eval rows in the simulator over the prompts of ``routing_trace``, the proxy
    weighted by ``proxy_sensitivity`` (None: by each run's planner's own table, as the
    simulator did before calibrations carried one). ``routing``: ``replay`` replays the
    prompts' recorded routing, ``synthetic`` draws it, a path replays another routing trace.
    Temporary files live as long as the object."""

    def __init__(self, routing_trace: Path, proxy_sensitivity: Path | None,
                 routing: str | Path = "replay", arrival_gap_s: float = ARRIVAL_GAP_S):
        self.routing_trace = routing_trace
        self.proxy_sensitivity = proxy_sensitivity
        self.routing = routing
        self._dir = tempfile.TemporaryDirectory(prefix="emoe-calibrate-")
        self._trace = read_routing_trace(routing_trace)
        self._workload = self._write_workload(self._trace, arrival_gap_s)
        self._models: dict[str, ModelSpec] = {}
        self._files = 0

    def close(self) -> None:
        self._dir.cleanup()

    def __enter__(self) -> "EvalReplay":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def requests(self) -> int:
        return len(self._trace.requests)

    def _write_workload(self, trace: RoutingTrace, gap: float) -> Workload:
        """Eval's prompt stream: the recorded requests in recording order (ids ``task-i``),
        with their prompt lengths and all-experts output lengths."""
        def index(rid: str) -> int:
            tail = rid.rsplit("-", 1)[-1]
            return int(tail) if tail.isdigit() else 0

        recorded = sorted(trace.requests.values(), key=lambda r: index(r.request_id))
        path = Path(self._dir.name) / "eval-prompts.csv"
        with path.open("w") as f:
            f.write("id,arrival_s,input_tokens,output_tokens,task\n")
            for i, r in enumerate(recorded):
                f.write(f"{r.request_id},{i * gap:.6f},{len(r.prefill_ids)},"
                        f"{len(r.decode_ids) + 1},{r.task}\n")
        return Workload(trace=path)

    def _file(self, data: dict[str, Any]) -> Path:
        self._files += 1
        path = Path(self._dir.name) / f"{self._files}.json"
        path.write_text(json.dumps(data))
        return path

    def model(self, checkpoint: str) -> ModelSpec:
        if checkpoint not in self._models:
            self._models[checkpoint] = get_model(checkpoint)
        return self._models[checkpoint]

    def check(self, row: dict[str, Any]) -> None:
        """The routing trace must hold eval's prompts: as many per task as eval ran."""
        per_task = row["run"]["per_task"]
        counts: dict[str, int] = {}
        for r in self._trace.requests.values():
            counts[r.task] = counts.get(r.task, 0) + 1
        if set(counts.values()) != {per_task}:
            raise ConfigError(
                f"{self.routing_trace}: {counts} requests per task; eval ran {per_task} per task "
                f"(record the routing of eval's prompts: emoe record-routing CHECKPOINT -o FILE "
                f"--seed {row['run']['prompt_seed']} --per-task {per_task} --max-new-tokens "
                f"{row['run']['max_new_tokens']})")

    def configs(self, row: dict[str, Any]) -> list[SimConfig]:
        """The simulated runs of one eval row (one per random draw)."""
        run = row["run"]
        self.check(row)
        checkpoint = run["checkpoint"]
        model = self.model(checkpoint)
        total = model.num_layers * model.num_experts
        slots = int(round(row["budget"] * total))
        forced = run.get("experts_per_layer")
        if row["planner"] == "random":
            forced = forced or list(row["slots_per_layer"])
        sensitivity, source = {}, None
        if run.get("sensitivity"):
            policy_tasks = list(PolicyConfig().tasks)
            sensitivity, source = load_sensitivity(run["sensitivity"],
                                                   run.get("sensitivity_mode", "graded"),
                                                   model.num_layers, policy_tasks)
        batch = int(run["max_batch_size"])
        profile = self._file({
            "format": "emoe-engine-profile", "version": 1, "model": model.name,
            "provenance": "the engine `emoe eval` runs: its KV slots and context (no timings)",
            "engine": {"model": model.name, **model_shape(model), "threads": 1,
                       "device": run.get("device", "cpu"),
                       "dtype": f"{8 * model.param_bytes}-bit",
                       "max_batch_size": batch, "max_seq_len": model.max_context}})
        draws = int(run.get("random_draws", 1)) if row["planner"] == "random" else 1
        configs = []
        for draw in range(draws):
            policy = PolicyConfig(
                scheduling=run.get("scheduling", "fcfs"), planner=row["planner"],
                predictor=run.get("predictor", "frequency"),
                prediction_interval=int(run["prediction_interval"]),
                expert_budget_bytes=slots * model.expert_bytes, experts_per_layer=forced,
                max_batch_tokens=max(512, batch), max_num_seqs=batch, model=model.name,
                model_shape=model_shape(model), sensitivity=sensitivity,
                sensitivity_source=source,
                slot_allocation=run.get("slot_allocation", "sensitivity"),
                adaptive_interval=bool(run.get("adaptive_interval", False)), random_seed=draw)
            configs.append(SimConfig(
                model=str(resolve_path(checkpoint)), profile=profile,
                policy_file=self._file(policy.to_dict()),
                routing_trace=(self.routing_trace if self.routing == "replay" else None
                               if self.routing == "synthetic" else Path(self.routing)),
                warm_start=run.get("calibration"), proxy_sensitivity=self.proxy_sensitivity))
        return configs

    def replay(self, row: dict[str, Any]) -> Replayed:
        outcomes = [simulate(config, self._workload) for config in self.configs(row)]
        proxies = [o.summary.accuracy_proxy for o in outcomes]
        if any(p is None for p in proxies):
            raise ConfigError(f"{row['planner']} at {row['budget']}: the simulation recorded no "
                              f"weighted choices")
        return Replayed(row=row, proxy=statistics.fmean(proxies),
                        hit_rate=statistics.fmean(o.summary.hit_rate for o in outcomes),
                        slots_per_layer=outcomes[0].resident_per_layer, draws=len(outcomes))


def replay_all(rows: Sequence[dict[str, Any]], replay: EvalReplay,
               progress: Callable[[str], None] | None = None) -> list[Replayed]:
    out = []
    for i, row in enumerate(rows):
        if progress is not None:
            progress(f"[{i + 1}/{len(rows)}] {row.get('experiment', '')}: {row['planner']} at "
                     f"{row['budget']:g}")
        out.append(replay.replay(row))
    return out


def correlations(replayed: Sequence[Replayed]) -> dict[str, float]:
    """Pearson r of the simulator's proxy with agreement and with quality over ``replayed``."""
    xs = [r.proxy for r in replayed]
    return {m: pearson(xs, [r.row[m] for r in replayed]) for m in ("agreement", "quality")}


def worst(calibration: AccuracyCalibration, metric: str, n: int = 5) -> list[dict[str, Any]]:
    """The runs the calibration estimates worst in ``metric``, largest error first."""
    fit = calibration.fits[metric]
    scored = [{**p, "estimate": fit(p["proxy"]), "error": fit(p["proxy"]) - p[metric]}
              for p in calibration.points]
    return sorted(scored, key=lambda p: -abs(p["error"]))[:n]


def format_runs(replayed: Sequence[Replayed]) -> str:
    lines = ["| experiment | planner | budget | slots (eval) | slots (sim) | agreement | quality "
             "| engine proxy | sim proxy | engine hits | sim hits |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in replayed:
        row = r.row
        lines.append(
            f"| {row.get('experiment', '')} | {row['planner']} | {row['budget']:g} | "
            f"{','.join(map(str, row.get('slots_per_layer', [])))} | "
            f"{','.join(map(str, r.slots_per_layer))} | {row['agreement']:.3f} | "
            f"{row['quality']:.3f} | {row.get('proxy', float('nan')):.3f} | {r.proxy:.3f} | "
            f"{row.get('hit_rate', float('nan')):.3f} | {r.hit_rate:.3f} |")
    return "\n".join(lines)


def format_worst(calibration: AccuracyCalibration, n: int = 5) -> str:
    lines = ["| metric | experiment | planner | budget | slots | measured | estimated | error |",
             "|---|---|---|---|---|---|---|---|"]
    for metric in calibration.fits:
        for p in worst(calibration, metric, n):
            lines.append(f"| {metric} | {p.get('experiment', '')} | {p['planner']} | "
                         f"{p['budget']:g} | {','.join(map(str, p['slots_per_layer']))} | "
                         f"{p[metric]:.3f} | {p['estimate']:.3f} | {p['error']:+.3f} |")
    return "\n".join(lines)


def calibrate(replayed: Sequence[Replayed], replay: EvalReplay,
              provenance: dict[str, Any]) -> AccuracyCalibration:
    """The fit of eval's agreement and quality on the replays' proxy."""
    if replay.proxy_sensitivity is None:
        raise ConfigError("a calibration needs the proxy weighted by one measured sensitivity "
                          "table (--sensitivity)")
    rows = [r.row for r in replayed]
    model = replay.model(rows[0]["run"]["checkpoint"])
    table, source = load_sensitivity(replay.proxy_sensitivity, "graded", model.num_layers, list(PolicyConfig().tasks))
    source["file"] = str(replay.proxy_sensitivity)
    routing = (f"replayed: {replay.routing_trace} ({replay.requests} requests)"
               if replay.routing == "replay" else "synthetic" if replay.routing == "synthetic"
               else f"replayed: {replay.routing} (other prompts than eval's)")
    return fit_calibration([r.point() for r in replayed], table, model.name, source, routing,
                           provenance)

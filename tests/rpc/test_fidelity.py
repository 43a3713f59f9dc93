"""`emoe profile` of the served engine, its use by `emoe sim` and `emoe serve`, and `emoe
fidelity` end to end on the reference model (a few requests, a live server)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from emoe.cli import main
from emoe.core.errors import ConfigError
from emoe.core.profile import load_profile
from emoe.rpc import cli
from emoe.rpc.local import REFERENCE_CHECKPOINT
from emoe.rpc.serve_process import free_port

from .test_offload_serve import parse

REF = str(REFERENCE_CHECKPOINT)


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """`emoe profile` as the README shows it, one round over every grid (quick, noisy)."""
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    assert main(["profile", "--threads", "1", "--repeats", "1", "--out", str(path)]) == 0
    return path


def test_profile_of_the_served_engine_has_every_section(profile, capsys):
    p = load_profile(profile)
    e = p.engine
    assert (e.model, e.num_layers, e.num_experts, e.top_k, e.hidden_size) == (
        "emoe-tiny", 4, 8, 2, 128)
    assert (e.threads, e.max_batch_size, e.max_seq_len, e.dtype) == (1, 16, 256, "float32")
    table = p.step_table
    assert table.tokens[0] == 1 and table.tokens[-1] == 255 and all(s > 0 for s in table.seconds)
    assert table.decode_batches == (1, 2, 4, 8, 12, 16) and all(s > 0 for s in table.decode_base_s)
    decodes = [s for s in p.samples if s.decode_tokens and not s.prefill_tokens]
    assert len(decodes) == 18 + 5  # every batch at three contexts, then unequal contexts
    decodes = decodes[:18]  # each batch's base is the median of its three
    for batch, base in zip(table.decode_batches, table.decode_base_s):
        at = sorted(s.seconds - table.per_context_token_s * s.context_tokens for s in decodes
                    if s.decode_tokens == batch)
        assert base == pytest.approx(at[1])
    assert "decode steps by their batch within" in p.provenance
    assert "decode steps of unequal contexts within" in p.provenance
    assert p.serving is not None and p.serving.ingress_s > 0 and p.serving.egress_s >= 0
    assert p.predictor_s is not None and p.memory["expert_bytes"] == 3 * 128 * 256 * 4
    assert "load average" in p.provenance and "serving: one live serving session" in p.provenance
    assert "log(cycle / fit) scatters by sigma" in p.provenance
    assert "pcie latency: what an expert fetched on a miss" in p.provenance
    assert main(["sim", "--model", REF, "--profile", str(profile), "--duration", "10",
                 "--fit", "skip", "--scheduler", "fcfs", "--experts", "all",
                 "--no-progress"]) == 0
    assert "SIMULATED emoe-tiny" in capsys.readouterr().out


def test_a_profile_of_another_model_or_thread_count_is_refused(profile, capsys):
    assert main(["sim", "--profile", str(profile), "--duration", "5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "measured on model 'emoe-tiny' (4 layers x 8 experts, top-2, hidden 128)" in err
    assert "'mixtral-8x7b', differs: layers 4 vs 32, hidden_size 128 vs 4096" in err
    with pytest.raises(ConfigError, match="measured with 1 engine thread.*this server's engine "
                                          "runs 2.*--threads 2"):
        cli._profiled(parse("serve", "--profile", str(profile), "--threads", "2"))


def test_fidelity_end_to_end_writes_the_report_with_every_key(profile, tmp_path, capsys):
    report = tmp_path / "report.json"
    assert main(["fidelity", "--profile", str(profile), "--limit", "6", "--rate-scale", "4",
                 "--fit", "scale", "--experts", "all,lru", "--out-dir", str(tmp_path / "out"),
                 "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "load average before" in printed and "load average after" in printed
    doc = json.loads(report.read_text())
    assert isinstance(doc["rank_agreement"], bool)
    assert isinstance(doc["rank_agreement_resolved"], bool)
    assert set(doc["ranking"]["pairs"]) == {"same", "tied", "opposite", "resolved"}
    assert set(doc["load_average"]) == {"before", "after"}
    for name, policy in doc["policies"].items():  # the server's engine against the profile
        speed = policy["engine_speed"]
        assert speed["simulated"] == 1.0 and "as_profiled" not in policy
        if name == "fcfs/lru" and speed["served"] is None:
            continue  # every step fetched an expert on a miss: its cycles are summed apart
        assert 0.1 < speed["served"] < 10 and 0.1 < speed["compute"] < 10
    assert "speed during the replay: the server's loop cycles took x" in printed
    # the same routing on both sides: task prompts whose routing was recorded first
    assert doc["prompts"] == "tasks" and doc["routing"].endswith("routing.parquet")
    lru = doc["policies"].pop("fcfs/lru")
    fetch = lru["engine_speed"]["fetch_cost_s"]  # what a fetch on a miss cost as served
    assert fetch["profile"] > 0 and fetch["simulated"] == fetch["profile"]
    if lru["engine_speed"]["compute"] is None:  # no step without a fetch: its cost is unknown
        assert fetch["served"] is None and "but every step fetched one" in printed
    else:
        assert isinstance(fetch["served"], float)
    assert "cycles" in fetch  # fitted from the loop's cycles that fetched, where it could be
    samples = lru["engine_speed"].get("samples")
    if samples is not None:  # the cycles that fetched, summed apart by the real engine's loop
        last = dict(zip(samples["columns"], samples["rows"][-1]))
        assert last["fetch_cycle_fetched"] > 0 and last["prefill_fetch_cycle_fetched"] > 0
        assert last["fetch_cycle_s"] >= last["prefill_fetch_cycle_s"] > 0
    assert 0 < lru["hit_rate"]["sim"] < 1 and 0 < lru["hit_rate"]["real"] < 1
    assert lru["bytes_loaded"]["sim"] > 0 and lru["bytes_loaded"]["real"] > 0
    (name, policy), = doc["policies"].items()
    assert name == "fcfs/all"
    for metric in ("ttft", "tpot", "e2e", "queueing"):
        entry = policy["metrics"][metric]
        for side in ("sim", "real", "rel_error", "real_ci90", "sim_cdf_at_real"):
            assert set(entry[side]) == {"p50", "p90", "p99"}, (metric, side)
        for q, (low, high) in entry["real_ci90"].items():
            assert low <= entry["real"][q] <= high, (metric, q)
        assert 0 <= entry["ks"] <= 1
        assert entry["sim"]["p50"] > 0 or metric == "queueing"
    assert policy["requests"] == {"sim": 6, "real": 6}
    assert policy["finished"]["real"] == 6
    assert set(policy["hit_rate"]) == {"sim", "real", "diff_points"}
    slo = policy["slo_attainment"]
    assert set(slo) == {"sim", "real", "diff_points", "real_ci90"}
    assert 0 <= slo["real_ci90"][0] <= slo["real"] <= slo["real_ci90"][1] <= 1
    for key in ("goodput_rps", "bytes_loaded", "predictor_calls"):
        assert set(policy[key]) >= {"sim", "real"}
    assert policy["bytes_loaded"]["sim"] == policy["bytes_loaded"]["real"] > 0  # all experts once
    admission = policy["admission"]  # fcfs holds nothing back and costs nothing
    assert (admission["deferred"]["sim"], admission["deferred"]["real"]) == (0, 0)
    assert (admission["slowdown"]["sim"], admission["slowdown"]["real"]) == (None, None)
    assert (tmp_path / "out" / "cdf-fcfs-all.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "fcfs-all-real.csv").exists()
    simulated = pd.read_csv(tmp_path / "out" / "fcfs-all-sim.csv")
    for metric, column in (("ttft", "ttft_s"), ("e2e", "e2e_s")):  # where the measured lies
        entry = policy["metrics"][metric]
        for q, real in entry["real"].items():
            share = float((simulated[column] <= real).mean())
            assert entry["sim_cdf_at_real"][q] == pytest.approx(share), (metric, q)
    assert "measured at sim %" in printed


def test_at_the_served_speed_the_simulation_as_profiled_is_reported_beside(profile, tmp_path):
    report = tmp_path / "report.json"
    assert main(["fidelity", "--profile", str(profile), "--limit", "4", "--fit", "scale",
                 "--engine-speed", "served", "--out-dir", str(tmp_path / "out"), "--no-plots",
                 "--json", str(report)]) == 0
    doc = json.loads(report.read_text())
    assert doc["engine_speed"] == "served"
    (policy,) = doc["policies"].values()
    speed = policy["engine_speed"]
    assert speed["simulated"] == speed["served"]
    as_profiled = policy["as_profiled"]["metrics"]["e2e"]
    assert as_profiled["real"] == policy["metrics"]["e2e"]["real"]
    assert as_profiled["sim"] != policy["metrics"]["e2e"]["sim"]


def test_a_speed_timeline_simulates_each_window_at_its_own_speed(profile, tmp_path, capsys):
    """``--engine-speed timeline``: the server's loop speed sampled during the replay, each
    window simulated at its own, with the simulations at the replay's one speed and as
    profiled beside it (here with every step drawn around its model as the server's cycles
    scattered within the windows: ``--step-scatter measured``, every simulated number the
    median of three draws of it), under the emoe scheduler, whose Eq. 3 is reported from both
    sides."""
    report = tmp_path / "report.json"
    assert main(["fidelity", "--profile", str(profile), "--limit", "4", "--fit", "scale",
                 "--engine-speed", "timeline", "--step-scatter", "measured",
                 "--scheduler", "emoe", "--sim-draws", "3",
                 "--out-dir", str(tmp_path / "out"), "--no-plots", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "its speed sampled every 0.5 s:" in printed
    assert "simulated window by window at the server's loop speed as sampled" in printed
    assert "its cycles scattered around their model within each window: log sigma" in printed
    doc = json.loads(report.read_text())
    assert doc["step_scatter"] == "measured"
    (policy,) = doc["policies"].values()
    speed = policy["engine_speed"]
    timeline = speed["timeline"]
    assert len(timeline["speeds"]) == len(timeline["starts"]) >= 2  # the replay took ~1.5 s
    assert timeline["starts"][0] == 0.0 and timeline["sample_s"] == 0.5
    assert all(0.1 < s < 10 for s in timeline["speeds"])
    assert len(timeline["prefill_speeds"]) == len(timeline["speeds"])
    assert 0 < speed["scatter"]["sigma"] < 1 and -1 < speed["scatter"]["lag1"] < 1
    assert -1 < speed["scatter"]["centre"] < 1
    samples = speed["samples"]  # the counters the timeline and the scatter come from
    assert samples["columns"][:2] == ["t", "cycle_s"]
    assert all(len(row) == len(samples["columns"]) for row in samples["rows"])
    # what a decode-only step's token cost beyond the profile, fitted from the samples' lines
    last = dict(zip(samples["columns"], samples["rows"][-1]))
    assert last["decode_streamed"] > 0
    # the requests the loop accepted while busy (those that found it idle are not counted),
    # and what that cost it (simulated)
    assert 0 <= last["arrivals"] <= 4 and last["prefill_arrivals"] <= last["arrivals"]
    # the prompt steps by their tokens in the table's segments, and the shape they give
    segments = last["prefill_segment_cycle_profiled_s"]
    assert sum(segments) == pytest.approx(last["prefill_cycle_profiled_s"])
    shape = speed["prefill_shape"]
    assert len(shape["factors"]) == len(shape["tokens"]) + 1 == len(segments)
    assert shape["tokens"] == list(load_profile(profile).step_table.tokens)
    assert "prompt steps by their tokens against the others, as served:" in printed
    assert timeline["arrival_s"] == 0.0  # measured and reported, not simulated
    assert speed["arrival_s"] >= 0.0
    assert "the loop's work per request accepted" in printed
    assert speed["decode_token_s"] >= -load_profile(profile).serving.token_s
    assert "beyond the profile's, as the cycles grew with their tokens" in printed
    # around the kind's own windows, within what the windows' model adds to the profile's
    # (the prompt-size shape), which the whole replay's ratio leaves out (once 1.5318 against
    # windows of 1.4599-1.5318)
    windows = timeline["prefill_speeds"]
    assert 0.95 * min(windows) <= speed["by_kind"]["prefill"] <= 1.05 * max(windows)
    sums = {k: np.diff(v) for k, v in zip(samples["columns"], zip(*samples["rows"]))}
    model = sums["cycle_profiled_s"] - sums["prefill_cycle_profiled_s"]
    ratios = ((sums["cycle_s"] - sums["prefill_cycle_s"]) / model)[model > 0]
    assert min(ratios) <= speed["by_kind"]["decode"] <= max(ratios)
    real = policy["metrics"]["e2e"]["real"]
    assert policy["as_served"]["metrics"]["e2e"]["real"] == real
    assert policy["as_profiled"]["metrics"]["e2e"]["real"] == real
    assert policy["as_served"]["metrics"]["e2e"]["sim"] != policy["metrics"]["e2e"]["sim"]
    assert policy["sim_draws"] == doc["sim_draws"] == 3
    draws = [pd.read_csv(tmp_path / "out" / name) for name in
             ("emoe-all-sim.csv", "emoe-all-sim-draw1.csv", "emoe-all-sim-draw2.csv")]
    for key, column in (("ttft", "ttft_s"), ("e2e", "e2e_s")):
        entry = policy["metrics"][key]
        at = [float(np.percentile(d[column].dropna(), 90)) for d in draws]
        assert entry["sim"]["p90"] == pytest.approx(float(np.median(at)))
        assert entry["sim_range"]["p90"] == pytest.approx([min(at), max(at)])
        assert entry["sim_draws"]["p90"] == pytest.approx(at)
    slo = policy["slo_attainment"]
    assert len(slo["sim_draws"]) == 3 and slo["sim"] == pytest.approx(np.median(slo["sim_draws"]))
    assert "simulated: the median of 3 draws of the step scatter" in printed
    assert "sim_range" not in policy["as_served"]["metrics"]["e2e"]  # one draw beside
    slowdown = policy["admission"]["slowdown"]  # what Eq. 3 believed of the engine's speed
    assert 0.1 < slowdown["sim"] < 10 and 0.1 < slowdown["real"] < 10
    assert "admission: Eq. 3 held back a waiting request" in printed


def test_without_a_profile_fidelity_measures_one_first(tmp_path, monkeypatch, capsys):
    """As `emoe profile` would (here with one round, for time), then the comparison."""
    from emoe.engine import profile as engine_profile
    from emoe.rpc import serving_profile

    profile_model, measure_serving = engine_profile.profile_model, serving_profile.measure_serving
    monkeypatch.setattr(engine_profile, "profile_model",
                        lambda model, name: profile_model(model, name, repeats=1))
    monkeypatch.setattr(serving_profile, "measure_serving",
                        lambda checkpoint, profile: measure_serving(checkpoint, profile, rounds=1))
    out = tmp_path / "out"
    assert main(["fidelity", "--threads", "1", "--limit", "3", "--fit", "scale",
                 "--prompts", "random", "--out-dir", str(out), "--no-plots"]) == 0
    assert "no --profile: measuring one (emoe-tiny, 1 thread(s))" in capsys.readouterr().out
    assert load_profile(out / "profile.json").engine.threads == 1


def test_a_server_that_does_not_come_up_is_reported(profile, tmp_path, capsys):
    broken = tmp_path / "emoe-tiny"
    broken.mkdir()
    shutil.copy(REFERENCE_CHECKPOINT / "config.json", broken / "config.json")  # no weights
    assert main(["fidelity", "--checkpoint", str(broken), "--profile", str(profile),
                 "--limit", "2", "--prompts", "random", "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "emoe serve --checkpoint" in err and "before it came up: emoe serve: error:" in err
    assert "no *.safetensors files" in err
    # task prompts: the routing of the workload is recorded on the engine first
    assert main(["fidelity", "--checkpoint", str(broken), "--profile", str(profile),
                 "--limit", "2", "--out-dir", str(tmp_path / "out")]) == 2
    assert "tokenizer.json: not found" in capsys.readouterr().err
    assert main(["fidelity", "--profile", str(profile), "--limit", "2", "--target",
                 f"127.0.0.1:{free_port()}", "--out-dir", str(tmp_path / "out")]) == 2
    assert "no emoe serve answering there within 5 s" in capsys.readouterr().err
    assert main(["fidelity", "--profile", str(profile), "--step-scatter", "1.5",
                 "--out-dir", str(tmp_path / "out")]) == 2  # before anything is measured
    assert "--step-scatter: a sigma in [0, 1) or 'measured', got '1.5'" in \
        capsys.readouterr().err
    assert main(["fidelity", "--profile", str(profile), "--sim-draws", "3",
                 "--out-dir", str(tmp_path / "out")]) == 2
    assert "--sim-draws: draws differ only in the step scatter" in capsys.readouterr().err


def test_a_pair_of_policies_is_resolved_when_its_requests_differ_beyond_a_sign_test():
    """Over the requests both replays ran: b met their SLO under the first policy only, c under
    the second only; resolved when |b - c| > 2 sqrt(b + c)."""
    import pandas as pd

    from emoe.rpc.fidelity import resolved_pairs

    ids = range(100)
    base = pd.Series([i < 50 for i in ids], index=ids)
    close = pd.Series([i < 50 or i >= 95 for i in ids], index=ids)  # b 0, c 5: 5 > 4.47
    closer = pd.Series([i < 50 or i >= 97 for i in ids], index=ids)  # b 0, c 3: 3 < 3.46
    swapped = pd.Series([10 <= i < 60 for i in ids], index=ids)  # b 10, c 10: as many met
    assert resolved_pairs({"a": base, "b": close, "c": closer, "d": swapped}) == ["a vs b"]
    # only the requests both replays ran count: without 95-99 the two are alike
    assert resolved_pairs({"a": base, "b": close.loc[:94]}) == []


def test_fetches_on_every_step_leave_their_cost_unknown_and_simulated_as_profiled(capsys):
    from emoe.rpc.fidelity import Side, _as_served

    def served(fetch_cost_s, compute):
        side = Side(None, None, None, None, 1.0, engine_speed=compute, compute_speed=compute,
                    fetch_cost_s=fetch_cost_s, fetched=12)
        return _as_served(side, "served", 0.002)

    speed, _, cost = served(None, None)  # no step without a fetch: no compute speed
    assert speed["fetch_cost_s"] == {"served": None, "cycles": None, "profile": 0.002,
                                     "simulated": 0.002}
    assert cost is None
    assert "12 experts fetched on a miss, but every step" in capsys.readouterr().out
    speed, _, cost = served(0.003, 1.2)
    assert speed["fetch_cost_s"] == {"served": 0.003, "cycles": None, "profile": 0.002,
                                     "simulated": 0.003}
    assert cost == 0.003


def test_a_timeline_simulates_the_fetch_cost_its_cycles_gave():
    """``--engine-speed timeline`` simulates a fetch at what the loop's cycles that fetched
    cost beyond their model (``SpeedTimeline.fetch_s``, fitted), else at the compute's;
    ``served`` keeps the compute's; both are reported."""
    from emoe.rpc.fidelity import Side, _as_served
    from emoe.sim.speed import SpeedTimeline

    def as_served(mode, fitted):
        timeline = SpeedTimeline((0.0,), (1.1,), fetch_s=4e-4, fetch_fitted=fitted)
        side = Side(None, None, None, None, 1.0, engine_speed=1.1, compute_speed=1.2,
                    fetch_cost_s=3e-4, speed_timeline=timeline, speed_samples=[], fetched=12)
        return _as_served(side, mode, 0.002)

    speed, simulated, cost = as_served("timeline", True)
    assert isinstance(simulated, SpeedTimeline) and cost == 4e-4
    assert speed["fetch_cost_s"] == {"served": 3e-4, "cycles": 4e-4, "profile": 0.002,
                                     "simulated": 4e-4}
    assert speed["timeline"]["fetch_s"] == 4e-4
    assert as_served("served", True)[2] == 3e-4
    speed, _, cost = as_served("timeline", False)  # the timeline was given the compute's
    assert cost == 3e-4 and speed["fetch_cost_s"]["cycles"] is None


def test_a_measured_percentile_comes_with_its_bootstrap_interval():
    """The 90% interval of a statistic over resamples of the measured values: it holds the
    value, narrows with more requests, and is the same from run to run (seeded)."""
    import numpy as np

    from emoe.rpc.fidelity import _bootstrap

    rng = np.random.default_rng(1)
    few, many = rng.lognormal(0, 0.5, 300), rng.lognormal(0, 0.5, 30000)

    def p90(x):
        return np.percentile(x, 90, axis=-1)

    low, high = _bootstrap(few, p90)
    assert low < np.percentile(few, 90) < high
    narrow = _bootstrap(many, p90)
    assert narrow[1] - narrow[0] < (high - low) / 2
    assert list(_bootstrap(few, p90)) == [low, high]

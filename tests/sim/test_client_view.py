"""The served engine as its client sees it: a request reaches the scheduler ingress(streams)
after it was sent, a token reaches the client the loop's work after the engine's step
(step_s + token_s per token streamed) plus egress(streamed) after its step ended, and the
ended request is reported on the client's clock."""

from __future__ import annotations

import dataclasses
import json

import pytest

from emoe.core.errors import ConfigError
from emoe.core.request import SLO, Request
from emoe.sim.client import ClientView
from emoe.sim.runner import SimConfig, build
from emoe.sim.world import World

INGRESS, PER_STREAM_IN, EGRESS, PER_STREAM_OUT = 1e-3, 4e-4, 5e-4, 2e-4
STEP_S, TOKEN_S = 1e-4, 1e-5  # the serving loop's work after each engine step


@pytest.fixture()
def served(tmp_path):
    folder = tmp_path / "tiny-moe"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64,
        "torch_dtype": "float32"}))
    profile = folder / "profile.json"
    profile.write_text(json.dumps({
        "format": "emoe-engine-profile", "version": 1, "model": folder.name,
        "step_time": {"step_overhead_s": 0.002, "prefill_s_per_token": 1e-4,
                      "decode_s_per_token": 3e-4, "attention_s_per_context_token": 0.0},
        "serving": {"step_s": STEP_S, "token_s": TOKEN_S, "ingress_s": INGRESS,
                    "egress_s": EGRESS, "ingress_per_stream_s": PER_STREAM_IN,
                    "egress_per_stream_s": PER_STREAM_OUT},
        "engine": {"model": folder.name, "num_layers": 2, "num_experts": 4, "top_k": 2,
                   "hidden_size": 16, "threads": 1, "device": "cpu", "dtype": "float32",
                   "max_batch_size": 4, "max_seq_len": 64}}))
    return SimConfig(model=str(folder), profile=profile, scheduling="fcfs", planner="all")


def test_ingress_grows_with_the_streams_running_and_egress_with_the_tokens_streamed(served):
    scheduler, backend = build(served)
    costs = backend.cost.serving
    assert (costs.ingress(3), costs.egress(2)) == pytest.approx(
        (INGRESS + 3 * PER_STREAM_IN, EGRESS + 2 * PER_STREAM_OUT))
    accepted, server_side = {}, {}
    admit = backend.admit

    def admitted(request):  # the server's clock: arrival = acceptance
        accepted[request.id] = (request.arrival, world.env.now)
        admit(request)

    backend.admit = admitted
    ended: list[Request] = []
    client = ClientView(backend.cost.serving_at, ended.append)
    convert = client.ended

    def on_end(request):
        server_side[request.id] = (request.first_token_at, request.finished_at)
        convert(request)

    client.ended = on_end
    slo = SLO(1.0, 1.0)
    # "a" streams alone; "b" is sent while a step runs it; "c" and "d" join while both stream
    requests = [Request("a", 0.0, "qa", 8, 30, slo), Request("b", 0.0101, "qa", 4, 3, slo),
                Request("c", 0.0202, "qa", 4, 2, slo), Request("d", 0.0203, "qa", 4, 2, slo)]
    sent = {r.id: r.arrival for r in requests}
    world = World(scheduler, backend, requests, lambda r: None, client=client)
    world.run()

    assert {r.id for r in ended} == set(sent)
    a_at, a_seen = accepted["a"]
    assert a_at == pytest.approx(INGRESS) and a_seen == pytest.approx(a_at)  # idle server
    b_at, b_seen = accepted["b"]
    assert b_at == pytest.approx(0.0101 + INGRESS + PER_STREAM_IN)  # one stream running
    assert b_seen >= b_at
    for r in ended:  # the scheduler's times are the engine's step ends, as served
        first, finished = server_side[r.id]
        assert r.arrival == sent[r.id]  # back on the client's clock
        out = r.first_token_at - first
        most = STEP_S + 4 * TOKEN_S + EGRESS + 4 * PER_STREAM_OUT + 1e-12  # 4 tokens out
        assert STEP_S + TOKEN_S + EGRESS + PER_STREAM_OUT <= out + 1e-12 and out <= most
        assert finished < r.finished_at <= finished + most
    # "b" made its first token in a step that also streamed "a"'s: two tokens out
    b = next(r for r in ended if r.id == "b")
    assert b.first_token_at - server_side["b"][0] == pytest.approx(
        STEP_S + 2 * TOKEN_S + EGRESS + 2 * PER_STREAM_OUT)


def test_emoe_sim_reports_requests_as_the_client_of_a_served_engine_sees_them(served,
                                                                              tmp_path):
    """Through ``simulate`` (what ``emoe sim --profile`` and ``emoe fidelity`` run): a lone
    request's TTFT and E2E are the engine's plus its way in and its tokens' way out."""
    import dataclasses

    import pandas as pd

    from emoe.sim.runner import Workload, simulate

    trace = tmp_path / "one.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens,task\n0.5,8,3,qa\n")
    doc = json.loads(served.profile.read_text())
    doc["serving"].update(ingress_s=0.0, egress_s=0.0, ingress_per_stream_s=0.0,
                          egress_per_stream_s=0.0)
    engine_only = tmp_path / "no-path.json"
    engine_only.write_text(json.dumps(doc))
    rows = {}
    for name, config in (("served", served),
                         ("engine", dataclasses.replace(served, profile=engine_only))):
        simulate(config, Workload(trace=trace), out=tmp_path / f"{name}.csv")
        rows[name] = pd.read_csv(tmp_path / f"{name}.csv").iloc[0]
    served_row, engine_row = rows["served"], rows["engine"]
    assert served_row["arrival_s"] == engine_row["arrival_s"] == pytest.approx(0.5)
    way = INGRESS + EGRESS + PER_STREAM_OUT  # idle server; each step streams one token
    assert served_row["ttft_s"] - engine_row["ttft_s"] == pytest.approx(way)
    assert served_row["e2e_s"] - engine_row["e2e_s"] == pytest.approx(way)
    assert served_row["tpot_s"] == pytest.approx(engine_row["tpot_s"])


def test_the_engine_simulated_at_another_speed_than_profiled(served):
    """``engine_speed`` (what ``emoe fidelity --engine-speed served`` sets from the served
    loop's cycles) scales the engine's steps and the serving path's costs alike: the machine
    ran that much slower; a speed that is no positive number is refused."""
    import dataclasses

    from emoe.core.errors import ConfigError

    step = dict(prefill_tokens=8, decode_tokens=2, context_tokens=20, resident_experts=8)
    _, profiled = build(served)
    _, slower = build(dataclasses.replace(served, engine_speed=1.5))
    assert slower.cost.step_s(**step) == pytest.approx(1.5 * profiled.cost.step_s(**step))
    assert slower.cost.serving_s(decode_tokens=2) == pytest.approx(
        1.5 * profiled.cost.serving_s(decode_tokens=2))
    assert slower.cost.serving.ingress(3) == pytest.approx(1.5 * profiled.cost.serving.ingress(3))
    assert slower.cost.serving.egress(3) == pytest.approx(1.5 * profiled.cost.serving.egress(3))
    for speed in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="engine speed: must be a positive number"):
            build(dataclasses.replace(served, engine_speed=speed))


def test_expert_copies_simulated_at_the_fetch_cost_found_as_served(served):
    """``fetch_cost_s`` (what ``emoe fidelity --engine-speed served`` measured a fetch on a
    miss to cost) sets the engine's copies; the scheduler keeps the profile's, as the server."""
    import dataclasses

    from emoe.core.errors import ConfigError

    scheduler, profiled = build(served)
    _, fetching = build(dataclasses.replace(served, fetch_cost_s=4e-4))
    hw = fetching.hardware
    nbytes = fetching.model.expert_bytes
    assert hw.pcie_latency_s + nbytes / hw.pcie_bandwidth_bytes_per_s == pytest.approx(4e-4)
    assert scheduler.hardware.pcie_latency_s == profiled.hardware.pcie_latency_s
    with pytest.raises(ConfigError, match="fetch cost: must be a non-negative number"):
        build(dataclasses.replace(served, fetch_cost_s=-1.0))


def _ended(config, requests, max_iterations=None):
    """The requests as the client sees them, simulated under ``config``."""
    scheduler, backend = build(config)
    ended: list[Request] = []
    client = ClientView(backend.cost.serving_at, ended.append)
    World(scheduler, backend, requests, lambda r: None, client=client,
          max_iterations=max_iterations).run()
    return {r.id: (r.first_token_at, r.finished_at) for r in ended}


def test_a_speed_timeline_runs_each_window_at_its_speed(served):
    """``engine_speed`` as a ``SpeedTimeline`` (``emoe fidelity --engine-speed timeline``): a
    step runs at the speed of the window it starts in, and a macro step ends where the speed
    changes, so macro-stepping gives what single steps give; one window is the constant."""
    import dataclasses

    from emoe.sim.speed import SpeedTimeline

    slo = SLO(1.0, 1.0)

    def requests():
        return [Request("a", 0.0, "qa", 8, 40, slo), Request("b", 0.05, "qa", 8, 10, slo)]

    timeline = SpeedTimeline((0.0, 0.03, 0.06), (1.0, 2.0, 1.3))
    changing = dataclasses.replace(served, engine_speed=timeline)
    macro, single = _ended(changing, requests()), _ended(changing, requests(), 1)
    assert macro.keys() == single.keys() == {"a", "b"}
    for rid in macro:
        assert macro[rid] == pytest.approx(single[rid])
    steady = _ended(served, requests())
    assert macro["a"][0] == pytest.approx(steady["a"][0])  # its first token comes before 0.03
    assert macro["a"][1] > steady["a"][1] and macro["b"][1] > steady["b"][1]
    # every window at x2 is the constant x2
    twice = _ended(dataclasses.replace(served, engine_speed=SpeedTimeline((0.0, 0.03),
                                                                          (2.0, 2.0))),
                   requests())
    constant = _ended(dataclasses.replace(served, engine_speed=2.0), requests())
    for rid in constant:
        assert twice[rid] == pytest.approx(constant[rid])


def test_a_speed_timeline_from_sampled_counters():
    """Each window between samples at its own ratio of cycles to model, shrunk towards the
    run's by ``prior_s`` seconds of model. A cycle counts in the window it closed in, so the
    idle window just before a busy one, where that one's first cycle began, takes its speed;
    an idle window before that keeps the speed before it."""
    from emoe.core.errors import ConfigError
    from emoe.sim.speed import SpeedTimeline

    # busy, idle, idle, busy, idle
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    cycles, model = [0.0, 0.6, 0.6, 0.6, 1.4, 1.4], [0.0, 0.5, 0.5, 0.5, 1.0, 1.0]
    timeline = SpeedTimeline.from_samples(times, cycles, model, prior_s=0.0001)
    assert timeline.starts == (0.0, 2.0)
    assert timeline.speeds == pytest.approx((1.2, 1.6), rel=1e-3)
    overall = 1.4 / 1.0
    shrunk = SpeedTimeline.from_samples(times, cycles, model, prior_s=0.5)
    assert shrunk.speeds[0] == pytest.approx((0.6 + 0.5 * overall) / (0.5 + 0.5))
    # an idle start: the first busy window's speed from 0
    late = SpeedTimeline.from_samples([0.0, 1.0, 2.0], [0.0, 0.0, 0.6], [0.0, 0.0, 0.5],
                                      prior_s=0.0001)
    assert late.starts == (0.0,) and late.speeds == pytest.approx((1.2,), rel=1e-3)
    assert timeline.window(-1.0) == 0 and timeline.window(1.5) == 0
    assert timeline.window(2.5) == 1 and timeline.window(4.5) == 1
    # busy windows back to back each start at the sample before them
    busy = SpeedTimeline.from_samples([0.0, 1.0, 2.0, 3.0], [0.0, 0.6, 1.4, 2.0],
                                      [0.0, 0.5, 1.0, 1.5], prior_s=0.0001)
    assert busy.starts == (0.0, 1.0, 2.0)
    assert timeline.next_change(0) == 2.0 and timeline.next_change(1) == float("inf")
    with pytest.raises(ConfigError, match="no modelled cycle"):
        SpeedTimeline.from_samples([0.0, 1.0], [0.0, 0.0], [0.0, 0.0])
    with pytest.raises(ConfigError, match="two or more samples"):
        SpeedTimeline.from_samples([0.0], [0.0], [0.0])
    with pytest.raises(ConfigError, match="must ascend from 0"):
        SpeedTimeline((0.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="must be a positive number"):
        SpeedTimeline((0.0, 1.0), (1.0, 0.0))


def test_steps_that_run_a_prompt_chunk_at_their_own_speed(served):
    """A timeline's ``prefill_speeds``: a step that runs a prompt chunk, its engine time and
    what the loop adds to it, at the prefill speed; decode-only steps and the client's way in
    and out at the other."""
    import dataclasses

    from emoe.sim.speed import SpeedTimeline

    _, profiled = build(served)
    _, kinds = build(dataclasses.replace(served, engine_speed=SpeedTimeline((0.0,), (1.5,),
                                                                            (2.0,))))
    prefill = dict(prefill_tokens=8, decode_tokens=2, context_tokens=20, resident_experts=8)
    decode = dict(prefill_tokens=0, decode_tokens=2, context_tokens=20, resident_experts=8,
                  iterations=3)
    assert kinds.cost.step_s(**prefill) == pytest.approx(2.0 * profiled.cost.step_s(**prefill))
    assert kinds.cost.step_s(**decode) == pytest.approx(1.5 * profiled.cost.step_s(**decode))
    assert kinds.cost.serving_s(decode_tokens=2, first_tokens=1, prefill_tokens=8) == \
        pytest.approx(2.0 * profiled.cost.serving_s(decode_tokens=2, first_tokens=1))
    assert kinds.cost.serving_s(decode_tokens=2) == pytest.approx(
        1.5 * profiled.cost.serving_s(decode_tokens=2))
    assert kinds.cost.serving_at(0.0).ingress(3) == pytest.approx(
        1.5 * profiled.cost.serving.ingress(3))


def test_a_speed_timeline_by_step_kind_from_sampled_counters():
    """With the prefill steps' cycles sampled apart, each kind's windows at their own ratios
    (decode-only: all cycles less the prefill ones), each shrunk towards its kind's overall."""
    from emoe.sim.speed import SpeedTimeline

    times = [0.0, 1.0, 2.0]
    cycles, model = [0.0, 0.8, 1.7], [0.0, 0.6, 1.2]
    prefill_cycles, prefill_model = [0.0, 0.5, 0.5], [0.0, 0.4, 0.4]  # none in window 2
    timeline = SpeedTimeline.from_samples(times, cycles, model, prefill_cycles, prefill_model,
                                          prior_s=0.001)
    assert timeline.speeds == pytest.approx((0.3 / 0.2, 0.9 / 0.6), rel=1e-2)
    # the window without prefill steps keeps the prefill steps' overall speed
    assert timeline.prefill_speeds == pytest.approx((0.5 / 0.4, 0.5 / 0.4), rel=1e-2)
    assert "steps with a prompt chunk" in timeline.describe()


def test_prompt_steps_take_their_prompt_sizes_factor(served):
    """A timeline's ``prefill_shape``: a prompt step, its engine time and what the loop adds
    to it, x the factor of its prompt tokens' segment of the table; decode-only steps keep
    their speed."""
    from emoe.sim.speed import PrefillShape, SpeedTimeline

    _, kinds = build(dataclasses.replace(served, engine_speed=SpeedTimeline((0.0,), (1.5,),
                                                                            (2.0,))))
    shape = PrefillShape((1, 64), (1.0, 0.8, 1.3))
    _, shaped = build(dataclasses.replace(served, engine_speed=SpeedTimeline(
        (0.0,), (1.5,), (2.0,), prefill_shape=shape)))
    for tokens, factor in ((8, 0.8), (64, 0.8), (65, 1.3)):
        prefill = dict(prefill_tokens=tokens, decode_tokens=2, context_tokens=20,
                       resident_experts=8)
        assert shaped.cost.step_s(**prefill) == pytest.approx(factor * kinds.cost.step_s(**prefill))
        assert shaped.cost.serving_s(decode_tokens=2, first_tokens=1, prefill_tokens=tokens) == \
            pytest.approx(factor * kinds.cost.serving_s(decode_tokens=2, first_tokens=1,
                                                        prefill_tokens=tokens))
    decode = dict(prefill_tokens=0, decode_tokens=2, context_tokens=20, resident_experts=8,
                  iterations=3)
    assert shaped.cost.step_s(**decode) == pytest.approx(kinds.cost.step_s(**decode))
    assert shaped.cost.serving_s(decode_tokens=2) == pytest.approx(
        kinds.cost.serving_s(decode_tokens=2))


def test_a_prefill_shape_from_sampled_segment_sums():
    """Each segment's prompt steps against the run's prompt steps overall (shrunk towards 1
    by the prior); the windows' prefill speeds are then taken against the model so shaped."""
    from emoe.sim.speed import PrefillShape, SpeedTimeline

    times = [0.0, 1.0, 2.0]
    cycles, model = [0.0, 1.0, 2.0], [0.0, 0.8, 1.6]
    prefill_cycles, prefill_model = [0.0, 0.6, 1.2], [0.0, 0.4, 0.8]
    # by segment (up to 1, 2-64, more): window 1 mostly short prompts, window 2 mostly long
    segment_cycles = [[0.0, 0.0, 0.0], [0.0, 0.2, 0.4], [0.0, 0.4, 0.8]]
    segment_model = [[0.0, 0.0, 0.0], [0.0, 0.3, 0.1], [0.0, 0.4, 0.4]]
    plain = SpeedTimeline.from_samples(times, cycles, model, prefill_cycles, prefill_model,
                                       prior_s=1e-6)
    assert plain.prefill_shape is None
    assert plain.prefill_speeds == pytest.approx((1.5, 1.5), rel=1e-4)
    timeline = SpeedTimeline.from_samples(times, cycles, model, prefill_cycles, prefill_model,
                                          prefill_segments=((1, 64), segment_cycles,
                                                            segment_model), prior_s=1e-6)
    assert timeline.prefill_shape.tokens == (1, 64)
    assert timeline.prefill_shape.factors == pytest.approx((1.0, 2 / 3, 4 / 3), rel=1e-4)
    assert timeline.prefill_speeds == pytest.approx((0.6 / (1 / 3), 0.6 / (1.4 / 3)), rel=1e-4)
    assert timeline.speeds == pytest.approx(plain.speeds, rel=1e-4)
    assert "2-64 x0.67, >64 x1.33" in timeline.describe()
    # a segment of 10 ms of model that ran 2x moves its factor by 9%, not 2x
    few = PrefillShape.from_sums((1, 64), [0.0, 0.02, 0.5], [0.0, 0.01, 0.5], prior_s=0.1)
    overall = 0.52 / 0.51
    assert few.factors[1] == pytest.approx((0.02 + 0.1 * overall) / 0.11 / overall)
    assert few.factors[1] < 1.1
    assert PrefillShape.from_sums((1, 64), [0.0] * 3, [0.0] * 3) is None
    with pytest.raises(ConfigError, match="3 factors for 3 table points"):
        PrefillShape((1, 64, 128), (1.0, 1.0, 1.0))


def test_steps_drawn_around_their_model(served):
    """``step_scatter``: each step's time a lognormal draw of mean 1 around its model, seeded
    by the run's seed and ``scatter_draw`` (the same seed and draw, the same run); on average
    the model's time; a sigma out of [0, 1) is refused."""
    slo = SLO(10.0, 10.0)

    def busy(config, max_iterations=1):
        """The engine's time over eight lone requests of 50 steps each."""
        requests = [Request(str(i), float(i), "qa", 8, 50, slo) for i in range(8)]
        ended = _ended(config, requests, max_iterations)
        return sum(finished - int(rid) for rid, (_, finished) in ended.items())

    steady = busy(served)
    drawn = dataclasses.replace(served, step_scatter=0.2)
    assert busy(drawn) == busy(drawn) != steady
    assert busy(dataclasses.replace(drawn, seed=1)) != busy(drawn)
    # another draw of the same seed: other steps, draw 0 the seed's own
    redrawn = busy(dataclasses.replace(drawn, scatter_draw=1))
    assert redrawn == busy(dataclasses.replace(drawn, scatter_draw=1)) != busy(drawn)
    assert busy(dataclasses.replace(drawn, scatter_draw=0)) == busy(drawn)
    # 400 independent draws of sigma 0.2: their mean within 3% of 1 (three sigma)
    assert busy(drawn) == pytest.approx(steady, rel=0.03)
    assert busy(drawn, None) == pytest.approx(steady, rel=0.03)  # macro steps
    for sigma in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="step scatter: a sigma in"):
            build(dataclasses.replace(served, step_scatter=sigma))


def _sums(windows: list[list[float]]) -> list[list[float]]:
    """Cumulative sums as a server samples them, one sample per window end: log sum, sum of
    squares, cycles, consecutive pairs, sum of their products (every window one run), the
    cycles' time and their model's (1 ms each)."""
    import math

    columns = [[0.0] for _ in range(7)]
    for xs in windows:
        row = (sum(xs), sum(x * x for x in xs), len(xs), len(xs) - 1,
               sum(a * b for a, b in zip(xs, xs[1:])), sum(1e-3 * math.exp(x) for x in xs),
               1e-3 * len(xs))
        for column, value in zip(columns, row):
            column.append(column[-1] + value)
    return columns


def test_the_step_scatter_is_measured_within_windows():
    """``StepScatter.from_samples``: each window's log ratios about the window's own mean
    (the timeline's drift from window to window is not counted), pooled; prefill cycles'
    spread apart; the lag-1 correlation of consecutive cycles; where the typical cycle sits
    against its window's speed."""
    import numpy as np

    from emoe.sim.speed import StepScatter

    rng = np.random.default_rng(0)
    rho, sigma = 0.6, 0.2
    windows = []
    for level in (-0.3, 0.0, 0.4, 0.1):  # window means far apart
        x = [rng.normal(0, sigma)]
        for _ in range(2999):
            x.append(rho * x[-1] + np.sqrt(1 - rho * rho) * rng.normal(0, sigma))
        windows.append([level + v for v in x])
    scatter = StepScatter.from_samples(*_sums(windows))
    assert scatter.sigma == pytest.approx(sigma, rel=0.05)
    assert scatter.lag1 == pytest.approx(rho, abs=0.05)
    assert scatter.prefill_sigma is None
    # lognormal cycles: the typical one (the median) at exp(-sigma^2 / 2) x the window's mean
    assert scatter.centre == pytest.approx(-sigma * sigma / 2, abs=0.005)
    # a window whose cycles take their model but for one in fifty, which takes 10x: the
    # typical cycle well below the window's speed
    stalls = [[np.log(10.0) if i % 50 == 0 else 0.0 for i in range(1000)]] * 2
    assert StepScatter.from_samples(*_sums(stalls)).centre == pytest.approx(
        np.log(10.0) / 50 - np.log(1 + 9 / 50), abs=1e-6)
    prefill = [[0.5 + v for v in rng.normal(0, 0.1, 2000)] for _ in range(2)]
    decode = windows[:2]  # the server's sums are of all cycles, and of the prefill ones apart
    total = [[a + b for a, b in zip(d, p)] for d, p in zip(_sums(decode), _sums(prefill))]
    apart = StepScatter.from_samples(*total, prefill=_sums(prefill))
    assert apart.sigma == pytest.approx(sigma, rel=0.05)
    assert apart.prefill_sigma == pytest.approx(0.1, rel=0.1)
    # pooled over both kinds by their pairs x variance: 0.6 x 240 / (240 + 40)
    assert apart.lag1 == pytest.approx(0.6 * 240 / 280, abs=0.05)
    assert apart.prefill_centre == pytest.approx(-0.1 * 0.1 / 2, abs=0.005)
    assert "(steps with a prompt chunk: log sigma 0.09" in apart.describe()
    with pytest.raises(ConfigError, match="lag-1 correlation"):
        StepScatter(0.1, lag1=1.0)


def test_steps_drawn_as_an_ar1_series_keep_their_mean_and_correlation(served):
    """A ``StepScatter`` with lag-1 correlation: consecutive steps' draws alike, mean 1."""
    import numpy as np

    from emoe.sim.speed import StepScatter

    _, backend = build(dataclasses.replace(served, step_scatter=StepScatter(0.2, 0.4, 0.7)))
    draws = np.log([backend._scatter(1, False) for _ in range(20000)])
    assert np.corrcoef(draws[:-1], draws[1:])[0, 1] == pytest.approx(0.7, abs=0.03)
    assert draws.std() == pytest.approx(0.2, rel=0.05)
    assert np.exp(draws).mean() == pytest.approx(1.0, abs=0.02)
    prefill = np.log([backend._scatter(1, True) for _ in range(20000)])
    assert prefill.std() == pytest.approx(0.4, rel=0.05)
    macro = [backend._scatter(50, False) for _ in range(400)]  # the mean of 50 iterations'
    assert np.mean(macro) == pytest.approx(1.0, abs=0.03)
    assert np.std(np.log(macro)) < 0.2 / 2
    # a measured centre: the typical step (the median) there, the mean above
    _, backend = build(dataclasses.replace(served, step_scatter=StepScatter(0.2, centre=0.05)))
    draws = np.array([backend._scatter(1, False) for _ in range(20000)])
    assert np.median(draws) == pytest.approx(np.exp(0.05), abs=0.01)
    assert draws.mean() == pytest.approx(np.exp(0.05 + 0.02), abs=0.02)



def test_a_macro_step_ends_in_the_iteration_its_draws_reach_the_next_arrival(served):
    """A decode-only macro step drawn iteration by iteration ends in the iteration in which
    its drawn time reaches the next arrival, as single steps would (judged at the modelled
    pace, a macro step drawn slow ran past the arrival by its draw); its draw is that time
    over its model."""
    from emoe.sim.speed import StepScatter

    config = dataclasses.replace(served, step_scatter=StepScatter(0.4, lag1=0.9))
    a, b, budget = 0.004, 0.0001, 0.05  # iteration i modelled at a + b i
    lengths = set()
    for seed in range(20):
        _, backend = build(dataclasses.replace(config, seed=seed))
        _, twin = build(dataclasses.replace(config, seed=seed))  # the same draws, one by one
        n, draw = backend._scattered_within(1000, budget, a, b)
        drawn = [twin._scatter(1, False) * (a + b * i) for i in range(n)]
        assert sum(drawn) >= budget > sum(drawn[:-1])
        assert draw == pytest.approx(sum(drawn) / sum(a + b * i for i in range(n)))
        lengths.add(n)
    assert len(lengths) > 3  # slow and fast draws end in different iterations
    assert backend._scattered_within(3, 10.0, a, b)[0] == 3  # no more than the plan's

def _decode_lines(windows, token_s):
    """Cumulative samples of windows of decode-only cycles, each window (speed, [(model at
    n=0, n), ...]), whose every cycle took speed x (its model + token_s x n)."""
    sums = [[0.0] for _ in range(7)]  # t, cycle, model, n, n^2, n x cycle, n x model
    for i, (speed, cycles) in enumerate(windows):
        add = [1.0, 0, 0, 0, 0, 0, 0]
        for base, n in cycles:
            model = base + 1e-4 * n  # the profile's own cost per decode
            cycle = speed * (model + token_s * n)
            for k, v in enumerate((cycle, model, n, n * n, n * cycle, n * model), start=1):
                add[k] += v
        for column, v in zip(sums, add):
            column.append(column[-1] + v)
    return sums


def test_a_timeline_fits_what_a_decode_token_costs_beyond_the_profile():
    """``decode_lines``: cycles that grow faster with their tokens than their model does give
    the run's ``decode_token_s``, recovered across windows of other speeds and batches, and
    each decode-only window's speed is then its cycles over its model with it; the fit never
    goes below the profile's own token cost, and without the lines there is none."""
    from emoe.sim.speed import SpeedTimeline

    windows = [(1.2, [(5e-3, 1), (5.5e-3, 4), (5e-3, 9)]),
               (1.6, [(6e-3, 2), (6e-3, 3), (5e-3, 8), (5.2e-3, 1)]),
               (0.9, [(5e-3, 5), (5e-3, 6)])]
    t, cycles, model, *lines = _decode_lines(windows, token_s=3e-4)
    none = [0.0] * len(t)
    timeline = SpeedTimeline.from_samples(t, cycles, model, none, none, decode_lines=lines,
                                          prior_s=1e-9)
    assert timeline.decode_token_s == pytest.approx(3e-4, rel=1e-3)
    assert timeline.speeds == pytest.approx((1.2, 1.6, 0.9), rel=1e-3)
    assert "us beyond the profile's" in timeline.describe()
    t, cycles, model, *lines = _decode_lines(windows, token_s=-5e-4)  # below the profile's
    floored = SpeedTimeline.from_samples(t, cycles, model, none, none, decode_lines=lines,
                                         token_floor_s=1e-4)
    assert floored.decode_token_s == pytest.approx(-1e-4)
    plain = SpeedTimeline.from_samples(t, cycles, model, none, none)
    assert plain.decode_token_s == 0.0
    with pytest.raises(ConfigError, match="decode lines"):
        SpeedTimeline.from_samples(t, cycles, model, none, none, decode_lines=lines[:3])


def test_a_decode_token_cost_beyond_the_profile_is_served_by_decode_only_steps(served):
    """A timeline's ``decode_token_s``: a decode-only step's serving path takes it per token
    streamed, at the window's speed; a step that runs a prompt chunk does not."""
    from emoe.sim.speed import SpeedTimeline

    _, plain = build(dataclasses.replace(served, engine_speed=SpeedTimeline((0.0,), (1.5,),
                                                                            (2.0,))))
    _, costly = build(dataclasses.replace(served, engine_speed=SpeedTimeline(
        (0.0,), (1.5,), (2.0,), decode_token_s=4e-5)))
    assert costly.cost.serving_s(decode_tokens=3, iterations=2) == pytest.approx(
        plain.cost.serving_s(decode_tokens=3, iterations=2) + 1.5 * 2 * 3 * 4e-5)
    assert costly.cost.serving_s(decode_tokens=3, first_tokens=1, prefill_tokens=8) == \
        pytest.approx(plain.cost.serving_s(decode_tokens=3, first_tokens=1, prefill_tokens=8))
    decode = dict(prefill_tokens=0, decode_tokens=3, context_tokens=20, resident_experts=8)
    assert costly.cost.step_s(**decode) == pytest.approx(plain.cost.step_s(**decode))


def test_a_timeline_fits_the_loops_work_per_request_accepted():
    """``arrivals``: the cycles in which the loop accepted requests, beyond their model at the
    speed of their window's other cycles, give ``arrival_s`` (at the profile's speed), and the
    windows' speeds leave it out; never below 0."""
    from emoe.sim.speed import SpeedTimeline

    arrival = 1.5e-3
    # per window: speed, (cycles without arrivals: model), (cycles with arrivals: model, count)
    windows = [(1.2, [4e-3, 5e-3, 6e-3], [(5e-3, 1), (4e-3, 2)]),
               (0.8, [5e-3, 5e-3], [(6e-3, 1)]),
               (1.5, [4e-3], [(4e-3, 3), (5e-3, 1)])]
    t, cycles, model, accepted, arrival_cycles, arrival_model = ([0.0] for _ in range(6))
    for i, (speed, plain, busy) in enumerate(windows):
        c = speed * (sum(plain) + sum(m + arrival * n for m, n in busy))
        ac = speed * sum(m + arrival * n for m, n in busy)
        for column, add in ((t, 1.0), (cycles, c), (model, sum(plain) + sum(m for m, _ in busy)),
                            (accepted, sum(n for _, n in busy)), (arrival_cycles, ac),
                            (arrival_model, sum(m for m, _ in busy))):
            column.append(column[-1] + add)
    none = [0.0] * len(t)
    timeline = SpeedTimeline.from_samples(t, cycles, model, none, none, prior_s=1e-9,
                                          arrivals=(accepted, arrival_cycles, arrival_model,
                                                    none))
    assert timeline.arrival_s == pytest.approx(arrival)
    assert timeline.speeds == pytest.approx((1.2, 0.8, 1.5))
    assert "per request accepted 1500 us" in timeline.describe()
    cheaper = [c - 0.01 * i for i, c in enumerate(arrival_cycles)]  # faster than the others
    floored = SpeedTimeline.from_samples(t, [c - 0.01 * i for i, c in enumerate(cycles)],
                                         model, none, none,
                                         arrivals=(accepted, cheaper, arrival_model, none))
    assert floored.arrival_s == 0.0
    with pytest.raises(ConfigError, match="arrivals need four sums"):
        SpeedTimeline.from_samples(t, cycles, model, none, none, arrivals=(accepted,))
    with pytest.raises(ConfigError, match="arrival_s"):
        SpeedTimeline((0.0,), (1.0,), arrival_s=-1e-3)


def test_a_timeline_fits_what_a_fetch_cost_the_loop_and_counts_its_cycles():
    """``fetches``: the decode-only cycles that fetched, beyond their model at the speed of
    their window's decode-only cycles without a fetch, give ``fetch_s`` (not scaled by the
    window), and with it every cycle that fetched counts towards its kind's speed: the prompt
    steps' own speed, which no cycle without a fetch measured, is found."""
    from emoe.sim.speed import SpeedTimeline

    fetch = 6e-4
    # per window: decode speed, prompt speed, plain decode model, decode fetch cycles
    # (model, fetched), prompt fetch cycles (model, fetched)
    windows = [(1.0, 1.1, 8e-3, [(5e-3, 4), (6e-3, 2)], [(30e-3, 12)]),
               (0.8, 0.95, 4e-3, [(5e-3, 3)], [(20e-3, 12), (25e-3, 12)]),
               (1.3, 1.4, 6e-3, [(4e-3, 5), (5e-3, 4)], [(28e-3, 11)])]
    columns = {k: [0.0] for k in ("t", "c", "m", "fc", "fm", "fn", "pfc", "pfm", "pfn")}

    def add(name, value):
        columns[name].append(columns[name][-1] + value)

    for decode, prompt, plain, fetching, prompts in windows:
        add("t", 1.0)
        add("c", decode * plain)
        add("m", plain)
        pc = sum(prompt * m + fetch * n for m, n in prompts)
        add("fc", sum(decode * m + fetch * n for m, n in fetching) + pc)
        add("fm", sum(m for m, _ in fetching) + sum(m for m, _ in prompts))
        add("fn", sum(n for _, n in fetching) + sum(n for _, n in prompts))
        add("pfc", pc)
        add("pfm", sum(m for m, _ in prompts))
        add("pfn", sum(n for _, n in prompts))
    c = columns
    none = [0.0] * len(c["t"])
    fetches = (c["fc"], c["fm"], c["fn"], none, c["pfc"], c["pfm"], c["pfn"], none)
    timeline = SpeedTimeline.from_samples(c["t"], c["c"], c["m"], none, none, prior_s=1e-9,
                                          fetches=fetches)
    assert timeline.fetch_s == pytest.approx(fetch) and timeline.fetch_fitted
    assert timeline.speeds == pytest.approx((1.0, 0.8, 1.3))
    assert timeline.prefill_speeds == pytest.approx((1.1, 0.95, 1.4))
    assert "an expert fetched on a miss 600 us (fitted" in timeline.describe()
    without = SpeedTimeline.from_samples(c["t"], c["c"], c["m"], none, none, prior_s=1e-9)
    assert without.fetch_s is None  # prompt steps at the run's one speed of the others
    assert len(set(without.prefill_speeds)) == 1
    # every decode-only step fetched: the cost given counts the cycles, marked as given
    given = SpeedTimeline.from_samples(c["t"], none, none, none, none, prior_s=1e-9,
                                       fetches=fetches, fetch_fallback_s=fetch)
    assert (given.fetch_s, given.fetch_fitted) == (fetch, False)
    assert given.prefill_speeds == pytest.approx((1.1, 0.95, 1.4))
    with pytest.raises(ConfigError, match="no modelled cycle"):
        SpeedTimeline.from_samples(c["t"], none, none, none, none, fetches=fetches)
    # only prompt steps fetched: no fit; a cost given that exceeds their cycles is refused
    prompts_only = (c["pfc"], c["pfm"], c["pfn"], none, c["pfc"], c["pfm"], c["pfn"], none)
    refused = SpeedTimeline.from_samples(c["t"], c["c"], c["m"], none, none, prior_s=1e-9,
                                         fetches=prompts_only, fetch_fallback_s=0.01)
    assert refused.fetch_s is None and refused.speeds == pytest.approx((1.0, 0.8, 1.3))
    # a window whose fetches at the run's cost took more than its cycles: a positive speed
    from emoe.sim.speed import _shrunk
    assert 0 < _shrunk([0.0, -0.01], [0.0, 0.005], 1, 1.2, 0.1) < 1.2
    with pytest.raises(ConfigError, match="fetch cycles need eight sums"):
        SpeedTimeline.from_samples(c["t"], c["c"], c["m"], none, none, fetches=fetches[:4])
    with pytest.raises(ConfigError, match="fetch_s"):
        SpeedTimeline((0.0,), (1.0,), fetch_s=-1e-4)


def test_requests_accepted_while_the_loop_is_busy_cost_it_their_work(served):
    """A timeline's ``arrival_s``: a request handed over after a step delays the next plan by
    it (x the window's speed), one that finds the loop idle does not; macro steps give what
    single steps give, and Eq. 3's learned scale differs between them by no more than without
    the work (the work falls in the last iteration; a macro step's iterations count at their
    mean ratio, their attention growing within it)."""
    from emoe.sim.speed import SpeedTimeline

    slo = SLO(1.0, 1.0)

    def requests():
        return [Request("a", 0.0, "qa", 8, 40, slo), Request("b", 0.05, "qa", 8, 10, slo)]

    def run(timeline, max_iterations=None):
        scheduler, backend = build(dataclasses.replace(served, engine_speed=timeline))
        ended: list[Request] = []
        World(scheduler, backend, requests(), lambda r: None,
              client=ClientView(backend.cost.serving_at, ended.append),
              max_iterations=max_iterations).run()
        return {r.id: (r.first_token_at, r.finished_at) for r in ended}, scheduler.cost.scale

    plain, plain_scale = run(SpeedTimeline((0.0,), (1.5,)))
    _, plain_single_scale = run(SpeedTimeline((0.0,), (1.5,)), 1)
    busy, scale = run(SpeedTimeline((0.0,), (1.5,), arrival_s=2e-3))
    single, single_scale = run(SpeedTimeline((0.0,), (1.5,), arrival_s=2e-3), 1)
    assert busy["a"][0] == pytest.approx(plain["a"][0])  # "a" found the loop idle
    assert busy["b"][0] - plain["b"][0] == pytest.approx(1.5 * 2e-3, rel=0.2)
    for rid in busy:
        assert busy[rid] == pytest.approx(single[rid])
    assert scale > plain_scale
    assert scale - single_scale == pytest.approx(plain_scale - plain_single_scale, abs=1e-9)

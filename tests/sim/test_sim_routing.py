import numpy as np
import pytest

from emoe.core.errors import ConfigError, TraceFormatError
from emoe.core.request import SLO, Request
from emoe.core.routing_trace import RoutingTraceWriter, read_routing_trace
from emoe.core.specs import ModelSpec
from emoe.sim.routing import SyntheticRouting, TraceRouting

TINY = ModelSpec(name="tiny", num_layers=4, num_experts=8, top_k=2, expert_bytes=1000,
                 non_expert_bytes=1000, kv_bytes_per_token=10)


def request(i: int, task: str = "qa", input_tokens: int = 50, output_tokens: int = 20) -> Request:
    return Request(id=f"r{i}", arrival=float(i), task=task, input_tokens=input_tokens,
                   output_tokens=output_tokens, slo=SLO(1.0, 0.1))


SENS = {"qa": np.array([0.0, 0.0, 1.0, 1.0]), "conversation": np.ones(4)}


def admitted(routing, reqs):
    for r in reqs:
        routing.admit(r)
    return np.array([routing.slot[r.id] for r in reqs])


def test_synthetic_distributions_are_normalised_and_seeded():
    a, b = (SyntheticRouting(TINY, SENS, seed=7) for _ in range(2))
    for i in range(5):
        a.admit(request(i))
        b.admit(request(i))
        p = a.distribution(f"r{i}")
        assert p.shape == (4, 8)
        np.testing.assert_allclose(p.sum(axis=1), 1.0)
        np.testing.assert_array_equal(p, b.distribution(f"r{i}"))


def test_synthetic_routing_recurs_within_a_task_and_differs_across_tasks():
    gen = SyntheticRouting(TINY, SENS, seed=1)
    for i in range(200):
        gen.admit(request(i, "qa" if i % 2 == 0 else "conversation"))

    def corr(x: str, y: str) -> float:
        return float(np.corrcoef(gen.distribution(x).ravel(), gen.distribution(y).ravel())[0, 1])

    consecutive = np.mean([corr(f"r{i}", f"r{i + 2}") for i in range(0, 100, 2)])
    far_apart = np.mean([corr(f"r{i}", f"r{i + 180}") for i in range(0, 20, 2)])
    across = np.mean([corr(f"r{i}", f"r{i + 1}") for i in range(0, 100, 2)])
    assert 0.7 < consecutive < 0.99  # the paper: 0.75-0.95 on Mixtral
    assert far_apart < consecutive - 0.1  # popularity drifts
    assert across < consecutive - 0.15  # tasks prefer different experts


def test_choices_are_counted_per_layer_and_weighted_by_task_sensitivity():
    gen = SyntheticRouting(TINY, SENS, seed=3)
    reqs = [request(0), request(1, "conversation")]
    slots = admitted(gen, reqs)
    half = np.zeros((4, 8), dtype=bool)
    half[:, :4] = True
    gen.count(slots, np.array([5, 7]), False, half, 1)
    gen.count(slots, 3, True, half, 1)
    for r in reqs:
        gen.finish([r])
    assert reqs[0].expert_hits + reqs[0].expert_misses == 8 * 2 * 4
    assert reqs[1].expert_hits + reqs[1].expert_misses == 10 * 2 * 4
    assert reqs[0].weighted_choices == 8 * 2 * 2  # qa is sensitive in 2 of 4 layers
    assert reqs[1].weighted_choices == 10 * 2 * 4


def test_synthetic_expected_hits_match_the_distribution():
    gen = SyntheticRouting(TINY, SENS, seed=3)
    r = request(0, "conversation")
    slots = admitted(gen, [r])
    p = gen.distribution(r.id).copy()
    half = np.zeros((4, 8), dtype=bool)
    half[:, ::2] = True
    gen.count(slots, 1000, True, half, 1)
    gen.finish([r])
    expected = 1000 * 2 * p[:, ::2].sum()
    assert r.expert_hits == round(expected)
    assert r.weighted_hits == pytest.approx(expected)  # sensitivity 1 everywhere
    assert r.weighted_choices == 1000 * 2 * 4


def test_served_all_counts_no_accuracy_loss_and_all_resident_means_no_miss():
    gen = SyntheticRouting(TINY, SENS, seed=3)
    a, b = request(0, "conversation"), request(1, "conversation")
    slots = admitted(gen, [a, b])
    gen.count(slots[:1], 10, True, np.zeros((4, 8), dtype=bool), 1, served_all=True)
    gen.count(slots[1:], 10, True, np.ones((4, 8), dtype=bool), 2)
    gen.finish([a])
    gen.finish([b])
    assert a.expert_hits == 0 and a.weighted_hits == a.weighted_choices == 80
    assert b.expert_misses == 0 and b.weighted_hits == b.weighted_choices == 80


def test_synthetic_prefill_counts_cover_every_choice_and_slots_are_reused():
    gen = SyntheticRouting(TINY, SENS, seed=0)
    for i in range(200):
        r = request(i, input_tokens=30)
        gen.admit(r)
        counts = gen.prefill_counts(r)
        assert counts.shape == (4, 8)
        np.testing.assert_allclose(counts.sum(axis=1), 60)
        gen.finish([r])
    assert gen._capacity == 64  # released slots are reused: memory does not grow


def test_synthetic_touched_experts_follow_the_expected_choices():
    gen = SyntheticRouting(TINY, SENS, seed=0)
    slots = admitted(gen, [request(i) for i in range(4)])
    assert gen.touched(slots, 10_000, True).all()
    few = np.mean([gen.touched(slots[:1], 1, True).sum() for _ in range(200)])
    assert 4 * 1.0 < few <= 4 * 2  # one token: 1-2 distinct experts per layer


def write_trace(path, model=TINY, requests=(("a", "qa"), ("b", "conversation")), seed=0):
    rng = np.random.default_rng(seed)
    recorded = {}
    with RoutingTraceWriter(path, num_layers=model.num_layers, num_experts=model.num_experts,
                            top_k=model.top_k, model=model.name) as w:
        for rid, task in requests:
            ids = np.argsort(rng.random((9, model.num_layers, model.num_experts)), axis=2)[..., :2]
            scores = rng.random(ids.shape)
            w.add(rid, task, "prefill", ids[:6], scores[:6])
            w.add(rid, task, "decode", ids[6:], scores[6:], start_token=6)
            recorded[rid] = ids
    return recorded


def test_routing_trace_round_trip(tmp_path):
    path = tmp_path / "routing.parquet"
    recorded = write_trace(path)
    trace = read_routing_trace(path)
    assert (trace.num_layers, trace.num_experts, trace.top_k, trace.model) == (4, 8, 2, "tiny")
    assert set(trace.requests) == {"a", "b"}
    a = trace.requests["a"]
    assert a.task == "qa"
    np.testing.assert_array_equal(a.prefill_ids, recorded["a"][:6])
    np.testing.assert_array_equal(a.decode_ids, recorded["a"][6:])
    assert a.counts("prefill", 8).sum() == 6 * 4 * 2


def test_routing_trace_reader_names_bad_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "routing.parquet"
    write_trace(path)
    table = pq.read_table(path)
    layer = table.column("layer").to_numpy().copy()
    layer[3] = 2  # row 3 repeats layer 2 of its token
    bad = table.set_column(4, table.schema.field("layer"), pa.array(layer))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(TraceFormatError, match=r"bad.parquet:3: column 'layer'"):
        read_routing_trace(tmp_path / "bad.parquet")
    pq.write_table(table.replace_schema_metadata({}), tmp_path / "nometa.parquet")
    with pytest.raises(TraceFormatError, match="metadata"):
        read_routing_trace(tmp_path / "nometa.parquet")
    with pytest.raises(ConfigError, match="not found"):
        read_routing_trace(tmp_path / "missing.parquet")


def test_trace_routing_counts_hits_exactly(tmp_path):
    path = tmp_path / "routing.parquet"
    recorded = write_trace(path)
    routing = TraceRouting(TINY, SENS, read_routing_trace(path), str(path))
    assert "exact" in routing.hits_method
    same_id = request(0, task="conversation")
    same_id.id = "b"
    other = request(1, task="qa")  # no recording with its id: takes the qa recording "a"
    slots = admitted(routing, [same_id, other])
    resident = np.zeros((4, 8), dtype=bool)
    resident[:, [0, 3, 5]] = True

    def per_layer(ids):
        return resident[np.arange(4)[None, :, None], ids].sum(axis=(0, 2))

    routing.count(slots, np.array([3, 6]), False, resident, 1)
    routing.count(slots[1:], 2, True, resident, 1)
    routing.count(slots[1:], 2, True, resident, 1)  # generated tokens 2, 3 wrap to 2, 0
    expected_b = per_layer(recorded["b"][:3])
    expected_a = per_layer(recorded["a"][:6]) + per_layer(recorded["a"][6:][[0, 1, 2, 0]])
    touched = routing.touched(slots[1:], 1, True)
    np.testing.assert_array_equal(touched.sum(axis=1), 2)  # token 1 of "a": its 2 experts
    assert routing.prefill_counts(other).sum() == 50 * 4 * 2
    routing.finish([same_id])
    routing.finish([other])
    assert same_id.expert_hits == expected_b.sum()
    assert same_id.expert_hits + same_id.expert_misses == 3 * 4 * 2
    assert other.expert_hits == expected_a.sum()
    assert other.weighted_hits == expected_a[2:].sum()  # qa: only layers 2 and 3 count


def test_trace_routing_rejects_a_trace_of_another_model(tmp_path):
    path = tmp_path / "routing.parquet"
    write_trace(path)
    other = ModelSpec(name="x", num_layers=3, num_experts=8, top_k=2, expert_bytes=1,
                      non_expert_bytes=1, kv_bytes_per_token=1)
    with pytest.raises(ConfigError, match="4 layers x 8 experts"):
        TraceRouting(other, SENS, read_routing_trace(path), str(path))

import numpy as np
import pytest

from emoe.core.errors import ConfigError, UnknownNameError
from emoe.core.estimates import TaskDemand
from emoe.core.experts import (PLANNERS, LruExpertCache, MissMode, PlannerSetup, make_planner)
from emoe.core.plan import StepResult
from emoe.core.predictor import LastPromptPredictor
from emoe.core.specs import ModelSpec

MODEL = ModelSpec("m", num_layers=2, num_experts=4, top_k=2, expert_bytes=100,
                  non_expert_bytes=0, kv_bytes_per_token=1)
ALL_KEYS = [(layer, e) for layer in range(2) for e in range(4)]


def planner(name, slots=2, interval=3, sensitivity=None, frequencies=None, fixed_slots=False):
    sensitivity = sensitivity or {"qa": np.ones(2), "classification": np.zeros(2),
                                  "summarization": np.array([0.0, 1.0])}
    return make_planner(name, MODEL, PlannerSetup(
        slots_per_layer=np.full(2, slots), predictor=LastPromptPredictor(2, 4),
        sensitivity=sensitivity, prediction_interval=interval, frequencies=frequencies,
        fixed_slots=fixed_slots))


def demand(**tasks):
    return lambda: {t: TaskDemand(n, inputs, out) for t, (n, inputs, out) in tasks.items()}


QA = demand(qa=(1, 10, 5))


def test_registry_names_and_miss_modes():
    assert sorted(PLANNERS) == ["all", "emoe", "lru", "predict-every", "random", "static"]
    assert planner("all").miss_mode is MissMode.NONE
    assert planner("lru").miss_mode is MissMode.FETCH
    for name in ("static", "random", "predict-every", "emoe"):
        assert planner(name).miss_mode is MissMode.REROUTE
    with pytest.raises(UnknownNameError, match="all, emoe, lru, predict-every, random, static"):
        planner("fiddler")


@pytest.mark.parametrize("slots", [0, 5])
def test_slots_outside_one_to_num_experts_are_config_errors(slots):
    with pytest.raises(ConfigError, match="slots_per_layer"):
        planner("emoe", slots=slots)


def test_all_loads_everything_once():
    p = planner("all")
    change = p.plan(["qa"], QA, spare_bytes=0)
    assert sorted(change.load) == ALL_KEYS and not change.evict and not change.run_predictor
    assert p.plan(["qa"], QA, 0).load == []
    assert p.resident.all()


def test_static_pins_most_frequent_from_profile():
    freq = np.array([[0.1, 0.4, 0.2, 0.3], [0.5, 0.1, 0.3, 0.1]])
    p = planner("static", frequencies=freq)
    change = p.plan(["qa"], QA, 0)
    assert sorted(change.load) == [(0, 1), (0, 3), (1, 0), (1, 2)]
    assert p.capacity_bytes == 4 * 100
    p.observe_routing("qa", np.ones((2, 4)))
    assert p.plan(["qa"], QA, 0).load == []


def test_static_without_profile_repins_once_from_observed_routing():
    p = planner("static")
    assert sorted(p.plan(["qa"], QA, 0).load) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert p.plan(["qa"], QA, 0).load == []  # nothing observed yet
    p.observe_routing("qa", np.array([[0, 0, 5, 4], [9, 0, 0, 3]]))
    change = p.plan(["qa"], QA, 0)
    assert change.run_predictor
    assert sorted(change.load) == [(0, 2), (0, 3), (1, 3)]
    assert sorted(change.evict) == [(0, 0), (0, 1), (1, 1)]
    p.observe_routing("qa", np.array([[9, 9, 0, 0], [0, 9, 9, 0]]))
    assert p.plan(["qa"], QA, 0).load == []


def test_emoe_first_prompt_loads_all_when_memory_spare():
    p = planner("emoe")
    change = p.plan(["qa"], QA, spare_bytes=400)  # 8 experts - 4 slots = 400 B extra
    assert sorted(change.load) == ALL_KEYS and not change.run_predictor


def test_emoe_first_prompt_without_spare_memory_loads_first_slots():
    p = planner("emoe")
    change = p.plan(["qa"], QA, spare_bytes=399)
    assert sorted(change.load) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_emoe_predicts_every_p_prompts_after_the_first():
    p = planner("emoe", interval=3)
    flags = [p.plan(["qa"], QA, 10**6).run_predictor for _ in range(9)]
    assert flags == [False, True, False, False, True, False, False, True, False]


def test_emoe_counts_prompts_admitted_together():
    p = planner("emoe", interval=3)
    assert not p.plan(["qa"], QA, 10**6).run_predictor          # prompt 0
    assert p.plan(["qa", "qa", "qa"], QA, 10**6).run_predictor  # prompts 1-3
    assert p.plan(["qa", "qa", "qa"], QA, 10**6).run_predictor  # prompts 4-6
    assert p.plan(["qa"], QA, 10**6).run_predictor              # prompt 7
    assert not p.plan(["qa"], QA, 10**6).run_predictor          # prompt 8


def test_predict_every_predicts_for_every_prompt():
    p = planner("predict-every", interval=40)
    flags = [p.plan(["qa"], QA, 10**6).run_predictor for _ in range(4)]
    assert flags == [False, True, True, True]


def test_emoe_keeps_top_l_by_eq2_over_tasks_in_play():
    sensitivity = {"qa": np.ones(2), "summarization": np.ones(2)}
    p = planner("emoe", sensitivity=sensitivity)
    p.plan(["qa"], QA, 10**6)  # loads all
    p.observe_routing("qa", np.array([[6, 2, 0, 0], [0, 0, 1, 3]]))
    p.observe_routing("summarization", np.array([[0, 0, 3, 1], [1, 0, 0, 3]]))
    # qa: 2 requests, 20 + 2*5 = 30 tokens -> layer 0 [22.5, 7.5, 0, 0], layer 1 [0, 0, 7.5, 22.5]
    # summarization: 1 request, 40 + 1*60 = 100 tokens -> [0, 0, 75, 25], [25, 0, 0, 75]
    # sums: layer 0 [22.5, 7.5, 75, 25] -> {2, 3}; layer 1 [25, 0, 7.5, 97.5] -> {3, 0}
    change = p.plan(["qa"], demand(qa=(2, 20, 5), summarization=(1, 40, 60)), 10**6)
    assert change.run_predictor and change.load == []
    assert sorted(change.evict) == [(0, 0), (0, 1), (1, 1), (1, 2)]
    np.testing.assert_array_equal(p.resident, [[0, 0, 1, 1], [1, 0, 0, 1]])


def test_emoe_leaves_layers_insensitive_for_every_task_alone():
    p = planner("emoe")
    p.plan(["summarization"], demand(summarization=(1, 10, 5)), spare_bytes=0)  # (0,0..1),(1,0..1)
    p.observe_routing("summarization", np.array([[0, 0, 5, 5], [0, 0, 5, 5]]))
    # summarization is insensitive in layer 0 only: layer 0 keeps its experts, layer 1 reloads
    change = p.plan(["summarization"], demand(summarization=(2, 20, 5)), 10**6)
    assert sorted(change.load) == [(1, 2), (1, 3)]
    assert sorted(change.evict) == [(1, 0), (1, 1)]
    # with classification only in play, nothing is loaded anywhere
    p.observe_routing("classification", np.array([[5, 5, 0, 0], [5, 5, 0, 0]]))
    for _ in range(2):
        assert not p.plan(["classification"], demand(classification=(1, 5, 5)), 0).run_predictor
    # and when its prediction falls due it is skipped: no task in play is sensitive anywhere
    change = p.plan(["classification"], demand(classification=(1, 5, 5)), 0)
    assert not change.run_predictor and change.load == [] and change.evict == []


def test_emoe_trims_insensitive_layers_to_their_slots_after_loading_all():
    p = planner("emoe")
    p.plan(["classification"], demand(classification=(1, 5, 5)), spare_bytes=10**6)
    change = p.plan(["classification"], demand(classification=(2, 10, 5)), 10**6)
    assert change.load == [] and not change.run_predictor
    assert sorted(change.evict) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert p.resident_bytes == p.capacity_bytes


def test_emoe_cold_start_fills_layers_insensitive_for_every_task_without_predicting():
    # prompts 0 and 1 in one step: the prediction falls due while nothing is resident yet,
    # and every task in play is insensitive everywhere, so the predictor is not called
    p = planner("emoe", interval=3)
    change = p.plan(["classification", "classification"],
                    demand(classification=(2, 10, 5)), spare_bytes=0)
    assert not change.run_predictor and not change.evict
    # no observation yet: uniform frequencies -> expert order fills the slots
    assert sorted(change.load) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    np.testing.assert_array_equal(p.resident.sum(axis=1), [2, 2])


def test_emoe_cold_start_fill_ranks_by_the_predictors_frequencies():
    p = planner("emoe", interval=3)
    p.observe_routing("classification", np.array([[0, 0, 5, 5], [0, 5, 5, 0]]))
    p.observe_routing("summarization", np.array([[0, 9, 0, 1], [0, 0, 1, 9]]))
    # layer 0 is insensitive for both tasks and empty: filled by frequency weighted by tokens
    # (classification 10 + 2*5 = 20 -> [0, 0, 10, 10]; summarization 10 + 5 = 15 ->
    # [0, 13.5, 0, 1.5]: sum [0, 13.5, 10, 11.5] -> {1, 3}); layer 1 follows Eq. 2
    # (summarization only, s = 1 there: [0, 0, 1.5, 13.5] -> {2, 3})
    change = p.plan(["classification", "summarization"],
                    demand(classification=(2, 10, 5), summarization=(1, 10, 5)), spare_bytes=0)
    assert change.run_predictor
    assert sorted(change.load) == [(0, 1), (0, 3), (1, 2), (1, 3)]


def test_emoe_never_empties_a_layer_on_any_admission_pattern():
    rng = np.random.default_rng(1)
    tasks = ["qa", "classification", "summarization"]
    for trial in range(30):
        fixed = bool(trial % 2)
        p = planner(["emoe", "predict-every"][trial % 3 == 0], interval=int(rng.integers(1, 4)),
                    fixed_slots=fixed)
        if trial % 5:
            p.observe_routing("classification", rng.integers(0, 9, (2, 4)))
        for _ in range(8):
            admitted = list(rng.choice(tasks, int(rng.integers(1, 4))))
            p.plan(admitted, demand(**{t: (admitted.count(t), 10, 5) for t in set(admitted)}),
                   spare_bytes=int(rng.choice([0, 10**6])))
            per_layer = p.resident.sum(axis=1)
            assert (per_layer >= 1).all(), (trial, per_layer)
            if fixed:
                assert (per_layer <= p.slots_per_layer).all(), (trial, per_layer)
            p.observe_routing(admitted[0], rng.integers(0, 9, (2, 4)))


def test_emoe_first_prompt_with_fixed_slots_fills_the_slots_whatever_memory_is_spare():
    p = planner("emoe", fixed_slots=True)
    change = p.plan(["qa"], QA, spare_bytes=10**9)
    assert sorted(change.load) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert p.resident_bytes == p.capacity_bytes
    # slots for every expert: the fixed pool holds them all
    p = planner("emoe", slots=4, fixed_slots=True)
    assert sorted(p.plan(["qa"], QA, spare_bytes=0).load) == ALL_KEYS


def test_emoe_admission_cost_reports_next_prediction():
    p = planner("emoe", interval=2)
    assert p.admission_cost() == (0.0, False)  # prompt 0
    p.plan(["qa"], QA, 0)
    assert p.admission_cost()[1] is True       # prompt 1 predicts
    p.observe_routing("qa", np.array([[0, 0, 5, 5], [0, 0, 5, 5]]))
    p.plan(["qa"], QA, 0)
    assert p.admission_cost() == (0.0, False)  # prompt 2
    p.plan(["qa"], QA, 0)
    assert p.admission_cost() == (4.0, True)   # prompt 3 predicts; last prediction loaded 4


def test_lru_never_loads_and_mirrors_backend_fetches():
    p = planner("lru")
    assert p.plan(["qa"], QA, 10**6).load == []
    p.observe_step(StepResult(0, 1, fetched_on_miss=[(0, 1), (0, 2), (1, 3)]))
    p.observe_step(StepResult(1, 2, fetched_on_miss=[(0, 0)], evicted_on_miss=[(0, 1)]))
    np.testing.assert_array_equal(p.resident, [[1, 0, 1, 0], [0, 0, 0, 1]])
    with pytest.raises(ValueError, match="overfill layer 0"):
        p.observe_step(StepResult(2, 3, fetched_on_miss=[(0, 3)]))


def test_lru_applies_a_full_record_of_fetches_and_evictions_within_a_step():
    p = planner("lru")  # 2 slots per layer
    p.observe_step(StepResult(0, 1, fetched_on_miss=[(0, 0), (0, 1)]))
    # one step, in order: fetch 2 (evict 0), fetch 3 (evict 2), fetch 0 (evict 1)
    record = StepResult(1, 2, fetched_on_miss=[(0, 2), (0, 3), (0, 0)],
                        evicted_on_miss=[(0, 0), (0, 2), (0, 1)])
    p.observe_step(record)
    np.testing.assert_array_equal(p.resident[0], [1, 0, 0, 1])


def test_lru_net_and_full_records_give_the_same_resident_set():
    full, net = planner("lru"), planner("lru")
    for p in (full, net):
        p.observe_step(StepResult(0, 1, fetched_on_miss=[(1, 0), (1, 1)]))
    cache = LruExpertCache([2, 2], resident=full.resident)
    cache.access(1, 0)
    fetched, evicted = [], []
    for expert in (2, 3, 1, 2):
        hit, victim = cache.access(1, expert)
        if victim is not None:
            evicted.append((1, victim))
        if not hit:
            fetched.append((1, expert))
    full.observe_step(StepResult(1, 2, fetched_on_miss=fetched, evicted_on_miss=evicted))
    net.observe_step(StepResult(1, 2, fetched_on_miss=[(1, 2)], evicted_on_miss=[(1, 0)]))
    np.testing.assert_array_equal(full.resident, net.resident)
    assert sorted(cache.resident(1)) == [1, 2]
    np.testing.assert_array_equal(full.resident[1], [0, 1, 1, 0])


def test_lru_rejects_an_impossible_record():
    p = planner("lru")
    with pytest.raises(ValueError, match=r"expert \(0, 1\) evicted while not resident"):
        p.observe_step(StepResult(0, 1, evicted_on_miss=[(0, 1)]))
    with pytest.raises(ValueError, match=r"expert \(0, 1\) fetched while resident"):
        p.observe_step(StepResult(0, 1, fetched_on_miss=[(0, 1), (0, 1)]))


def test_lru_cache_evicts_least_recently_used_of_the_layer():
    cache = LruExpertCache([2, 1])
    assert cache.access(0, 1) == (False, None)
    assert cache.access(0, 2) == (False, None)
    assert cache.access(0, 1) == (True, None)
    assert cache.access(0, 3) == (False, 2)
    assert cache.resident(0) == [1, 3]
    assert cache.access(1, 0) == (False, None)
    assert cache.access(1, 1) == (False, 0)


def test_lru_cache_starts_from_resident_set():
    cache = LruExpertCache([2, 2], resident=np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool))
    assert cache.access(0, 1) == (True, None)
    assert cache.access(0, 2) == (False, 0)


def allocating(slots=2, interval=3, sensitivity=None, adaptive=False, fixed_slots=True):
    sensitivity = sensitivity or {"qa": np.array([1.0, 0.1]), "classification": np.zeros(2)}
    return make_planner("emoe", MODEL, PlannerSetup(
        slots_per_layer=np.full(2, slots), predictor=LastPromptPredictor(2, 4),
        sensitivity=sensitivity, prediction_interval=interval, fixed_slots=fixed_slots,
        allocate=True, adaptive_interval=adaptive))


def test_emoe_allocates_slots_over_layers_by_eq2_value():
    p = allocating()
    p.plan(["qa"], QA, 0)  # cold: 2 + 2 slots, experts 0, 1
    p.observe_routing("qa", np.array([[4, 3, 2, 1], [4, 3, 2, 1]]))
    change = p.plan(["qa"], QA, 0)
    # 4 slots and a floor of 2 (top-k) per layer: the split is 2 + 2, each layer's best two
    assert change.run_predictor and p.resident.sum() == 4
    np.testing.assert_array_equal(p.resident, [[1, 1, 0, 0], [1, 1, 0, 0]])
    # 6 slots: past the floors, Eq. 2 (s = 1 in layer 0, 0.1 in layer 1) values layer 0's
    # experts 2 and 3 (2 and 1 x tokens) above layer 1's (0.2 and 0.1 x tokens)
    p = allocating(slots=3)
    p.plan(["qa"], QA, 0)
    p.observe_routing("qa", np.array([[4, 3, 2, 1], [4, 3, 2, 1]]))
    p.plan(["qa"], QA, 0)
    np.testing.assert_array_equal(p.resident, [[1, 1, 1, 1], [1, 1, 0, 0]])


def test_emoe_predicts_when_a_task_it_did_not_serve_arrives():
    p = planner("emoe", interval=10)
    p.plan(["qa"], QA, 0)
    assert p.plan(["qa"], QA, 0).run_predictor  # prompt 1
    assert not p.plan(["qa"], QA, 0).run_predictor
    # summarization is sensitive in layer 1: the set was chosen without it
    assert p.plan(["summarization"], demand(qa=(1, 10, 5), summarization=(1, 10, 5)),
                  0).run_predictor
    assert not p.plan(["summarization"], demand(summarization=(1, 10, 5)), 0).run_predictor
    # classification is insensitive everywhere: no reason to re-predict
    assert not p.plan(["classification"], demand(classification=(1, 10, 5)), 0).run_predictor


def test_adaptive_interval_predicts_early_when_hits_drop_and_stretches_while_they_hold():
    p = allocating(interval=4, adaptive=True)
    qa_here = np.array([[5, 5, 0, 0], [5, 5, 0, 0]])
    qa_elsewhere = np.array([[0, 0, 5, 5], [0, 0, 5, 5]])
    p.plan(["qa"], QA, 0)
    p.observe_routing("qa", qa_here)
    assert p.plan(["qa"], QA, 0).run_predictor  # prompt 1: the set is experts 0, 1
    predicted = []
    for n in range(2, 12):  # the hit rate holds (routing stays on experts 0, 1)
        p.observe_routing("qa", qa_here)
        predicted.append(p.plan(["qa"], QA, 0).run_predictor)
    # on schedule at 5 (1 + 4), then the interval doubles to 8: next at 13
    assert [n for n, ran in zip(range(2, 12), predicted) if ran] == [5]
    assert p.interval == 8
    for _ in range(3):  # the reference hit rate after the prediction at 5: 1.0
        p.observe_routing("qa", qa_here)
    p.observe_routing("qa", qa_elsewhere)  # routing moves away: the hit rate drops
    change = p.plan(["qa"], QA, 0)
    assert change.run_predictor and p.early_predictions == 1 and p.interval == 4


def test_emoe_warm_predictor_predicts_for_the_first_prompt():
    p = planner("emoe", fixed_slots=True)
    p.predictor.observe("qa", np.array([[0, 0, 5, 5], [0, 5, 5, 0]]))
    change = p.plan(["qa"], QA, spare_bytes=10**9)
    assert change.run_predictor
    assert sorted(change.load) == [(0, 2), (0, 3), (1, 1), (1, 2)]


def test_random_planner_pins_a_seeded_set_of_the_given_sizes():
    def pinned(seed):
        p = make_planner("random", MODEL, PlannerSetup(
            slots_per_layer=np.array([1, 3]), predictor=LastPromptPredictor(2, 4),
            sensitivity={}, seed=seed))
        p.plan(["qa"], QA, 0)
        assert not p.plan(["qa"], QA, 0).load
        return p.resident.copy()

    np.testing.assert_array_equal(pinned(0).sum(axis=1), [1, 3])
    np.testing.assert_array_equal(pinned(0), pinned(0))
    assert any(not np.array_equal(pinned(0), pinned(s)) for s in range(1, 5))

"""Miss handling against hand-computed cases, and exactness of the offloaded model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from emoe.core.budget import ExpertBudget
from emoe.core.errors import UnknownNameError
from emoe.engine.offload.cache import SlotCache
from emoe.engine.offload.executor import MissPolicy, OffloadedExperts
from emoe.engine.offload.store import ExpertStore

from .conftest import TINY, tiny_model

E, F_, H = 4, 3, 2


def expert(x, w1, w3, w2):
    """One SwiGLU expert, written out: w2 (silu(w1 x) * (w3 x))."""
    return w2 @ (F.silu(w1 @ x) * (w3 @ x))


@pytest.fixture
def one_layer():
    g = torch.Generator().manual_seed(3)
    w1, w3, w2 = torch.randn(E, F_, H, generator=g), torch.randn(E, F_, H, generator=g), \
        torch.randn(E, H, F_, generator=g)
    store = ExpertStore.from_stacked([(w1, w3, w2)], pin=False)
    x = torch.tensor([[0.7, -1.3]])
    # router probabilities 0.4, 0.3, 0.2, 0.1: top-2 = experts 0 and 1
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    f = [expert(x[0], w1[e], w3[e], w2[e]) for e in range(E)]
    return store, x, logits, f


def executor(store, miss, resident, slots=3, per_layer=None):
    cache = SlotCache(store, num_slots=slots)
    ex = OffloadedExperts(cache, top_k=2, normalize=True, miss=miss, slots_per_layer=per_layer)
    if miss is MissPolicy.FETCH:
        for e in resident:
            ex.lru.access(0, e)
        cache.load([(0, e) for e in resident])
    else:
        ex.apply(load=[(0, e) for e in resident], evict=[])
    return ex


def test_reroute_uses_next_ranked_resident_expert_and_renormalises(one_layer):
    store, x, logits, f = one_layer
    ex = executor(store, MissPolicy.REROUTE, resident=[1, 2, 3])   # expert 0 (ranked 1st) missing
    out = ex(x, logits, 0)
    # experts 1 and 2 (ranks 2 and 3), weights 0.3 and 0.2 renormalised to 0.6 and 0.4
    expected = 0.6 * f[1] + 0.4 * f[2]
    torch.testing.assert_close(out[0], expected, rtol=1e-6, atol=1e-6)
    assert ex._hits[0].sum(dim=1).tolist() == [1]


def test_reroute_keeps_router_mass_when_topk_is_not_renormalised(one_layer):
    store, x, logits, f = one_layer
    cache = SlotCache(store, num_slots=3)
    ex = OffloadedExperts(cache, top_k=2, normalize=False, miss=MissPolicy.REROUTE)
    ex.apply(load=[(0, 1), (0, 3)], evict=[])
    out = ex(x, logits, 0)
    # used: experts 1 and 3 (0.3, 0.1), scaled to the router's top-2 mass 0.7
    expected = 0.3 * 0.7 / 0.4 * f[1] + 0.1 * 0.7 / 0.4 * f[3]
    torch.testing.assert_close(out[0], expected, rtol=1e-6, atol=1e-6)


def test_reroute_with_one_resident_expert_uses_it_alone(one_layer):
    store, x, logits, f = one_layer
    ex = executor(store, MissPolicy.REROUTE, resident=[3])
    torch.testing.assert_close(ex(x, logits, 0)[0], f[3], rtol=1e-6, atol=1e-6)


def test_drop_skips_missing_expert_without_renormalising(one_layer):
    store, x, logits, f = one_layer
    ex = executor(store, MissPolicy.DROP, resident=[1, 2])
    expected = (0.3 / 0.7) * f[1]
    torch.testing.assert_close(ex(x, logits, 0)[0], expected, rtol=1e-6, atol=1e-6)


def test_drop_with_no_chosen_expert_resident_adds_nothing(one_layer):
    store, x, logits, f = one_layer
    ex = executor(store, MissPolicy.DROP, resident=[2, 3])
    assert torch.equal(ex(x, logits, 0), torch.zeros_like(x))
    assert ex._hits[0].sum(dim=1).tolist() == [0]


def test_fetch_loads_missing_expert_evicting_the_layers_lru(one_layer):
    store, x, logits, f = one_layer
    ex = executor(store, MissPolicy.FETCH, resident=[2, 1], slots=2, per_layer=[2])
    out = ex(x, logits, 0)
    torch.testing.assert_close(out[0], (4 / 7) * f[0] + (3 / 7) * f[1], rtol=1e-6, atol=1e-6)
    assert ex.fetched == [(0, 0)] and ex.evicted == [(0, 2)]
    assert ex.cache.resident() == {(0, 0), (0, 1)}
    assert torch.equal(ex.cache.pool[ex.cache.slot_of((0, 0))], store.row(0, 0))


def test_fetch_runs_in_waves_when_the_layer_has_fewer_slots_than_chosen_experts(one_layer):
    store, _, _, _ = one_layer
    ex = executor(store, MissPolicy.FETCH, resident=[], slots=1, per_layer=[1])
    x = torch.tensor([[0.7, -1.3], [0.1, 0.5]])
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    out = ex(x, logits, 0)
    w1, w3, w2 = store.layout.views(store.rows[0])
    f = lambda t, e: expert(x[t], w1[e], w3[e], w2[e])
    torch.testing.assert_close(out[0], (4 / 7) * f(0, 0) + (3 / 7) * f(0, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], (4 / 7) * f(1, 3) + (3 / 7) * f(1, 2), rtol=1e-5, atol=1e-6)
    assert len(ex.cache.resident()) == 1 and ex.fetches == 4
    # reported as net changes of the step: one expert more resident than before
    assert len(ex.fetched) == 1 and ex.evicted == []


def test_unknown_miss_policy_lists_valid_ones():
    with pytest.raises(UnknownNameError, match="drop, fetch, reroute"):
        MissPolicy.parse("guess")


def test_full_budget_matches_all_resident_logits_exactly():
    reference = tiny_model(seed=1)
    offloaded = copy.deepcopy(reference)
    ex = OffloadedExperts.install(offloaded, ExpertBudget.parse("100%"))
    ex.apply(load=[(l, e) for l in range(TINY.num_layers) for e in range(TINY.num_experts)],
             evict=[])
    ids = torch.randint(0, TINY.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = reference(ids), offloaded(ids)
    assert torch.equal(want, got)
    assert all(layer.moe.experts.w1.numel() == 0 for layer in offloaded.layers)


def test_partial_budget_changes_output_and_counts_misses():
    reference = tiny_model(seed=1)
    offloaded = copy.deepcopy(reference)
    ex = OffloadedExperts.install(offloaded, ExpertBudget.parse("50%"))
    ex.apply(load=[(l, e) for l in range(TINY.num_layers) for e in (0, 1)], evict=[])
    ids = torch.randint(0, TINY.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = reference(ids), offloaded(ids)
    assert not torch.equal(want, got)
    hits = torch.stack(ex._hits).sum(dim=2)  # [L, T] hits out of top-k
    assert hits.shape == (TINY.num_layers, 12) and 0 < int(hits.sum()) < 2 * hits.numel()


def test_memory_accounting_holds_the_budget_and_no_expert_weights_elsewhere():
    from emoe.engine.offload.memory import measure_memory

    reference = tiny_model(seed=1)
    offloaded = copy.deepcopy(reference)
    budget_bytes = 7 * 3 * TINY.hidden_size * TINY.intermediate_size * 4 + 100
    ex = OffloadedExperts.install(offloaded, ExpertBudget.parse(str(budget_bytes)))
    kv = [torch.zeros(1000)]
    report = measure_memory(offloaded, kv, ex.cache)
    expert = 3 * TINY.hidden_size * TINY.intermediate_size * 4
    assert ex.cache.num_slots == 7 and report.expert_bytes == 7 * expert <= budget_bytes
    assert report.kv_bytes == 4000
    assert report.host_expert_bytes == TINY.num_layers * TINY.num_experts * expert
    non_expert = sum(p.numel() * 4 for n, p in reference.named_parameters() if ".experts." not in n)
    buffers = sum(b.numel() * b.element_size() for b in reference.buffers())
    assert report.other_bytes == non_expert + buffers
    full = measure_memory(reference, kv)
    assert full.expert_bytes == TINY.num_layers * TINY.num_experts * expert


def test_budget_below_one_expert_per_layer_is_refused_at_install():
    from emoe.core.budget import ExpertBudgetError

    with pytest.raises(ExpertBudgetError, match="at least one per MoE layer"):
        OffloadedExperts.install(tiny_model(), ExpertBudget.parse("2KiB"))

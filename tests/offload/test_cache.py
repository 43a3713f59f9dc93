"""The slot cache: resident map, budget, in-use and in-flight safety, bit-exact loads."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from emoe.core.budget import ExpertBudget, ExpertBudgetError
from emoe.engine.offload.cache import SlotCache
from emoe.engine.offload.errors import CacheFullError, ExpertInUseError, UnknownExpertError
from emoe.engine.offload.loader import ThreadCopyStream
from emoe.engine.offload.store import ExpertStore

L, E, F, H = 3, 4, 6, 5


def make_store(seed: int = 0) -> tuple[ExpertStore, list]:
    g = torch.Generator().manual_seed(seed)
    layers = [(torch.randn(E, F, H, generator=g), torch.randn(E, F, H, generator=g),
               torch.randn(E, H, F, generator=g)) for _ in range(L)]
    return ExpertStore.from_stacked(layers, pin=False), layers


def test_store_packs_each_expert_contiguously():
    store, layers = make_store()
    assert store.rows.shape == (L, E, 3 * F * H)
    assert store.expert_bytes == 3 * F * H * 4
    w1, w3, w2 = store.layout.views(store.rows[1])
    assert torch.equal(w1, layers[1][0]) and torch.equal(w3, layers[1][1])
    assert torch.equal(w2, layers[1][2])
    assert store.row(2, 3).is_contiguous()


def test_loads_land_bit_exact_in_their_slots():
    store, layers = make_store()
    cache = SlotCache(store, num_slots=6)
    keys = [(0, 1), (2, 3), (1, 0), (0, 2)]
    cache.apply(evict=[], load=keys)
    for layer in range(L):
        cache.wait_layer(layer)
    for layer, expert in keys:
        slot = cache.slot_of((layer, expert))
        assert torch.equal(cache.w1[slot], layers[layer][0][expert])
        assert torch.equal(cache.w3[slot], layers[layer][1][expert])
        assert torch.equal(cache.w2[slot], layers[layer][2][expert])
    assert cache.bytes_loaded == 4 * store.expert_bytes
    cache.check_invariants()


def test_random_plans_keep_map_consistent_and_within_budget():
    store, layers = make_store()
    cache = SlotCache(store, num_slots=5)
    rng = random.Random(1)
    all_keys = [(l, e) for l in range(L) for e in range(E)]
    for _ in range(200):
        resident = sorted(cache.resident())
        evict = rng.sample(resident, rng.randint(0, len(resident)))
        room = cache.num_slots - len(resident) + len(evict)
        load = rng.sample([k for k in all_keys if k not in resident], rng.randint(0, room))
        cache.apply(evict, load)
        cache.check_invariants()
        assert len(cache.resident()) <= cache.num_slots
        assert cache.resident() == (set(resident) - set(evict)) | set(load)
    cache.synchronize()
    for key in cache.resident():
        slot = cache.slot_of(key)
        assert torch.equal(cache.pool[slot], store.row(*key))
    assert cache.pool.numel() * cache.pool.element_size() == 5 * store.expert_bytes


def test_plan_loading_more_than_free_slots_fails_and_names_counts():
    store, _ = make_store()
    cache = SlotCache(store, num_slots=3)
    cache.apply([], [(0, 0), (1, 0)])
    with pytest.raises(CacheFullError, match="2 free slots; 1 of 3"):
        cache.apply([], [(2, 0), (2, 1)])
    cache.check_invariants()


def test_plan_naming_a_missing_expert_is_rejected_before_any_change():
    store, _ = make_store()
    cache = SlotCache(store, num_slots=3)
    cache.apply([], [(0, 0)])
    with pytest.raises(UnknownExpertError, match=r"plan load list: expert \(layer 0, expert 9\)"):
        cache.apply(evict=[(0, 0)], load=[(0, 9)])
    with pytest.raises(UnknownExpertError, match=r"layer 7"):
        cache.apply(evict=[(7, 0)], load=[])
    assert cache.resident() == {(0, 0)}


def test_pinned_expert_is_never_evicted():
    store, _ = make_store()
    cache = SlotCache(store, num_slots=3)
    cache.apply([], [(0, 0), (0, 1), (1, 0)])
    cache.pin([cache.slot_of((0, 0))])
    with pytest.raises(ExpertInUseError, match=r"layer 0, expert 0"):
        cache.evict((0, 0))
    # An on-demand fetch must pick an unpinned victim, least recently used first.
    cache.pin([cache.slot_of((1, 0))])
    cache.unpin([cache.slot_of((1, 0))])
    cache.fetch((2, 3))
    assert (0, 0) in cache.resident() and (1, 0) in cache.resident()
    assert (0, 1) not in cache.resident()
    cache.check_invariants()
    cache.unpin([cache.slot_of((0, 0))])
    cache.evict((0, 0))
    cache.check_invariants()


def test_fetch_fails_when_every_slot_is_pinned():
    store, _ = make_store()
    cache = SlotCache(store, num_slots=2)
    cache.apply([], [(0, 0), (1, 0)])
    cache.pin([0, 1])
    with pytest.raises(CacheFullError, match="in use"):
        cache.fetch((2, 0))


def test_in_flight_expert_is_not_overwritten_until_it_lands():
    store, _ = make_store()
    stream = ThreadCopyStream()
    cache = SlotCache(store, num_slots=2, stream=stream)
    gate = threading.Event()
    stream.enqueue(gate.wait)           # hold the copy stream: the next loads stay in flight
    cache.apply([], [(0, 0), (1, 1)])
    assert cache.in_flight((0, 0)) and cache.in_flight((1, 1))
    cache.evict((0, 0))                 # leaves the map at once ...
    assert (0, 0) not in cache.resident() and cache.in_flight((1, 1))
    # ... but its slot is handed to the next load only after the copy into it has landed.
    loader = threading.Thread(target=cache.load, args=([(2, 0)],), daemon=True)
    loader.start()
    loader.join(timeout=0.5)
    assert loader.is_alive() and (2, 0) not in cache.resident()
    gate.set()
    loader.join(timeout=10.0)
    assert not loader.is_alive()
    cache.synchronize()
    assert not cache.in_flight((1, 1))
    assert torch.equal(cache.pool[cache.slot_of((2, 0))], store.row(2, 0))
    assert torch.equal(cache.pool[cache.slot_of((1, 1))], store.row(1, 1))
    cache.check_invariants()


def test_fetch_waits_for_an_in_flight_victim_instead_of_overwriting_it():
    store, _ = make_store()
    stream = ThreadCopyStream()
    cache = SlotCache(store, num_slots=2, stream=stream)
    cache.apply([], [(0, 0), (1, 1)])
    cache.pin([cache.slot_of((1, 1))])
    slot = cache.fetch((2, 2))          # the only victim may still be in flight: waited for
    cache.synchronize()
    assert cache.resident() == {(1, 1), (2, 2)}
    assert torch.equal(cache.pool[slot], store.row(2, 2))
    cache.check_invariants()


def test_wait_layer_waits_only_for_its_own_layer():
    store, _ = make_store()
    stream = ThreadCopyStream()
    cache = SlotCache(store, num_slots=4, stream=stream)
    cache.apply([], [(0, 0)])
    cache.wait_layer(0)
    gate = threading.Event()
    stream.enqueue(gate.wait)
    cache.apply([], [(1, 0)])
    done = threading.Event()
    threading.Thread(target=lambda: (cache.wait_layer(0), done.set()), daemon=True).start()
    assert done.wait(5.0), "layer 0 waited for layer 1's load"
    assert cache.in_flight((1, 0))
    gate.set()
    cache.wait_layer(1)
    assert not cache.in_flight((1, 0))


@pytest.mark.parametrize("text, slots", [("0.5", 6), ("50%", 6), ("100%", 12), ("1", 12),
                                         ("0.26", 3), ("300", 3), ("1KiB", 10), ("5000", 12)])
def test_budget_parses_fractions_and_bytes(text, slots):
    assert ExpertBudget.parse(text).num_slots(3, 4, expert_bytes=100) == slots


def test_budget_too_small_names_what_is_needed():
    with pytest.raises(ExpertBudgetError, match="at least one per MoE layer is needed: 3 experts"):
        ExpertBudget.parse("0.2").num_slots(3, 4, 100)
    with pytest.raises(ExpertBudgetError, match="plus non-expert weights"):
        ExpertBudget.parse("1000").num_slots(3, 4, 100, non_expert_bytes=500,
                                             device_memory_bytes=1200)
    with pytest.raises(ExpertBudgetError, match="is not an expert budget; expected experts per layer"):
        ExpertBudget.parse("lots")
    with pytest.raises(ExpertBudgetError, match=r"must be in \(0%, 100%\]"):
        ExpertBudget.parse("0")

"""The device-side expert cache: a fixed pool of expert slots and the resident map.

The pool is one [S, N] device tensor allocated once, S = the slots the expert budget buys, so
expert memory never exceeds the budget. ``(layer, expert) -> slot`` is the resident map; an
expert is resident from the moment its load is submitted, and usable by a layer once that
layer's load fence is done (``wait_layer``). The cache carries out loads and evictions it is
told to; it chooses a victim only for an on-demand fetch (``make_room``), least recently used.

Safety: a slot pinned by a computing layer is never evicted; an evicted slot whose load is still
in flight is not reused until the load lands; a load into a slot waits (on the copy stream) for
the compute that last read it.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from emoe.core.plan import ExpertKey
from emoe.engine.offload.errors import CacheFullError, ExpertInUseError, UnknownExpertError
from emoe.engine.offload.loader import DONE, CopyStream, Fence, copy_stream_for
from emoe.engine.offload.store import ExpertStore


@dataclass(slots=True)
class _Slot:
    key: ExpertKey | None = None
    loaded: Fence = DONE      # the copy that filled this slot
    last_read: Fence = DONE   # the compute that last read this slot
    pins: int = 0
    last_used: int = 0


class SlotCache:
    """A fixed pool of device expert slots filled from an ``ExpertStore``."""

    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device | str = "cpu",
                 stream: CopyStream | None = None):
        self.store = store
        self.device = torch.device(device)
        self.num_slots = num_slots
        self.pool = torch.empty((num_slots, store.layout.numel), dtype=store.layout.dtype,
                                device=self.device)  # [S, N]
        self.w1, self.w3, self.w2 = store.layout.views(self.pool)  # [S, F, H], [S, F, H], [S, H, F]
        self.stream = stream if stream is not None else copy_stream_for(self.device)
        self.table = torch.full((store.num_layers, store.num_experts), -1,
                                dtype=torch.long)  # [L, E] slot of each expert, -1 = not resident
        self._slots = [_Slot() for _ in range(num_slots)]
        self._slot_of: dict[ExpertKey, int] = {}
        self._layer_slots: list[dict[int, int]] = [{} for _ in range(store.num_layers)]
        self._free: collections.deque[int] = collections.deque(range(num_slots))
        self._draining: collections.deque[int] = collections.deque()
        self._layer_loaded: list[Fence] = [DONE] * store.num_layers
        self._clock = 0
        self.version = 0  # bumped whenever ``table`` changes
        self.bytes_loaded = 0
        self.loads = 0
        self.evictions = 0

    # ------------------------------------------------------------------ queries
    @property
    def budget_bytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def check_key(self, key: ExpertKey, where: str) -> None:
        layer, expert = key
        if not (0 <= layer < self.store.num_layers and 0 <= expert < self.store.num_experts):
            raise UnknownExpertError(layer, expert, self.store.num_layers, self.store.num_experts,
                                     where)

    def slot_of(self, key: ExpertKey) -> int | None:
        return self._slot_of.get(key)

    def resident(self) -> set[ExpertKey]:
        """Experts resident or in flight."""
        return set(self._slot_of)

    def resident_in(self, layer: int) -> list[int]:
        """The layer's resident (or in-flight) experts, ascending."""
        return sorted(self._layer_slots[layer])

    def slots_in(self, layer: int) -> list[int]:
        """The slots holding the layer's experts."""
        return list(self._layer_slots[layer].values())

    def in_flight(self, key: ExpertKey) -> bool:
        slot = self._slot_of.get(key)
        return slot is not None and not self._slots[slot].loaded.done()

    def pinned(self, key: ExpertKey) -> bool:
        slot = self._slot_of.get(key)
        return slot is not None and self._slots[slot].pins > 0

    @property
    def free_slots(self) -> int:
        return len(self._free) + len(self._draining)

    # ------------------------------------------------------------------ plan execution
    def apply(self, evict: Iterable[ExpertKey], load: Iterable[ExpertKey],
              make_room: bool = False) -> int:
        """Carry out a plan's evictions, then its loads; returns bytes submitted for loading."""
        evict, load = list(evict), list(load)
        for key in evict:
            self.check_key(key, "plan evict list")
        for key in load:
            self.check_key(key, "plan load list")
        for key in evict:
            self.evict(key)
        return self.load(load, make_room=make_room)

    def evict(self, key: ExpertKey) -> None:
        """Drop ``key`` from the resident map; a no-op if it is not resident."""
        self.check_key(key, "evict")
        slot = self._slot_of.get(key)
        if slot is None:
            return
        state = self._slots[slot]
        if state.pins:
            raise ExpertInUseError(f"evict: expert (layer {key[0]}, expert {key[1]}) in slot {slot} "
                                   f"is in use by a computing layer")
        del self._slot_of[key]
        del self._layer_slots[key[0]][key[1]]
        self.table[key] = -1
        self.version += 1
        state.key = None
        (self._free if state.loaded.done() else self._draining).append(slot)
        self.evictions += 1

    def load(self, keys: Iterable[ExpertKey], make_room: bool = False) -> int:
        """Submit loads of the non-resident ``keys``, layer by layer, one fence per layer."""
        todo = sorted({k for k in keys if k not in self._slot_of})
        for key in todo:
            self.check_key(key, "load")
        if len(todo) > self.free_slots and not make_room:
            raise CacheFullError(f"load of {len(todo)} experts needs {len(todo)} free slots; "
                                 f"{self.free_slots} of {self.num_slots} are free (evict first)")
        submitted = 0
        for i, key in enumerate(todo):
            slot = self._take_slot(make_room, protect={k for k in todo[:i]})
            state = self._slots[slot]
            self.stream.copy(self.pool[slot], self.store.row(*key), after=state.last_read)
            state.key = key
            self._slot_of[key] = slot
            self._layer_slots[key[0]][key[1]] = slot
            self.table[key] = slot
            self.version += 1
            submitted += self.store.expert_bytes
            last_of_layer = i + 1 == len(todo) or todo[i + 1][0] != key[0]
            if last_of_layer:
                fence = self.stream.record()
                self._layer_loaded[key[0]] = fence
                for k in todo[: i + 1]:
                    if k[0] == key[0]:
                        self._slots[self._slot_of[k]].loaded = fence
        self.bytes_loaded += submitted
        self.loads += len(todo)
        return submitted

    def _take_slot(self, make_room: bool, protect: set[ExpertKey]) -> int:
        if self._free:
            return self._free.popleft()
        if self._draining:
            slot = self._draining.popleft()
            self._slots[slot].loaded.synchronize()
            return slot
        if make_room:
            victims = [s for s, st in enumerate(self._slots)
                       if st.key is not None and st.pins == 0 and st.key not in protect]
            if victims:
                slot = min(victims, key=lambda s: self._slots[s].last_used)
                self.evict(self._slots[slot].key)
                return self._take_slot(False, protect)
        raise CacheFullError(f"no expert slot can be freed: all {self.num_slots} slots hold "
                             "experts in use")

    # ------------------------------------------------------------------ compute side
    def wait_layer(self, layer: int) -> None:
        """Order the layer's compute after its own experts' loads (not other layers')."""
        self._layer_loaded[layer].wait_on_compute()

    def fetch(self, key: ExpertKey) -> int:
        """Load one expert on demand, evicting the least recently used if needed, and wait."""
        slot = self._slot_of.get(key)
        if slot is None:
            self.load([key], make_room=True)
            slot = self._slot_of[key]
        self._slots[slot].loaded.wait_on_compute()
        return slot

    def pin(self, slots: Iterable[int]) -> None:
        self._clock += 1
        for slot in slots:
            state = self._slots[slot]
            state.pins += 1
            state.last_used = self._clock

    def unpin(self, slots: Iterable[int]) -> None:
        """Release slots after compute; their next load waits for this compute."""
        read = self.stream.compute_fence()
        for slot in slots:
            state = self._slots[slot]
            state.pins -= 1
            state.last_read = read

    def synchronize(self) -> None:
        """Block until every submitted load has landed."""
        self.stream.record().synchronize()

    def check_invariants(self) -> None:
        """The resident map, the table and the slot states agree; raises AssertionError if not."""
        assert len(self._slot_of) + len(self._free) + len(self._draining) == self.num_slots
        assert len(set(self._slot_of.values())) == len(self._slot_of)
        assert set(self._slot_of.values()).isdisjoint(self._free)
        assert set(self._slot_of.values()).isdisjoint(self._draining)
        for key, slot in self._slot_of.items():
            assert self._slots[slot].key == key and int(self.table[key]) == slot
            assert self._layer_slots[key[0]][key[1]] == slot
        assert sum(map(len, self._layer_slots)) == len(self._slot_of)
        assert int((self.table >= 0).sum()) == len(self._slot_of)
        assert self.budget_bytes == self.num_slots * self.store.expert_bytes

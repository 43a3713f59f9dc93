"""Model internals: expert compute against a naive loop, the executor seam, training forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from emoe.core.profile import decode_context
from emoe.engine import cpu_kernels
from emoe.engine.config import MoEConfig
from emoe.engine.kv_cache import SlotKVCache, StepBatch
from emoe.engine.model import MoEModel, ResidentExperts, expert_mlp, route

CFG = MoEConfig(vocab_size=40, hidden_size=16, intermediate_size=12, num_layers=3, num_heads=2,
                num_kv_heads=1, num_experts=5, top_k=2, max_position_embeddings=32)


def _model(cfg: MoEConfig = CFG) -> MoEModel:
    return MoEModel(cfg).init_weights(std=0.3, generator=torch.Generator().manual_seed(0)).eval()


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 80), experts=st.integers(1, 6), seed=st.integers(0, 2**16),
       kernels=st.booleans())
def test_expert_mlp_matches_naive_loop(tokens, experts, seed, kernels):
    g = torch.Generator().manual_seed(seed)
    top_k = min(2, experts)
    h, f = 8, 6
    x = torch.randn(tokens, h, generator=g)
    w1, w3 = torch.randn(experts, f, h, generator=g), torch.randn(experts, f, h, generator=g)
    w2 = torch.randn(experts, h, f, generator=g)
    weights, ids = route(torch.randn(tokens, experts, generator=g), top_k, normalize=bool(seed % 2))
    # the reference in float64; float32 rounding is relative to the size of the terms summed,
    # which cancel (hypothesis found a 1.2 output summed from terms near 100), so that is the scale
    expected = torch.zeros(tokens, h, dtype=torch.float64)
    scale = torch.zeros(tokens, h, dtype=torch.float64)
    for t in range(tokens):
        for k in range(top_k):
            e, xt = ids[t, k], x[t].double()
            act = F.silu(w1[e].double() @ xt) * (w3[e].double() @ xt)  # [F]
            expected[t] += weights[t, k].double() * (w2[e].double() @ act)
            scale[t] += weights[t, k].double() * (w2[e].double().abs() @ act.abs())
    saved, cpu_kernels.ENABLED = cpu_kernels.ENABLED, kernels  # the CPU kernels, or plain torch
    try:
        got = expert_mlp(x, weights, ids, w1, w3, w2)
    finally:
        cpu_kernels.ENABLED = saved
    assert ((got.double() - expected).abs() <= 1e-5 * (1 + scale)).all()


def test_route_renormalises_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w, ids = route(logits, 2, normalize=True)
    assert ids.tolist() == [[0, 1]] and torch.allclose(w.sum(-1), torch.ones(1))
    w, _ = route(logits, 2, normalize=False)
    assert torch.allclose(w, logits.softmax(-1)[:, :2])


class Recording:
    """An executor that drops expert 0 from every choice and records what it was handed."""

    def __init__(self, block):
        self.inner, self.calls = block.executor, []

    def __call__(self, hidden, router_logits, layer):
        self.calls.append((layer, hidden.shape, router_logits.clone()))
        masked = router_logits.clone()
        masked[:, 0] = -torch.inf
        return self.inner(hidden, masked, layer)


def test_executor_seam_sees_full_router_logits_and_layer():
    model = _model()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        base, router_logits = model(ids, return_router_logits=True)
        executors = {}
        model.set_executors(lambda i, block: executors.setdefault(i, Recording(block)))
        out = model(ids)
    assert [e.calls[0][0] for e in executors.values()] == [0, 1, 2]
    assert executors[0].calls[0][1] == (5, CFG.hidden_size)
    torch.testing.assert_close(executors[0].calls[0][2], router_logits[0])
    assert not torch.allclose(out, base)  # the replacement really computes the layer
    model.set_executors(lambda i, block: ResidentExperts(block.experts, CFG.top_k, CFG.norm_topk_prob))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base)


def test_forward_step_logit_rows_and_router_logits():
    model = _model()
    cache = SlotKVCache(CFG, 2, 16)
    batch = StepBatch(cache, [], [(cache.allocate(), 0, 6)], "cpu")
    ids = torch.tensor([5, 6, 7, 8, 9, 10])
    with torch.no_grad():
        logits, rl = model.forward_step(ids, batch.positions, batch, torch.tensor([5]), return_router_logits=True)
        full = model(ids[None])[0]
    assert logits.shape == (1, CFG.vocab_size) and len(rl) == CFG.num_layers and rl[0].shape == (6, CFG.num_experts)
    torch.testing.assert_close(logits[0], full[5], atol=1e-5, rtol=0)


def test_training_forward_backward_reaches_experts_router_and_shared_expert():
    cfg = CFG.replace(model_type="qwen2_moe", norm_topk_prob=False, shared_expert_intermediate_size=8)
    model = _model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    logits, router_logits = model(ids, return_router_logits=True)
    assert logits.shape == (2, 9, cfg.vocab_size) and router_logits[0].shape == (18, cfg.num_experts)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    loss = loss + sum(rl.softmax(-1).pow(2).sum() for rl in router_logits) * 1e-3
    loss.backward()
    moe = model.layers[1].moe
    for p in (moe.experts.w1, moe.experts.w2, moe.gate.weight, moe.shared.gate.weight, model.embed_tokens.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("slots, lengths", [
    ([0, 1, 2], [4, 4, 4]),  # one ascending slot range, equal lengths: a view of the cache, no mask
    ([1, 2, 3], [3, 6, 4]),  # ascending range, different lengths: a view with a length mask
    ([2, 0, 3], [5, 2, 6]),  # out of order with a gap: gathered rows
])
def test_batched_decode_over_slot_layouts(slots, lengths):
    """Decode tokens in any slot order attend to their own slot's prefix only."""
    model = _model()
    cache = SlotKVCache(CFG, 4, 16)
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, CFG.vocab_size, (n + 1,), generator=gen) for n in lengths]
    with torch.no_grad():
        for slot, seq in zip(slots, seqs):  # prefill all but the last token into the slot
            n = len(seq) - 1
            model.forward_step(seq[:-1], torch.arange(n), StepBatch(cache, [], [(slot, 0, n)], "cpu"))
        batch = StepBatch(cache, [(slot, len(seq) - 1) for slot, seq in zip(slots, seqs)], [], "cpu")
        logits = model.forward_step(torch.stack([seq[-1] for seq in seqs]), batch.positions, batch)  # [3, V]
        for row, seq in enumerate(seqs):
            torch.testing.assert_close(logits[row], model(seq[None])[0, -1], atol=1e-5, rtol=0)


def test_a_decode_batch_attends_its_longest_context_in_every_row():
    """What the step models cost (``decode_context``) is what the batch computes."""
    cache = SlotKVCache(CFG, 4, 32)
    lengths = [5, 17, 9]  # tokens each decode attends, its own included
    batch = StepBatch(cache, [(slot, n - 1) for slot, n in enumerate(lengths)], [], "cpu")
    assert batch.num_decode * batch.context == decode_context(lengths) == 3 * 17
    alone = StepBatch(cache, [(2, 8)], [], "cpu")
    assert alone.num_decode * alone.context == decode_context([9]) == 9

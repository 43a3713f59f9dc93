"""The CPU fast paths agree with the plain torch computations they replace."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emoe.engine import cpu_kernels
from emoe.engine.config import MoEConfig
from emoe.engine.kv_cache import SlotKVCache, StepBatch
from emoe.engine.model import MoEModel, expert_mlp, route


def _plain(fn, *args):
    """fn(*args) with every CPU kernel switched off."""
    saved = cpu_kernels.ENABLED
    cpu_kernels.ENABLED = False
    try:
        return fn(*args)
    finally:
        cpu_kernels.ENABLED = saved


@pytest.fixture
def torch_threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


def test_padded_rows_is_a_coarse_grid():
    sizes = range(1, 5000)
    padded = [cpu_kernels.padded_rows(r) for r in sizes]
    assert all(p >= r for p, r in zip(padded, sizes))
    assert all(p <= r * 1.25 for p, r in zip(padded, sizes) if r >= 256)
    assert all(a <= b for a, b in zip(padded, padded[1:]))
    assert all(cpu_kernels.padded_rows(p) == p for p in padded)
    assert len(set(padded)) <= 40


@pytest.mark.parametrize("rows", [1, 15, 16, 17, 100, 257])
def test_linear_matches_f_linear(rows):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 48, generator=g), torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(cpu_kernels.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        x3 = x.view(1, rows, 48)
        out = cpu_kernels.linear(x3, w)
        assert out.shape == (1, rows, 40)
        torch.testing.assert_close(out, F.linear(x3, w), rtol=1e-5, atol=1e-5)


def test_linear_keeps_autograd():
    x = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    cpu_kernels.linear(x, w).sum().backward()
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("shape", [(1, 128), (512, 128), (3, 7, 40)])
def test_rms_norm_matches_torch(shape):
    g = torch.Generator().manual_seed(len(shape))
    x, w = torch.randn(shape, generator=g) * 3, torch.rand(shape[-1], generator=g)
    with torch.inference_mode():
        assert cpu_kernels.rms_norm_applies(x, w)
        out = cpu_kernels.rms_norm(x, w, 1e-5)
    assert out.shape == x.shape
    torch.testing.assert_close(out, F.rms_norm(x, (shape[-1],), w, 1e-5), rtol=1e-6, atol=1e-6)


def test_rms_norm_reads_strided_rows_and_declines_what_it_cannot_run():
    wide, w = torch.randn(6, 80), torch.rand(40)
    x = wide[:, 20:60]  # rows 80 floats apart
    with torch.inference_mode():
        torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-6), F.rms_norm(x, (40,), w, 1e-6),
                                   rtol=1e-6, atol=1e-6)
    assert not cpu_kernels.rms_norm_applies(x.double(), w.double())
    with torch.enable_grad():
        assert not cpu_kernels.rms_norm_applies(x, w.clone().requires_grad_())


@pytest.mark.parametrize("rows,cols", [(512, 8), (64, 2), (8, 8), (300, 60)])
def test_softmax_matches_torch(rows, cols):
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)) * 4
    with torch.inference_mode():
        out = cpu_kernels.softmax(x)
    torch.testing.assert_close(out, x.softmax(dim=-1), rtol=1e-6, atol=1e-7)


def test_softmax_keeps_autograd():
    x = torch.randn(128, 8, requires_grad=True)
    (cpu_kernels.softmax(x)[:, 0]).sum().backward()
    assert x.grad is not None


def _experts(num_experts=6, hidden=40, ffn=56, seed=0):
    """w1, w3 [E, F, H], w2 [E, H, F]."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) * 0.2 for shape in
                 ((num_experts, ffn, hidden), (num_experts, ffn, hidden), (num_experts, hidden, ffn)))


def _slot_pool(w1, w3, w2):
    """w1/w3/w2 as views of one [S, 3FH] pool holding a slot's gate, up and down in one row, as
    the offload slot pool packs them: each stack is strided between slots."""
    pool = torch.cat([w1.flatten(1), w3.flatten(1), w2.flatten(1)], dim=1)  # [S, 3FH]
    size = w1[0].numel()
    return pool[:, :size].view_as(w1), pool[:, size:2 * size].view_as(w3), pool[:, 2 * size:].view_as(w2)


@pytest.mark.parametrize("tokens,top_k", [(1, 2), (2, 2), (8, 2), (33, 1), (64, 3)])
def test_fused_expert_mlp_matches_grouped_torch(tokens, top_k):
    w1, w3, w2 = _experts()
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 40, generator=g)
    weights, ids = route(torch.randn(tokens, 6, generator=g), top_k, normalize=False)
    with torch.inference_mode():
        fused = cpu_kernels.fused_expert_mlp(x, weights, ids, w1, w3, w2)
        plain = _plain(expert_mlp, x, weights, ids, w1, w3, w2)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_fused_expert_mlp_shares_its_token_limit_among_threads(torch_threads):
    w1, w3, w2 = _experts()
    limit = cpu_kernels.FUSED_MAX_TOKENS
    torch_threads(1)
    assert cpu_kernels.fused_expert_mlp_applies(torch.randn(limit, 40), w1, w3, w2)
    assert not cpu_kernels.fused_expert_mlp_applies(torch.randn(limit + 1, 40), w1, w3, w2)
    torch_threads(2)
    assert cpu_kernels.fused_expert_mlp_applies(torch.randn(limit // 2, 40), w1, w3, w2)
    assert not cpu_kernels.fused_expert_mlp_applies(torch.randn(limit // 2 + 1, 40), w1, w3, w2)


def test_fused_expert_mlp_counts_a_repeated_expert_twice():
    """An offloading executor may map two choices of a token to one slot."""
    w1, w3, w2 = _experts()
    x = torch.randn(3, 40)
    ids = torch.tensor([[2, 2], [0, 5], [5, 5]])
    weights = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.25, 0.25]])
    with torch.inference_mode():
        fused = cpu_kernels.fused_expert_mlp(x, weights, ids, w1, w3, w2)
        plain = _plain(expert_mlp, x, weights, ids, w1, w3, w2)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_fused_expert_mlp_declines_what_it_cannot_run(torch_threads):
    torch_threads(1)
    w1, w3, w2 = _experts()
    x = torch.randn(4, 40)
    applies = cpu_kernels.fused_expert_mlp_applies
    assert applies(x, w1, w3, w2)
    assert not applies(x.double(), w1.double(), w3.double(), w2.double())
    assert not applies(x, w1.transpose(1, 2).contiguous().transpose(1, 2), w3, w2)
    with torch.enable_grad():
        assert not applies(x, w1.requires_grad_(), w3, w2)


def test_fused_expert_mlp_reads_a_slot_pool_strided_between_slots(torch_threads):
    """The offload slot pool packs gate, up and down of a slot in one row."""
    torch_threads(1)
    w1, w3, w2 = _experts()
    pooled = _slot_pool(w1, w3, w2)
    x = torch.randn(5, 40)
    weights, ids = route(torch.randn(5, 6), 2, normalize=True)
    with torch.inference_mode():
        assert cpu_kernels.fused_expert_mlp_applies(x, *pooled)
        fused = cpu_kernels.fused_expert_mlp(x, weights, ids, *pooled)
        plain = _plain(expert_mlp, x, weights, ids, w1, w3, w2)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens,top_k", [(20, 2), (64, 2), (300, 2), (129, 3)])
def test_grouped_expert_mlp_matches_plain_torch(tokens, top_k, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "ONEDNN_MIN_ROWS", 16)  # small groups unpadded, larger padded
    w1, w3, w2 = _experts()
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 40, generator=g)
    weights, ids = route(torch.randn(tokens, 6, generator=g), top_k, normalize=False)
    with torch.inference_mode():
        assert cpu_kernels.grouped_expert_mlp_applies(x, w1, w3, w2)
        grouped = cpu_kernels.grouped_expert_mlp(x, weights, ids, w1, w3, w2)
        plain = _plain(expert_mlp, x, weights, ids, w1, w3, w2)
    torch.testing.assert_close(grouped, plain, rtol=1e-5, atol=1e-5)


def test_group_by_expert_pads_large_groups_with_rows_that_add_nowhere():
    ids = torch.tensor([[0, 2]] * 50 + [[2, 1]] * 3)  # expert 0: 50 pairs, 1: 3, 2: 53
    gates = torch.rand(53, 2)
    source, target, row_gates, sizes = cpu_kernels._group_by_expert(ids.numpy(), gates.numpy(), 4, 48)
    assert sizes.tolist() == [cpu_kernels.padded_rows(50), 3, cpu_kernels.padded_rows(53), 0]
    starts = [0, sizes[0], sizes[0] + sizes[1]]
    for e, count, start in zip(range(3), (50, 3, 53), starts):
        rows = slice(start, start + count)
        tokens = [t for t in range(53) for k in range(2) if ids[t, k] == e]
        assert source[rows].tolist() == target[rows].tolist() == tokens  # in token order
        want = [gates[t, k].item() for t in range(53) for k in range(2) if ids[t, k] == e]
        assert row_gates[rows].tolist() == pytest.approx(want)
        padding = slice(start + count, start + sizes[e])
        assert (target[padding] == 53).all() and (row_gates[padding] == 0).all()
        assert set(source[padding].tolist()) <= set(tokens)  # padding reads a token of the group


@pytest.mark.parametrize("bad_id", [-1, 6])
@pytest.mark.parametrize("kernel", ["grouped_expert_mlp", "fused_expert_mlp"])
def test_expert_kernels_reject_an_expert_id_out_of_range(bad_id, kernel):
    """numba does not check bounds; the kernels check ids themselves, as torch's indexing would."""
    w1, w3, w2 = _experts()
    ids = torch.zeros(80, 2, dtype=torch.long)
    ids[5, 1] = bad_id
    with torch.inference_mode(), pytest.raises(IndexError, match="outside the stacked experts"):
        getattr(cpu_kernels, kernel)(torch.randn(80, 40), torch.rand(80, 2), ids, w1, w3, w2)


def test_grouped_expert_mlp_keeps_nan_to_its_token_and_reads_a_slot_pool(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "ONEDNN_MIN_ROWS", 8)
    w1, w3, w2 = _experts()
    pooled = _slot_pool(w1, w3, w2)
    x = torch.randn(40, 40)
    x[0, 3] = float("nan")  # the first row of its groups: what padding rows copy
    weights, ids = route(torch.randn(40, 6), 2, normalize=True)
    with torch.inference_mode():
        assert cpu_kernels.grouped_expert_mlp_applies(x, *pooled)
        grouped = cpu_kernels.grouped_expert_mlp(x, weights, ids, *pooled)
        plain = _plain(expert_mlp, x, weights, ids, w1, w3, w2)
    torch.testing.assert_close(grouped, plain, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert grouped[0].isnan().all() and grouped[1:].isfinite().all()


def test_exp_parts_is_within_an_ulp_of_exp():
    x = np.linspace(-87, 0, 200_001, dtype=np.float32)
    s, bits = x.copy(), np.zeros(len(x) + 1, dtype=np.int32)
    cpu_kernels._exp_parts(s, len(x), np.float32(0), np.float32(1), bits)
    got = s * bits[:len(x)].view(np.float32)
    exact = np.exp(x.astype(np.float64))
    assert (np.abs(got - exact) / np.spacing(exact.astype(np.float32))).max() <= 1.05
    edge = np.array([-np.inf, -200.0, 3.0, np.nan], dtype=np.float32)  # shifted by 3
    bits = np.zeros(5, dtype=np.int32)
    cpu_kernels._exp_parts(edge, 4, np.float32(3), np.float32(1), bits)
    got = edge * bits[:4].view(np.float32)
    assert got[:3].tolist() == [0.0, 0.0, 1.0] and np.isnan(got[3])


def test_row_max_bits_orders_like_floats():
    rows = [np.random.default_rng(i).normal(size=37).astype(np.float32) * 10 for i in range(20)]
    rows += [np.array([-3.0, -0.0, -7.0], np.float32), np.array([-np.inf, -1e30], np.float32),
             np.array([np.inf, 2.0], np.float32), np.array([5.0], np.float32)]
    for row in rows:
        top = np.array([cpu_kernels._row_max_bits(row, len(row))], dtype=np.int32).view(np.float32)[0]
        assert top == row.max()


def test_prefill_attention_keeps_nan_where_a_query_sees_it():
    q, k, v = torch.randn(64, 4, 8), torch.randn(2, 64, 8), torch.randn(2, 64, 8)
    with torch.inference_mode():
        clean = cpu_kernels.prefill_attention(q, k, v, 0)
        q[5, 1, 0] = float("nan")  # query 5, head 1
        k[0, 20, 0] = float("nan")  # key 20 of kv head 0 (query heads 0 and 1)
        out = cpu_kernels.prefill_attention(q, k, v, 0)
    assert out[20:, :2].isnan().all() and out[5, 1].isnan().all()
    keep = torch.ones(64, 4, dtype=torch.bool)
    keep[20:, :2] = keep[5, 1] = False
    torch.testing.assert_close(out[keep], clean[keep], rtol=1e-5, atol=1e-5)


def _reference_attention(q, k, v, start):
    """sdpa over one sequence: q [n, Hq, D] at positions start.., k/v [Hkv, start+n, D]."""
    n, end = q.shape[0], start + q.shape[0]
    mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]  # [n, end]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None, :, :end], v[None, :, :end],
                                         attn_mask=mask, enable_gqa=q.shape[1] != k.shape[0])
    return out[0].transpose(0, 1)  # [n, Hq, D]


@pytest.mark.parametrize("n,start,heads,kv_heads", [(48, 0, 4, 2), (100, 0, 4, 4), (300, 0, 6, 2),
                                                    (50, 37, 4, 2), (130, 200, 2, 1)])
def test_prefill_attention_matches_sdpa(n, start, heads, kv_heads, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "QUERY_BLOCK", 64)  # several blocks, each seeing more keys
    g = torch.Generator().manual_seed(n + start)
    positions = start + n + 70  # cache room past the prompt, holding stale values
    k = torch.randn(kv_heads, positions, 16, generator=g)
    v = torch.randn(kv_heads, positions, 16, generator=g)
    k[:, start + n:] = 1e4  # whatever sits past the prompt must not be attended
    v[:, start + n:] = 1e4
    q = torch.randn(n, heads, 16, generator=g)
    with torch.inference_mode():
        assert cpu_kernels.prefill_attention_applies(q, k, v)
        out = cpu_kernels.prefill_attention(q, k, v, start)
    torch.testing.assert_close(out, _reference_attention(q, k, v, start), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,start", [(100, 0), (70, 30)])
def test_prefill_attention_ignores_nan_left_in_the_cache_by_an_earlier_request(n, start):
    g = torch.Generator().manual_seed(n)
    q, k, v = torch.randn(n, 4, 16, generator=g), torch.randn(2, 200, 16, generator=g), torch.randn(2, 200, 16, generator=g)
    expected = _reference_attention(q, k, v, start)
    k[:, start + n:], v[:, start + n:] = float("nan"), float("nan")  # stale, past this prompt
    with torch.inference_mode():
        out = cpu_kernels.prefill_attention(q, k, v, start)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_prefill_attention_bounds_scores_held_at_once(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "SCORE_BLOCK_ELEMENTS", 2 * 40 * 8)  # 8-row blocks
    q, k, v = torch.randn(40, 4, 8), torch.randn(2, 40, 8), torch.randn(2, 40, 8)
    with torch.inference_mode():
        out = cpu_kernels.prefill_attention(q, k, v, 0)
    torch.testing.assert_close(out, _reference_attention(q, k, v, 0), rtol=1e-5, atol=1e-5)


def test_engine_step_with_and_without_kernels_agree():
    """A step mixing decode tokens with a long prefill chunk takes every fast path."""
    config = MoEConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                       num_kv_heads=2, num_experts=4, top_k=2, max_position_embeddings=256)
    model = MoEModel(config).init_weights(std=0.2, generator=torch.Generator().manual_seed(0)).eval()
    ids = torch.randint(0, 64, (232,), generator=torch.Generator().manual_seed(1))

    def step(enabled: bool) -> torch.Tensor:
        saved = cpu_kernels.ENABLED
        cpu_kernels.ENABLED = enabled
        try:
            cache = SlotKVCache(config, num_slots=3, max_seq_len=256)
            with torch.inference_mode():
                first = StepBatch(cache, [], [(0, 0, 20), (1, 0, 30)], "cpu")
                model.forward_step(ids[:50], first.positions, first)
                batch = StepBatch(cache, [(0, 20), (1, 30)], [(2, 0, 180)], "cpu")
                return model.forward_step(ids[50:232], batch.positions, batch)  # [182, V]
        finally:
            cpu_kernels.ENABLED = saved

    torch.testing.assert_close(step(True), step(False), rtol=1e-4, atol=1e-4)


def test_environment_switch_turns_kernels_off():
    code = "import emoe.engine.cpu_kernels as k; print(k.ENABLED)"
    env = {**os.environ, "EMOE_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_kernel_compiles_without_a_disk_cache(monkeypatch):
    """Where numba finds no writable cache folder, the kernel still compiles (uncached)."""
    import numba

    real_njit = numba.njit

    def njit(*args, cache=False, **kwargs):
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return real_njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", njit)
    add = cpu_kernels._compile(lambda a, b: a + b)
    assert add(2, 3) == 5


def test_fused_expert_mlp_propagates_nan_and_overflow_like_torch():
    w1, w3, w2 = _experts()
    x = torch.randn(3, 40)
    x[1, 0], x[2, 0] = float("nan"), 1e30
    weights, ids = route(torch.randn(3, 6), 2, normalize=True)
    with torch.inference_mode():
        fused = cpu_kernels.fused_expert_mlp(x, weights, ids, w1, w3, w2)
        plain = _plain(expert_mlp, x, weights, ids, w1, w3, w2)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert fused[1].isnan().all() and fused[0].isfinite().all()

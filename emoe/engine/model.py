"""A Mixtral-family MoE transformer with stacked expert tensors and a pluggable expert executor.

Two forward paths share every module:

* ``model(input_ids [B, T])`` - the plain full-sequence causal forward (training, scoring);
* ``model.forward_step(input_ids [N], positions [N], kv)`` - the engine's path: a flat batch of
  tokens from many requests (decode tokens and prefill chunks) attending through a KV cache.

Each MoE layer computes its router logits and hands ``(hidden [T, H], router_logits [T, E],
layer)`` to ``block.executor``; the default :class:`ResidentExperts` keeps every expert
resident. Expert weights live in :class:`ExpertWeights` (storage), apart from the executor
(compute), so an offloading executor can hold them elsewhere and keep a slot pool instead.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emoe.engine import cpu_kernels
from emoe.engine.config import MoEConfig


class KVBatch(Protocol):
    """How the flat token batch of :meth:`MoEModel.forward_step` attends (see kv_cache.py)."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] (rotary applied) -> [N, Hq, D]; stores k/v first."""
        ...


class ExpertExecutor(Protocol):
    """Selects experts from the router's logits and computes the routed-expert output."""

    def __call__(self, hidden: Tensor, router_logits: Tensor, layer: int) -> Tensor:
        """hidden [T, H], router_logits [T, E] -> [T, H]."""
        ...


class Linear(nn.Linear):
    """``nn.Linear`` whose matmul goes through :func:`emoe.engine.cpu_kernels.linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return cpu_kernels.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if cpu_kernels.rms_norm_applies(x, self.weight):
                return cpu_kernels.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # half precision: normalise in float32, round, then scale (as transformers does)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_positions, head_dim] in float32, half-rotation (HF) layout."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)
        self.reset()

    def reset(self) -> None:
        """(Re)compute the tables in float32 on the buffers' device (after ``to_empty`` too)."""
        device = self.cos.device
        if device.type == "meta":
            return
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        freqs = torch.arange(self.max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos, self.sin = emb.cos(), emb.sin()

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions [...] -> cos, signed sin [..., 1, D] for :func:`apply_rotary` (once per forward)."""
        half = self.head_dim // 2
        sin = self.sin[positions]  # [..., D]
        sin[..., :half].neg_()  # rotate_half(x) * sin == roll(x, D/2) * [-sin_lo, sin_hi]
        return self.cos[positions].unsqueeze(-2).to(dtype), sin.unsqueeze(-2).to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """x [..., heads, D], cos/signed_sin [..., 1, D] from :class:`RotaryEmbedding`."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, config: MoEConfig, layer: int):
        super().__init__()
        c = config
        self.layer, self.num_heads, self.num_kv_heads, self.head_dim = layer, c.num_heads, c.num_kv_heads, c.head_dim
        self.clip_qkv = c.clip_qkv
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.attention_out_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.num_heads * c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.num_kv_heads * c.head_dim, c.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KVBatch | None) -> Tensor:
        """x [B, T, H] with kv None (causal over T), or x [N, H] through ``kv``."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [..., Hq*D], [..., Hkv*D] x2
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        lead = x.shape[:-1]
        q = apply_rotary(q.view(*lead, self.num_heads, self.head_dim), cos, sin)  # [..., Hq, D]
        k = apply_rotary(k.view(*lead, self.num_kv_heads, self.head_dim), cos, sin)  # [..., Hkv, D]
        v = v.view(*lead, self.num_kv_heads, self.head_dim)  # [..., Hkv, D]
        if kv is None:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                enable_gqa=self.num_heads != self.num_kv_heads).transpose(1, 2)  # [B, T, Hq, D]
        else:
            out = kv.attend(self.layer, q, k, v)  # [N, Hq, D]
        return self.o_proj(out.reshape(*lead, self.num_heads * self.head_dim))


class ExpertWeights(nn.Module):
    """One layer's routed experts, stacked: w1/w3 [E, F, H] (gate/up), w2 [E, H, F] (down)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.w3 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]


def route(router_logits: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """Top-k softmax routing: router_logits [T, E] -> gate weights [T, K] (float32), ids [T, K]."""
    if normalize:  # renormalised top-k of the softmax == softmax over the top-k logits
        top_logits, ids = router_logits.float().topk(top_k, dim=-1)  # [T, K] x2
        return cpu_kernels.softmax(top_logits), ids
    weights, ids = cpu_kernels.softmax(router_logits.float()).topk(top_k, dim=-1)  # [T, K] x2
    return weights, ids


def expert_mlp(x: Tensor, weights: Tensor, ids: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) with experts stacked along dim 0 of w1/w3/w2.

    x [T, H], weights [T, K], ids [T, K] index w1/w3 [E, F, H] and w2 [E, H, F] (an offloading
    executor passes slot indices into its slot pool). On the CPU, :mod:`emoe.engine.cpu_kernels`
    runs a few tokens through its fused kernel and more through its grouped oneDNN path.
    Otherwise token-expert pairs are grouped by expert (one stable sort) and each used expert
    runs once on its tokens; a single token (batch-1 decode) skips the grouping.
    """
    if cpu_kernels.fused_expert_mlp_applies(x, w1, w3, w2):
        return cpu_kernels.fused_expert_mlp(x, weights, ids, w1, w3, w2)
    if cpu_kernels.grouped_expert_mlp_applies(x, w1, w3, w2):
        return cpu_kernels.grouped_expert_mlp(x, weights, ids, w1, w3, w2)
    num_tokens, top_k = ids.shape
    if num_tokens == 1:
        out = None
        gates = weights[0].to(x.dtype)  # [K]
        for k, e in enumerate(ids[0].tolist()):
            y = F.linear(F.silu(F.linear(x, w1[e])) * F.linear(x, w3[e]), w2[e]) * gates[k]  # [1, H]
            out = y if out is None else out + y
        return out
    flat_ids = ids.flatten()  # [T*K]
    order = flat_ids.argsort(stable=True)  # [T*K]
    counts = torch.bincount(flat_ids, minlength=w1.shape[0]).tolist()
    token_idx = order // top_k  # [T*K]
    xs = x[token_idx]  # [T*K, H]
    outs = []
    start = 0
    for e, n in enumerate(counts):
        if n:
            xe = xs[start:start + n]  # [n, H]
            outs.append(F.linear(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e]))  # [n, H]
            start += n
    ys = torch.cat(outs) * weights.flatten()[order, None].to(x.dtype)  # [T*K, H]
    return torch.zeros_like(x).index_add_(0, token_idx, ys)  # [T, H]


class ResidentExperts:
    """The default executor: all experts of the layer resident in ``weights``."""

    def __init__(self, weights: ExpertWeights, top_k: int, normalize: bool):
        self.weights, self.top_k, self.normalize = weights, top_k, normalize

    def __call__(self, hidden: Tensor, router_logits: Tensor, layer: int) -> Tensor:
        gates, ids = route(router_logits, self.top_k, self.normalize)  # [T, K] x2
        w = self.weights
        return expert_mlp(hidden, gates, ids, w.w1, w.w3, w.w2)  # [T, H]


class SharedExpert(nn.Module):
    """Qwen2-MoE's always-on expert, scaled by sigmoid(gate(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.gate = Linear(hidden_size, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [T, H]
        return torch.sigmoid(self.gate(x)) * y


class MoEBlock(nn.Module):
    def __init__(self, config: MoEConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = ExpertWeights(config.num_experts, config.hidden_size, config.intermediate_size)
        self.shared = (SharedExpert(config.hidden_size, config.shared_expert_intermediate_size)
                       if config.shared_expert_intermediate_size else None)
        self.executor: ExpertExecutor = ResidentExperts(self.experts, config.top_k, config.norm_topk_prob)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, H] -> (out [T, H], router_logits [T, E])."""
        router_logits = self.gate(x)  # [T, E]
        out = self.executor(x, router_logits, self.layer)  # [T, H]
        if self.shared is not None:
            out = out + self.shared(x)
        return out, router_logits


class DecoderLayer(nn.Module):
    def __init__(self, config: MoEConfig, layer: int):
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = MoEBlock(config, layer)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: KVBatch | None) -> tuple[Tensor, Tensor]:
        x = x + self.attn(self.input_norm(x), cos, sin, kv)
        h = self.post_attn_norm(x)
        moe_out, router_logits = self.moe(h.reshape(-1, h.shape[-1]))  # [T, H], [T, E]
        return x + moe_out.view_as(x), router_logits


class MoEModel(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        # no default init (init_weights or a checkpoint sets every weight); on the meta device
        # (load_model) Embedding's normal_ would import torch._dynamo: 2 s of every startup
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)

    def tie_weights(self) -> None:
        """Share lm_head with the embeddings when the config says so (again after ``to_empty``)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> "MoEModel":
        """Random normal(0, std) weights, unit norms, zero biases (for fresh or random models)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * std)
        return self

    def set_executors(self, make: Callable[[int, MoEBlock], ExpertExecutor]) -> None:
        """Replace every layer's expert executor with ``make(layer_index, block)``."""
        for i, layer in enumerate(self.layers):
            layer.moe.executor = make(i, layer.moe)

    def forward(self, input_ids: Tensor, return_router_logits: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """input_ids [B, T] -> logits [B, T, V] (and per-layer router logits [B*T, E])."""
        x = self.embed_tokens(input_ids)  # [B, T, H]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # [T]
        cos, sin = self.rotary(positions, x.dtype)  # [T, 1, D] x2
        router_logits = []
        for layer in self.layers:
            x, rl = layer(x, cos, sin, None)
            router_logits.append(rl)
        logits = self.lm_head(self.norm(x))  # [B, T, V]
        return (logits, router_logits) if return_router_logits else logits

    def forward_step(self, input_ids: Tensor, positions: Tensor, kv: KVBatch,
                     logit_rows: Tensor | None = None,
                     return_router_logits: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """One engine step over a flat token batch.

        input_ids/positions [N]; ``kv`` stores this step's keys/values and attends; logits are
        computed only for ``logit_rows`` [M] (all rows if None) -> [M, V] (and per-layer
        router logits [N, E]).
        """
        x = self.embed_tokens(input_ids)  # [N, H]
        cos, sin = self.rotary(positions, x.dtype)  # [N, 1, D] x2
        router_logits = []
        for layer in self.layers:
            x, rl = layer(x, cos, sin, kv)
            router_logits.append(rl)
        if logit_rows is not None:
            x = x[logit_rows]  # [M, H]
        logits = self.lm_head(self.norm(x))  # [M, V]
        return (logits, router_logits) if return_router_logits else logits

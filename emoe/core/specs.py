"""Model and hardware descriptions, in bytes and seconds.

Presets carry their provenance: where every number comes from.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: int
    non_expert_bytes: int
    kv_bytes_per_token: int
    hidden_size: int = 0
    provenance: str = ""

    @property
    def all_experts_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_bytes


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    """A GPU and its host link, plus the step-time cost model's coefficients.

    Step time (s) = step_overhead_s + prefill_s_per_token * prefill tokens
                    + decode_s_per_token * decode tokens
                    + attention_s_per_context_token * context tokens attended by decodes.
    """

    name: str
    gpu_memory_bytes: int
    pcie_bandwidth_bytes_per_s: float
    pcie_latency_s: float
    step_overhead_s: float
    prefill_s_per_token: float
    decode_s_per_token: float
    attention_s_per_context_token: float = 0.0
    predictor_s: float = 0.0
    provenance: str = ""


def _mixtral(name: str, layers: int, hidden: int, ffn: int, experts: int, kv_heads: int,
             head_dim: int, total_params: float, provenance: str) -> ModelSpec:
    bytes_per_param = 2  # bf16 / fp16
    expert_params = 3 * hidden * ffn
    non_expert_params = int(total_params - layers * experts * expert_params)
    return ModelSpec(
        name=name,
        num_layers=layers,
        num_experts=experts,
        top_k=2,
        expert_bytes=expert_params * bytes_per_param,
        non_expert_bytes=non_expert_params * bytes_per_param,
        kv_bytes_per_token=layers * 2 * kv_heads * head_dim * bytes_per_param,
        hidden_size=hidden,
        provenance=provenance,
    )


MODEL_PRESETS: dict[str, ModelSpec] = {
    "mixtral-8x7b": _mixtral(
        "mixtral-8x7b", layers=32, hidden=4096, ffn=14336, experts=8, kv_heads=8, head_dim=128,
        total_params=46.7e9,
        provenance="Mixtral-8x7B config.json (hidden 4096, ffn 14336, 32 layers, 8 KV heads) and "
                   "its published 46.7B total parameters; bf16 weights and KV cache",
    ),
    "mixtral-8x22b": _mixtral(
        "mixtral-8x22b", layers=56, hidden=6144, ffn=16384, experts=8, kv_heads=8, head_dim=128,
        total_params=140.6e9,
        provenance="Mixtral-8x22B config.json (hidden 6144, ffn 16384, 56 layers, 8 KV heads) and "
                   "its published 140.6B total parameters; bf16 weights and KV cache",
    ),
}

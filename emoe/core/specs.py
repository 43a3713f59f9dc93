"""Model and hardware descriptions, in bytes and seconds.

Presets carry their provenance: where every number comes from.
"""

from __future__ import annotations

from dataclasses import dataclass

from emoe.core.errors import UnknownNameError


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
                    + attention_s_per_context_token * context tokens attended by decodes
                    + resident weight bytes / hbm_bandwidth_bytes_per_s (when non-zero).

    ``hbm_bandwidth_bytes_per_s`` = 0 folds the per-step weight read into ``step_overhead_s``
    (what a profile measured at one expert residency does).
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
    hbm_bandwidth_bytes_per_s: float = 0.0


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


# Hardware presets: a GPU and its host link, with step-time coefficients for Mixtral-8x7B
# (bf16). Each number is tagged with where it comes from:
#   [published]  a vendor datasheet or standard figure, used as is;
#   [roofline]   derived from published figures by a stated formula and achieved fraction;
#   [paper]      measured in the eMoE paper (arXiv 2503.06823);
#   [assumed]    a typical value, neither published nor derived: replace with a profile.
# Roofline terms, Mixtral-8x7B: 12.9e9 active parameters per token (non-expert 1.6e9 plus
# 2 of 8 experts in 32 layers) -> 25.8 GFLOP per token; KV cache 131,072 B per token.
_MIXTRAL_8X7B_FLOP_PER_TOKEN = 2 * 12.9e9
_MIXTRAL_8X7B_KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2


def _gpu(name: str, memory_bytes: int, hbm_bytes_per_s: float, bf16_flops: float,
         pcie_bytes_per_s: float, provenance: str) -> HardwareSpec:
    hbm_achieved = 0.8 * hbm_bytes_per_s
    return HardwareSpec(
        name=name,
        gpu_memory_bytes=memory_bytes,
        pcie_bandwidth_bytes_per_s=0.8 * pcie_bytes_per_s,
        pcie_latency_s=10e-6,
        step_overhead_s=3e-3,
        prefill_s_per_token=_MIXTRAL_8X7B_FLOP_PER_TOKEN / (0.5 * bf16_flops),
        decode_s_per_token=_MIXTRAL_8X7B_FLOP_PER_TOKEN / (0.5 * bf16_flops),
        attention_s_per_context_token=_MIXTRAL_8X7B_KV_BYTES_PER_TOKEN / hbm_achieved,
        predictor_s=0.35,
        hbm_bandwidth_bytes_per_s=hbm_achieved,
        provenance=provenance,
    )


_COMMON_PROVENANCE = (
    "pcie_bandwidth [roofline]: 80% of the PCIe x16 peak (pinned-memory bandwidthTest typically "
    "reaches 75-85%); pcie_latency 10 us [assumed]: cudaMemcpyAsync issue plus DMA setup; "
    "hbm_bandwidth [roofline]: 80% of the HBM peak; step_overhead 3 ms [assumed]: kernel launches "
    "and host scheduling per step; prefill/decode s_per_token [roofline]: 25.8 GFLOP per "
    "Mixtral-8x7B token at 50% of dense bf16 peak (decode tokens are added to the weight-read "
    "time: an additive stand-in for max(memory, compute)); attention_s_per_context_token "
    "[roofline]: 131,072 B of KV per context token read at the achieved HBM bandwidth; "
    "predictor_s 0.35 s [paper]: XLNet predictor call, 0.33-0.38 s on A100, not rescaled")

HARDWARE_PRESETS: dict[str, HardwareSpec] = {
    "a100-40gb": _gpu(
        "a100-40gb", memory_bytes=40 * 1024**3, hbm_bytes_per_s=1.555e12, bf16_flops=312e12,
        pcie_bytes_per_s=32e9,
        provenance="NVIDIA A100 40GB SXM4 datasheet [published]: 40 GiB HBM2, 1,555 GB/s, "
                   "312 TFLOPS dense bf16, PCIe Gen4 x16 32 GB/s. " + _COMMON_PROVENANCE,
    ),
    "h100-80gb": _gpu(
        "h100-80gb", memory_bytes=80 * 1024**3, hbm_bytes_per_s=3.35e12, bf16_flops=989e12,
        pcie_bytes_per_s=64e9,
        provenance="NVIDIA H100 80GB SXM5 datasheet [published]: 80 GiB HBM3, 3.35 TB/s, "
                   "989 TFLOPS dense bf16, PCIe Gen5 x16 64 GB/s. " + _COMMON_PROVENANCE,
    ),
    "h200-141gb": _gpu(
        "h200-141gb", memory_bytes=141 * 10**9, hbm_bytes_per_s=4.8e12, bf16_flops=989e12,
        pcie_bytes_per_s=64e9,
        provenance="NVIDIA H200 SXM datasheet [published]: 141 GB HBM3e, 4.8 TB/s, "
                   "989 TFLOPS dense bf16, PCIe Gen5 x16 64 GB/s. " + _COMMON_PROVENANCE,
    ),
}


def get_model(name: str) -> ModelSpec:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise UnknownNameError("model", name, list(MODEL_PRESETS)) from None


def get_hardware(name: str) -> HardwareSpec:
    try:
        return HARDWARE_PRESETS[name]
    except KeyError:
        raise UnknownNameError("gpu", name, list(HARDWARE_PRESETS)) from None

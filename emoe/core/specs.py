"""Model and hardware descriptions, in bytes and seconds.

Presets carry their provenance: where every number comes from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from emoe.core.errors import UnknownNameError


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """An MoE model as the scheduler and simulator see it, in bytes.

    ``non_expert_bytes`` holds every always-resident weight (attention, norms, router,
    embeddings, shared experts: ``shared_expert_bytes`` of them, all layers). ``max_context``: prompt +
    output tokens a request may hold (0: unchecked). ``param_bytes``: bytes per weight.
    Build one from a config with ``emoe.core.model_config.model_spec_from``.
    """

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: int
    non_expert_bytes: int
    kv_bytes_per_token: int
    hidden_size: int = 0
    provenance: str = ""
    max_context: int = 0
    param_bytes: int = 2
    shared_expert_bytes: int = 0

    @property
    def all_experts_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_bytes

    @property
    def active_bytes_per_token(self) -> int:
        """Weight bytes one token uses: everything but the experts, plus top-k per layer."""
        return self.non_expert_bytes + self.num_layers * self.top_k * self.expert_bytes


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


MODEL_CONFIGS: dict[str, tuple[dict, str]] = {
    "mixtral-8x7b": ({
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"},
        "mistralai/Mixtral-8x7B-v0.1 config.json (fields as published); 46.7B parameters "
        "computed from it match the published total; bf16 weights and KV cache"),
    "mixtral-8x22b": ({
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 6144,
        "intermediate_size": 16384, "num_hidden_layers": 56, "num_attention_heads": 48,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
        "max_position_embeddings": 65536, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"},
        "mistralai/Mixtral-8x22B-v0.1 config.json (fields as published); 140.6B parameters "
        "computed from it match the published total; bf16 weights and KV cache"),
    "qwen1.5-moe-a2.7b": ({
        "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 2048,
        "intermediate_size": 5632, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60,
        "num_experts_per_tok": 4, "norm_topk_prob": False, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "use_sliding_window": False,
        "sliding_window": 32768, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 151643,
        "eos_token_id": 151643, "torch_dtype": "bfloat16"},
        "Qwen/Qwen1.5-MoE-A2.7B config.json (fields as published); 14.3B parameters computed "
        "from it match the published total; bf16 weights and KV cache"),
    "olmoe-1b-7b": ({
        "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048,
        "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
        "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
        "norm_topk_prob": False, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "attention_bias": False, "clip_qkv": None,
        "tie_word_embeddings": False, "hidden_act": "silu", "pad_token_id": 1,
        "eos_token_id": 50279, "torch_dtype": "bfloat16"},
        "allenai/OLMoE-1B-7B-0924 config.json (fields as published); 6.9B parameters computed "
        "from it match the published total; bf16 weights and KV cache"),
}
"""Model presets: the published ``config.json`` fields (what the spec needs) and provenance."""


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


class _ModelPresets(dict):
    """Model specs by name: a preset is computed from its config on first use (the parser
    lives in ``emoe.core.model_config``); a caller may register a spec of its own."""

    def __missing__(self, name: str) -> ModelSpec:
        if name not in MODEL_CONFIGS:
            raise KeyError(name)
        from emoe.core.model_config import model_spec_from

        spec = self[name] = model_spec_from(name)
        return spec


MODEL_PRESETS: dict[str, ModelSpec] = _ModelPresets()


def get_model(name: str) -> ModelSpec:
    """A preset (or registered spec) by name, or the spec of a Hugging Face model folder or
    its config.json."""
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        from emoe.core.model_config import model_spec_from

        return model_spec_from(name)


def get_hardware(name: str) -> HardwareSpec:
    try:
        return HARDWARE_PRESETS[name]
    except KeyError:
        raise UnknownNameError("gpu", name, list(HARDWARE_PRESETS)) from None


def hardware_for(hardware: HardwareSpec, model: ModelSpec) -> HardwareSpec:
    """A hardware preset's per-token coefficients rescaled from Mixtral-8x7B (what the presets
    are derived for) to ``model``: prefill and decode by the weight bytes a token uses,
    attention by KV bytes per token [roofline, as the presets]. Mixtral-8x7B in bf16 is left
    exactly as it is."""
    if hardware.name not in HARDWARE_PRESETS or HARDWARE_PRESETS[hardware.name] != hardware:
        return hardware  # measured (a profile) or hand-made: not a roofline preset
    reference = get_model("mixtral-8x7b")
    compute = model.active_bytes_per_token / reference.active_bytes_per_token
    kv = model.kv_bytes_per_token / reference.kv_bytes_per_token
    if compute == 1.0 and kv == 1.0:
        return hardware
    return dataclasses.replace(
        hardware, prefill_s_per_token=hardware.prefill_s_per_token * compute,
        decode_s_per_token=hardware.decode_s_per_token * compute,
        attention_s_per_context_token=hardware.attention_s_per_context_token * kv,
        provenance=f"{hardware.provenance}; per-token costs rescaled to {model.name} "
                   f"[roofline]: x{compute:.3g} (weight bytes per token), "
                   f"x{kv:.3g} (KV bytes per token)")

"""MoE model configuration and its mapping to Hugging Face ``config.json`` files.

One dataclass describes every supported family (Mixtral, Qwen2-MoE, OLMoE); the differences
are flags: renormalised top-k weights, a sigmoid-gated shared expert, q/k RMSNorm, biases.
It is plain data parsed from JSON (no torch): the engine builds its model from it, and the
simulator takes its model spec from it (``model_spec_from``), so both count the same bytes.
The model presets (``emoe.core.specs.MODEL_CONFIGS``) are such configs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emoe.core.errors import ConfigError, UnknownNameError
from emoe.core.paths import resolve_path
from emoe.core.specs import MODEL_CONFIGS, ModelSpec

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "olmoe")

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MoEConfig:
    """Shapes and numerics of a decoder-only MoE transformer.

    ``intermediate_size`` is per routed expert. ``head_dim`` 0 means hidden_size // num_heads.
    ``qk_norm``: RMSNorm over the full q and k projections (OLMoE). ``attention_bias``: q/k/v
    biases; ``attention_out_bias``: o_proj bias. ``clip_qkv``: clamp q, k, v to +-clip (OLMoE).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    top_k: int
    head_dim: int = 0
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    clip_qkv: float | None = None
    model_type: str = "mixtral"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnknownNameError("model_type", self.model_type, SUPPORTED_MODEL_TYPES)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "num_experts", "top_k", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}: must be a positive integer, got {value!r}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"hidden_size: {self.hidden_size} is not divisible by num_heads "
                                  f"{self.num_heads}; give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim < 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim: must be a positive even integer, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_kv_heads: {self.num_kv_heads} must divide num_heads {self.num_heads}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k: {self.top_k} exceeds num_experts {self.num_experts}")
        if self.shared_expert_intermediate_size < 0:
            raise ConfigError("shared_expert_intermediate_size: must be >= 0 (0 = no shared expert)")
        if self.qk_norm and self.head_dim * self.num_heads != self.hidden_size:
            raise ConfigError("head_dim: qk_norm (OLMoE) needs head_dim * num_heads == hidden_size")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("rms_norm_eps and rope_theta: must be positive")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    # ---- derived sizes -------------------------------------------------------------------

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (w1, w3, w2)."""
        return 3 * self.hidden_size * self.intermediate_size

    def kv_bytes_per_token(self, dtype: str = "float32") -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * _dtype_bytes(dtype)

    def num_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        attn += (d * (self.num_heads + 2 * self.num_kv_heads) if self.attention_bias else 0)
        attn += h if self.attention_out_bias else 0
        attn += (d * self.num_heads + d * self.num_kv_heads) if self.qk_norm else 0
        shared = 3 * h * self.shared_expert_intermediate_size + h if self.shared_expert_intermediate_size else 0
        layer = attn + self.num_experts * self.expert_params + h * self.num_experts + shared + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h

    def to_model_spec(self, name: str, dtype: str = "float32", provenance: str = "",
                      max_context: int | None = None) -> ModelSpec:
        """The simulator's view of this model: bytes per expert, non-expert bytes (the shared
        expert included: it is always resident), KV per token, context (default: the model's
        ``max_position_embeddings``)."""
        nbytes = _dtype_bytes(dtype)
        expert_total = self.num_layers * self.num_experts * self.expert_params
        shared = self.shared_expert_intermediate_size
        return ModelSpec(
            name=name, num_layers=self.num_layers, num_experts=self.num_experts, top_k=self.top_k,
            expert_bytes=self.expert_params * nbytes,
            non_expert_bytes=(self.num_params() - expert_total) * nbytes,
            kv_bytes_per_token=self.kv_bytes_per_token(dtype), hidden_size=self.hidden_size,
            provenance=provenance or f"computed from MoEConfig ({self.model_type}, {dtype})",
            max_context=self.max_position_embeddings if max_context is None else max_context,
            param_bytes=nbytes,
            shared_expert_bytes=self.num_layers * (3 * self.hidden_size * shared
                                                   + self.hidden_size) * nbytes if shared else 0)

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json --------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "MoEConfig":
        """Build from a Hugging Face config dict; errors name ``source`` and the field."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")

        def get(key: str, default: Any = ...) -> Any:
            if key in d and d[key] is not None:
                return d[key]
            if default is ...:
                raise ConfigError(f"{source}: missing field {key!r} (model_type {model_type})")
            return default

        act = get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported; supported: silu")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{source}: rope_parameters.rope_type {rope_type!r} is not supported; "
                              f"supported: default")
        rope_theta = rope.get("rope_theta", d.get("rope_theta", 1e6 if model_type == "mixtral" else 1e4))
        max_pos = int(get("max_position_embeddings"))

        window = d.get("sliding_window")
        if model_type == "qwen2_moe":
            window = window if d.get("use_sliding_window") else None
        if window and window < max_pos:
            raise ConfigError(f"{source}: sliding_window {window} < max_position_embeddings {max_pos}: "
                              f"sliding-window attention is not supported")
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, list) else (eos,))
        eos_ids = tuple(t for t in eos_ids if 0 <= t < int(get("vocab_size")))

        common = dict(
            vocab_size=int(get("vocab_size")),
            hidden_size=int(get("hidden_size")),
            num_layers=int(get("num_hidden_layers")),
            num_heads=int(get("num_attention_heads")),
            num_kv_heads=int(get("num_key_value_heads", get("num_attention_heads"))),
            head_dim=int(get("head_dim", 0)),
            top_k=int(get("num_experts_per_tok")),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        if model_type == "mixtral":
            return cls(**common, intermediate_size=int(get("intermediate_size")),
                       num_experts=int(get("num_local_experts")), norm_topk_prob=True)
        if model_type == "qwen2_moe":
            if d.get("mlp_only_layers"):
                raise ConfigError(f"{source}: mlp_only_layers {d['mlp_only_layers']} is not supported "
                                  f"(every layer must be a MoE layer)")
            if int(d.get("decoder_sparse_step", 1)) != 1:
                raise ConfigError(f"{source}: decoder_sparse_step {d['decoder_sparse_step']} is not "
                                  f"supported; supported: 1")
            return cls(**common, intermediate_size=int(get("moe_intermediate_size")),
                       num_experts=int(get("num_experts")),
                       norm_topk_prob=bool(get("norm_topk_prob", False)),
                       shared_expert_intermediate_size=int(get("shared_expert_intermediate_size", 0)),
                       attention_bias=bool(get("qkv_bias", True)))
        bias = bool(get("attention_bias", False))
        return cls(**common, intermediate_size=int(get("intermediate_size")),
                   num_experts=int(get("num_experts")),
                   norm_topk_prob=bool(get("norm_topk_prob", False)), qk_norm=True,
                   attention_bias=bias, attention_out_bias=bias, clip_qkv=d.get("clip_qkv"))

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """A config.json dict that transformers and :meth:`from_hf_dict` both read back."""
        eos = None if not self.eos_token_ids else (
            self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids))
        d: dict[str, Any] = dict(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            num_experts_per_tok=self.top_k,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_parameters={"rope_theta": self.rope_theta, "rope_type": "default"},
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=eos,
            dtype=dtype,
            torch_dtype=dtype,
            attention_dropout=0.0,
            use_cache=True,
        )
        if self.model_type == "mixtral":
            if not self.norm_topk_prob or self.shared_expert_intermediate_size or self.qk_norm \
                    or self.attention_bias or self.attention_out_bias:
                raise ConfigError("model_type: mixtral has renormalised top-k, no shared expert, no "
                                  "qk_norm and no attention biases; pick qwen2_moe or olmoe")
            d.update(architectures=["MixtralForCausalLM"], intermediate_size=self.intermediate_size,
                     num_local_experts=self.num_experts, sliding_window=None, router_jitter_noise=0.0)
        elif self.model_type == "qwen2_moe":
            if self.qk_norm or self.attention_out_bias:
                raise ConfigError("model_type: qwen2_moe has no qk_norm and no o_proj bias")
            d.update(architectures=["Qwen2MoeForCausalLM"], moe_intermediate_size=self.intermediate_size,
                     intermediate_size=self.shared_expert_intermediate_size or self.intermediate_size,
                     num_experts=self.num_experts, norm_topk_prob=self.norm_topk_prob,
                     shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                     qkv_bias=self.attention_bias, decoder_sparse_step=1, mlp_only_layers=[],
                     use_sliding_window=False)
        else:
            if not self.qk_norm or self.shared_expert_intermediate_size \
                    or self.attention_bias != self.attention_out_bias:
                raise ConfigError("model_type: olmoe has qk_norm, no shared expert and one "
                                  "attention_bias flag for q/k/v/o")
            d.update(architectures=["OlmoeForCausalLM"], intermediate_size=self.intermediate_size,
                     num_experts=self.num_experts, norm_topk_prob=self.norm_topk_prob,
                     attention_bias=self.attention_bias, clip_qkv=self.clip_qkv)
        return d


# ---- model specs from config.json files and presets -------------------------------------

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}



def stored_dtype(config: dict[str, Any], folder: Path | None = None) -> str:
    """The dtype a checkpoint stores its weights in: the safetensors header of its first
    shard when ``folder`` has one (what the engine loads), else the config's ``torch_dtype``
    (or ``dtype``), else float32 (transformers' default)."""
    if folder is not None:
        shards = sorted(folder.glob("*.safetensors"))
        if shards:
            dtype = _safetensors_dtype(shards[0])
            if dtype is not None:
                return dtype
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    return dtype if dtype in _DTYPE_BYTES else "float32"


def _safetensors_dtype(path: Path) -> str | None:
    """The dtype of the embedding (else the first) tensor, from the file's JSON header."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 1 << 26:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    entry = tensors.get("model.embed_tokens.weight") or next(iter(tensors.values()), {})
    return _SAFETENSORS_DTYPES.get(entry.get("dtype", ""))


def read_model_config(path: str | Path) -> tuple[MoEConfig, str, str, Path]:
    """(config, name, stored dtype, config.json path) of a model folder or its config.json.
    The name is the folder's (what ``emoe serve`` calls the model). Errors name the file and
    the field."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path}: no config.json (a Hugging Face model folder, its "
                          "config.json, or a preset name is expected)")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: a JSON object is needed")
    config = MoEConfig.from_hf_dict(data, source=str(file))
    folder = file.resolve().parent
    return config, folder.name, stored_dtype(data, folder), file


def model_spec_from(model: str | Path, dtype: str | None = None) -> ModelSpec:
    """The model spec of a preset name, a Hugging Face model folder or its config.json,
    computed from the config (``dtype``: as stored, unless given)."""
    text = str(model)
    if text in MODEL_CONFIGS:
        data, provenance = MODEL_CONFIGS[text]
        dtype = dtype or stored_dtype(data)
        return MoEConfig.from_hf_dict(data, source=f"preset {text}").to_model_spec(
            text, dtype=dtype, provenance=f"preset {text}: {provenance} ({dtype})")
    path = Path(resolve_path(text))
    if not path.exists():
        raise ConfigError(f"model {text!r}: not a preset ({', '.join(sorted(MODEL_CONFIGS))}) "
                          "and no such Hugging Face model folder or config.json")
    config, name, stored, file = read_model_config(path)
    dtype = dtype or stored
    return config.to_model_spec(name, dtype=dtype,
                                provenance=f"computed from {file} ({config.model_type}, {dtype})")


def _dtype_bytes(dtype: str) -> int:
    try:
        return _DTYPE_BYTES[dtype]
    except KeyError:
        raise UnknownNameError("dtype", dtype, _DTYPE_BYTES) from None

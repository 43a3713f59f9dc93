"""Hugging Face checkpoint folders <-> :class:`MoEModel`.

Reads ``config.json`` plus one or several ``*.safetensors`` files (``model.safetensors.index.json``
when sharded) lazily through ``safe_open``: one tensor in memory at a time, per-expert tensors
copied straight into their row of the stacked expert tensors. Accepted expert layouts:

* per expert, Mixtral: ``model.layers.{i}.block_sparse_moe.experts.{j}.w1|w3|w2.weight``
* per expert, Qwen2-MoE / OLMoE: ``model.layers.{i}.mlp.experts.{j}.gate_proj|up_proj|down_proj.weight``
* stacked (transformers' in-memory layout): ``model.layers.{i}.mlp.experts.gate_up_proj`` [E, 2F, H]
  and ``...experts.down_proj`` [E, H, F]

:func:`save_hf` writes the family's published per-expert layout, which transformers reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emoe.core.errors import ConfigError, EmoeError
from emoe.engine.config import MoEConfig
from emoe.engine.model import ExpertWeights, MoEModel

INDEX_FILE = "model.safetensors.index.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(EmoeError):
    """A checkpoint folder that cannot be loaded: names the file and the tensor key."""


def load_config(folder: str | Path) -> MoEConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a checkpoint folder needs config.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON: {exc}") from None
    return MoEConfig.from_hf_dict(data, source=str(path))


class _TensorReader:
    """Key -> file map over a folder's safetensors files, opened lazily."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._handles: dict[Path, Any] = {}
        self.used: set[str] = set()
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            self.key_file = {k: folder / f for k, f in weight_map.items()}
            for f in set(self.key_file.values()):
                if not f.is_file():
                    raise CheckpointError(f"{index}: lists {f.name}, which is missing from {folder}")
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{folder}: no *.safetensors files")
            self.key_file = {}
            for f in files:
                for k in self._open(f).keys():
                    self.key_file[k] = f

    def _open(self, path: Path) -> Any:
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error type for bad headers
                raise CheckpointError(f"{path}: unreadable safetensors file "
                                      f"(missing, truncated or corrupt): {exc}") from None
        return self._handles[path]

    def __contains__(self, key: str) -> bool:
        return key in self.key_file

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self.key_file[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        stored = self._open(self.key_file[key]).get_slice(key).get_dtype()
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)

    def get(self, key: str, shape: tuple[int, ...], field: str) -> torch.Tensor:
        path = self.key_file[key]
        actual = self.shape(key)
        if actual != shape:
            raise CheckpointError(f"{path.name}: tensor {key!r} has shape {list(actual)}, config.json "
                                  f"implies {list(shape)} (check {field})")
        try:
            tensor = self._open(path).get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} (truncated file?): {exc}") from None
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = ~torch.isfinite(tensor)
            first = [int(i) for i in bad.nonzero()[0]]
            raise CheckpointError(f"{path.name}: tensor {key!r} holds {int(bad.sum())} NaN or "
                                  f"infinite values (first at index {first}): a corrupt or "
                                  "diverged checkpoint")
        self.used.add(key)
        return tensor

    def first(self, *keys: str) -> str:
        for k in keys:
            if k in self.key_file:
                return k
        raise CheckpointError(f"{self.folder}: missing tensor {keys[0]!r}"
                              + (f" (also tried {', '.join(map(repr, keys[1:]))})" if keys[1:] else ""))

    def close(self) -> None:
        self._handles.clear()


def default_dtype(stored: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a checkpoint stored as ``stored`` computes in on ``device`` when none is asked.

    As stored, except half precision on the CPU, which is upcast to float32: exact, twice the
    weight memory, and about twice as fast here (float32 has the CPU kernels of
    :mod:`emoe.engine.cpu_kernels`; docs/engine.md).
    """
    if torch.device(device).type == "cpu" and stored in (torch.bfloat16, torch.float16):
        return torch.float32
    return stored


def load_model(folder: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | str | None = None) -> MoEModel:
    """Load a checkpoint folder into a :class:`MoEModel` on ``device``, computing in ``dtype``
    (None: :func:`default_dtype` of the stored one)."""
    folder = Path(folder)
    config = load_config(folder)
    reader = _TensorReader(folder)
    try:
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ConfigError(f"dtype: {dtype!r} is not supported; supported: {', '.join(_DTYPES)}")
            dtype = _DTYPES[dtype]
        if dtype is None:
            dtype = default_dtype(reader.dtype(reader.first("model.embed_tokens.weight")), device)
        with torch.device("meta"):
            model = MoEModel(config)
        model.to_empty(device=device).to(dtype)
        model.tie_weights()
        model.rotary.to(torch.float32).reset()
        with torch.no_grad():
            _load_into(model, config, reader)
        unused = sorted(k for k in reader.key_file if k not in reader.used and not k.endswith(_IGNORED_SUFFIXES))
        if unused:
            raise CheckpointError(f"{folder}: {len(unused)} tensors do not belong to a {config.model_type} "
                                  f"model of this config, e.g. {unused[:3]}")
    finally:
        reader.close()
    return model.eval()


def _load_into(model: MoEModel, c: MoEConfig, r: _TensorReader) -> None:
    h, f, e = c.hidden_size, c.intermediate_size, c.num_experts

    def put(param: torch.Tensor, key: str, field: str) -> None:
        param.copy_(r.get(key, tuple(param.shape), field))

    put(model.embed_tokens.weight, r.first("model.embed_tokens.weight"), "vocab_size, hidden_size")
    put(model.norm.weight, r.first("model.norm.weight"), "hidden_size")
    if not c.tie_word_embeddings:
        put(model.lm_head.weight, r.first("lm_head.weight"), "vocab_size, tie_word_embeddings")
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        put(layer.input_norm.weight, r.first(p + "input_layernorm.weight"), "hidden_size")
        put(layer.post_attn_norm.weight, r.first(p + "post_attention_layernorm.weight"), "hidden_size")
        attn = layer.attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            proj = getattr(attn, name)
            put(proj.weight, r.first(f"{p}self_attn.{name}.weight"), "num_heads, num_kv_heads, head_dim")
            if proj.bias is not None:
                put(proj.bias, r.first(f"{p}self_attn.{name}.bias"), "attention_bias")
        if attn.q_norm is not None:
            put(attn.q_norm.weight, r.first(p + "self_attn.q_norm.weight"), "num_heads, head_dim")
            put(attn.k_norm.weight, r.first(p + "self_attn.k_norm.weight"), "num_kv_heads, head_dim")
        moe = layer.moe
        put(moe.gate.weight, r.first(p + "block_sparse_moe.gate.weight", p + "mlp.gate.weight"), "num_experts")
        _load_experts(moe.experts, p, r, e, f, h)
        if moe.shared is not None:
            s = moe.shared
            for name in ("gate_proj", "up_proj", "down_proj"):
                put(getattr(s, name).weight, r.first(f"{p}mlp.shared_expert.{name}.weight"),
                    "shared_expert_intermediate_size")
            put(s.gate.weight, r.first(p + "mlp.shared_expert_gate.weight"), "shared_expert_intermediate_size")


def _load_experts(w: ExpertWeights, p: str, r: _TensorReader, e: int, f: int, h: int) -> None:
    field = "num_experts, intermediate_size (moe_intermediate_size), hidden_size"
    for block in ("block_sparse_moe", "mlp"):
        fused = f"{p}{block}.experts.gate_up_proj"
        if fused in r:
            gate_up = r.get(fused, (e, 2 * f, h), field)  # [E, 2F, H]
            w.w1.copy_(gate_up[:, :f])
            w.w3.copy_(gate_up[:, f:])
            w.w2.copy_(r.get(r.first(f"{p}{block}.experts.down_proj"), (e, h, f), field))
            return
    for j in range(e):
        mix, hf = f"{p}block_sparse_moe.experts.{j}.", f"{p}mlp.experts.{j}."
        w.w1[j].copy_(r.get(r.first(mix + "w1.weight", hf + "gate_proj.weight"), (f, h), field))
        w.w3[j].copy_(r.get(r.first(mix + "w3.weight", hf + "up_proj.weight"), (f, h), field))
        w.w2[j].copy_(r.get(r.first(mix + "w2.weight", hf + "down_proj.weight"), (h, f), field))


def state_dict_hf(model: MoEModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the published per-expert key names of its family."""
    c = model.config
    mixtral = c.model_type == "mixtral"
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed_tokens.weight,
                                    "model.norm.weight": model.norm.weight}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = layer.input_norm.weight
        out[p + "post_attention_layernorm.weight"] = layer.post_attn_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            proj = getattr(layer.attn, name)
            out[f"{p}self_attn.{name}.weight"] = proj.weight
            if proj.bias is not None:
                out[f"{p}self_attn.{name}.bias"] = proj.bias
        if layer.attn.q_norm is not None:
            out[p + "self_attn.q_norm.weight"] = layer.attn.q_norm.weight
            out[p + "self_attn.k_norm.weight"] = layer.attn.k_norm.weight
        moe, block = layer.moe, p + ("block_sparse_moe." if mixtral else "mlp.")
        out[block + "gate.weight"] = moe.gate.weight
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        for j in range(c.num_experts):
            for name, stacked in zip(names, (moe.experts.w1, moe.experts.w3, moe.experts.w2)):
                out[f"{block}experts.{j}.{name}.weight"] = stacked[j]
        if moe.shared is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[f"{p}mlp.shared_expert.{name}.weight"] = getattr(moe.shared, name).weight
            out[p + "mlp.shared_expert_gate.weight"] = moe.shared.gate.weight
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def save_hf(model: MoEModel, folder: str | Path, tokenizer: Any = None,
            max_shard_bytes: int = 2 << 30) -> Path:
    """Write config.json, safetensors shard(s) (+ index when sharded) and tokenizer.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = state_dict_hf(model)
    dtype = {v: k for k, v in _DTYPES.items()}[model.embed_tokens.weight.dtype]
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict(dtype), indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        if size and size + v.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for n, shard in enumerate(shards, 1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / name), metadata=meta)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.nbytes for v in tensors.values())
        (folder / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    if tokenizer is not None:  # emoe Tokenizer or a bare tokenizers.Tokenizer
        getattr(tokenizer, "inner", tokenizer).save(str(folder / "tokenizer.json"))
    return folder

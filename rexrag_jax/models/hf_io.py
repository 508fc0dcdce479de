"""HF checkpoints <-> Decoder: load sharded tensor by tensor, export a directory transformers loads.

Safetensors files are memory-mapped (we parse the 8-byte header + JSON index ourselves, which also gives
bf16 via ml_dtypes without torch). Loading never builds the model on one device: the module is created
abstractly, and each parameter is assembled with `jax.make_array_from_callback`, so every device only
receives its own slice of each tensor.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from rexrag_jax.jsonfile import write_json_atomic
from rexrag_jax.models.config import ModelConfig
from rexrag_jax.models.decoder import Decoder, layer_param_names
from rexrag_jax.models.weights import SAFETENSORS_FILE, SAFETENSORS_INDEX, SafetensorsFolder, write_safetensors
from rexrag_jax.sharding import named_sharding


def _same(w, c):
    return w


def _transpose(w, c):
    return w.T


def _proj_to_ours(heads: str) -> Callable:
    """HF projection `[heads*head_dim, hidden]` -> ours `[hidden, heads, head_dim]`."""
    return lambda w, c: w.T.reshape(c.hidden_size, getattr(c, heads), c.head_dim)


def _proj_to_hf(w, c):
    return w.reshape(c.hidden_size, -1).T


def _bias_to_ours(heads: str) -> Callable:
    return lambda w, c: w.reshape(getattr(c, heads), c.head_dim)


def _bias_to_hf(w, c):
    return w.reshape(-1)


# Our stacked parameter -> (HF per-layer tensor name, HF -> ours for one layer, ours -> HF for one layer).
_LAYER_MAP: dict[str, tuple[str, Callable, Callable]] = {
    "attn_norm": ("input_layernorm.weight", _same, _same),
    "q": ("self_attn.q_proj.weight", _proj_to_ours("num_heads"), _proj_to_hf),
    "k": ("self_attn.k_proj.weight", _proj_to_ours("num_kv_heads"), _proj_to_hf),
    "v": ("self_attn.v_proj.weight", _proj_to_ours("num_kv_heads"), _proj_to_hf),
    "q_bias": ("self_attn.q_proj.bias", _bias_to_ours("num_heads"), _bias_to_hf),
    "k_bias": ("self_attn.k_proj.bias", _bias_to_ours("num_kv_heads"), _bias_to_hf),
    "v_bias": ("self_attn.v_proj.bias", _bias_to_ours("num_kv_heads"), _bias_to_hf),
    "o": (
        "self_attn.o_proj.weight",
        lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
        lambda w, c: w.reshape(-1, c.hidden_size).T,
    ),
    "mlp_norm": ("post_attention_layernorm.weight", _same, _same),
    "gate": ("mlp.gate_proj.weight", _transpose, _transpose),
    "up": ("mlp.up_proj.weight", _transpose, _transpose),
    "down": ("mlp.down_proj.weight", _transpose, _transpose),
}
_GLOBAL_MAP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}


# ---------------------------------------------------------------------------- load


def _hf_tensors_for(name: str, config: ModelConfig) -> Iterator[tuple[str, Callable]]:
    if name in _GLOBAL_MAP:
        yield _GLOBAL_MAP[name], _same
        return
    hf, to_ours, _ = _LAYER_MAP[name]
    for i in range(config.num_layers):
        yield f"model.layers.{i}.{hf}", to_ours


def _host_param(weights: SafetensorsFolder, name: str, config: ModelConfig, shape, dtype) -> np.ndarray:
    """One of our parameters assembled on the host from its HF tensor(s), shape-checked."""
    pieces = []
    per_layer_shape = shape if name in _GLOBAL_MAP else shape[1:]
    for key, to_ours in _hf_tensors_for(name, config):
        if key not in weights:
            raise KeyError(f"tensor {key!r} is missing from the checkpoint (needed for {name})")
        arr = weights.get(key)
        expected = _expected_hf_shape(name, per_layer_shape, config)
        if tuple(arr.shape) != expected:
            raise ValueError(
                f"shape mismatch for tensor {key!r}: checkpoint has {tuple(arr.shape)}, config expects {expected}"
            )
        pieces.append(to_ours(arr, config))
    out = pieces[0] if name in _GLOBAL_MAP else np.stack(pieces)
    return out.astype(dtype, copy=False)


def _check_layer_count(weights: SafetensorsFolder, config: ModelConfig, path: str) -> None:
    layers = {int(m.group(1)) for k in weights.keys() if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if layers and max(layers) >= config.num_layers:
        raise ValueError(
            f"{path}: checkpoint has layer {max(layers)} but config.json says num_hidden_layers={config.num_layers}"
        )


def _expected_hf_shape(name: str, ours: tuple[int, ...], config: ModelConfig) -> tuple[int, ...]:
    if name in _GLOBAL_MAP:
        return tuple(ours)
    return tuple(_LAYER_MAP[name][2](np.empty(ours, np.int8), config).shape)


def load_hf(
    path: str, *, dtype: str = "float32", mesh: Mesh | None = None, attention: str = "auto"
) -> tuple[Decoder, ModelConfig]:
    """Load a HF Qwen2/Llama directory (config.json + safetensors) as a Decoder, sharded over `mesh`.

    `dtype` sets both storage and compute dtype ("bfloat16" on TPU, "float32" for CPU tests); `attention`
    the self-attention implementation (`ModelConfig.attention`, models/attention.py).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    config = ModelConfig.from_hf(path, param_dtype=dtype, dtype=dtype, attention=attention)
    weights = SafetensorsFolder(path)
    _check_layer_count(weights, config, path)
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), mesh=mesh))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    for keypath, var in tqdm(
        flat, desc=f"loading {os.path.basename(os.path.normpath(path))}", unit="tensor", leave=False, disable=None
    ):
        name = keypath[-1]
        spec = var.get_value()
        host = _host_param(weights, name, config, spec.shape, spec.dtype)
        if mesh is not None:
            sharding = named_sharding(mesh, var.get_metadata()["logical_axes"], spec.shape)
        else:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        var.set_value(jax.make_array_from_callback(spec.shape, sharding, lambda idx, h=host: np.asarray(h[idx])))
        del host
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), config


# ---------------------------------------------------------------------------- save


def save_hf(model: Decoder, config: ModelConfig, path: str, *, max_shard_bytes: int = 4 << 30) -> None:
    """Export `config.json`, `generation_config.json` and safetensors (sharded above `max_shard_bytes`)."""
    os.makedirs(path, exist_ok=True)
    state = nnx.state(model, nnx.Param)
    tensors: dict[str, np.ndarray] = {}
    for keypath, var in nnx.to_flat_state(state):
        name = keypath[-1]
        value = np.asarray(jax.device_get(var.get_value()))
        if name in _GLOBAL_MAP:
            tensors[_GLOBAL_MAP[name]] = value
            continue
        hf, _, to_hf = _LAYER_MAP[name]
        for i in range(config.num_layers):
            tensors[f"model.layers.{i}.{hf}"] = np.ascontiguousarray(to_hf(value[i], config))
    missing = {n for n in layer_param_names(config)} - {k[-1] for k, _ in nnx.to_flat_state(state)}
    if missing:
        raise ValueError(f"model has no parameters {sorted(missing)} required by its config")

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    if len(shards) == 1:
        write_safetensors(os.path.join(path, SAFETENSORS_FILE), shards[0])
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(path, name), shard)
            weight_map.update({k: name for k in shard})
        total = sum(t.nbytes for t in tensors.values())
        write_json_atomic(
            os.path.join(path, SAFETENSORS_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
    generation = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_id) if len(config.eos_token_id) != 1 else config.eos_token_id[0],
    }
    write_json_atomic(os.path.join(path, "generation_config.json"), generation)
    write_json_atomic(os.path.join(path, "config.json"), config.to_hf_dict())  # last: its presence marks completeness

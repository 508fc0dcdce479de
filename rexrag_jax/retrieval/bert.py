"""BERT encoder (the backbone of e5 / MiniLM dense retrievers) in Flax NNX, loadable from HF checkpoints.

Layer parameters are stacked on a leading "layers" axis and run under `lax.scan`, so compile time does
not grow with depth: the encoder compiles one program per padded length bucket, and e5-base (12 layers)
compiles about as fast as MiniLM (6). Dense weights are stored `[in, out]` (HF's `[out, in]` transposed).
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rexrag_jax.jsonfile import read_json
from rexrag_jax.models.weights import SAFETENSORS_FILE, SafetensorsFolder, init_param, write_safetensors

_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)
_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The subset of HF `BertConfig` the forward pass needs (frozen: it is part of the static graphdef)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float = 1e-12
    dtype: str = "float32"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_heads}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported; choose one of {_DTYPES}")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @classmethod
    def from_hf(cls, path: str, dtype: str = "float32") -> BertConfig:
        """Read `<path>/config.json`; anything this forward pass would silently get wrong is an error."""
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path} has no config.json (expected a HF BERT model directory)")
        hf = read_json(file)
        missing = [k for k in _REQUIRED if k not in hf]
        if missing:
            raise ValueError(f"{file}: missing {missing} (is this a BERT config?)")
        if hf.get("model_type", "bert") != "bert":
            raise ValueError(f"{file}: model_type {hf['model_type']!r} is not supported; expected 'bert'")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{file}: hidden_act {hf['hidden_act']!r} is not supported; expected 'gelu' (exact erf)")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"{file}: position_embedding_type {hf['position_embedding_type']!r} is not supported; "
                "expected 'absolute'"
            )
        try:
            ints = {k: int(hf[k]) for k in _REQUIRED}
            eps = float(hf.get("layer_norm_eps", 1e-12))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{file}: non-numeric size field ({e})") from e
        try:
            return cls(
                ints["vocab_size"],
                ints["hidden_size"],
                ints["num_hidden_layers"],
                ints["num_attention_heads"],
                ints["intermediate_size"],
                ints["max_position_embeddings"],
                ints["type_vocab_size"],
                eps,
                dtype,
            )
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from e


# ours -> (HF tensor name, shape, initialiser). Per-layer HF names sit under "encoder.layer.{i}.".
_EMBED_PARAMS = {
    "word": ("embeddings.word_embeddings.weight", lambda c: (c.vocab_size, c.hidden_size), "normal"),
    "position": (
        "embeddings.position_embeddings.weight",
        lambda c: (c.max_position_embeddings, c.hidden_size),
        "normal",
    ),
    "token_type": ("embeddings.token_type_embeddings.weight", lambda c: (c.type_vocab_size, c.hidden_size), "normal"),
    "embed_ln_scale": ("embeddings.LayerNorm.weight", lambda c: (c.hidden_size,), "ones"),
    "embed_ln_bias": ("embeddings.LayerNorm.bias", lambda c: (c.hidden_size,), "zeros"),
}
_D = lambda c: (c.hidden_size,)
_DD = lambda c: (c.hidden_size, c.hidden_size)
_LAYER_PARAMS = {
    "query": ("attention.self.query.weight", _DD, "normal"),
    "query_bias": ("attention.self.query.bias", _D, "zeros"),
    "key": ("attention.self.key.weight", _DD, "normal"),
    "key_bias": ("attention.self.key.bias", _D, "zeros"),
    "value": ("attention.self.value.weight", _DD, "normal"),
    "value_bias": ("attention.self.value.bias", _D, "zeros"),
    "attn_out": ("attention.output.dense.weight", _DD, "normal"),
    "attn_out_bias": ("attention.output.dense.bias", _D, "zeros"),
    "attn_ln_scale": ("attention.output.LayerNorm.weight", _D, "ones"),
    "attn_ln_bias": ("attention.output.LayerNorm.bias", _D, "zeros"),
    "mlp_in": ("intermediate.dense.weight", lambda c: (c.hidden_size, c.intermediate_size), "normal"),
    "mlp_in_bias": ("intermediate.dense.bias", lambda c: (c.intermediate_size,), "zeros"),
    "mlp_out": ("output.dense.weight", lambda c: (c.intermediate_size, c.hidden_size), "normal"),
    "mlp_out_bias": ("output.dense.bias", _D, "zeros"),
    "mlp_ln_scale": ("output.LayerNorm.weight", _D, "ones"),
    "mlp_ln_bias": ("output.LayerNorm.bias", _D, "zeros"),
}
# Tensors a BERT checkpoint may carry that an encoder does not use.
_IGNORED = re.compile(r"^(bert\.)?(pooler\.|embeddings\.position_ids$)|^cls\.")


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm computed in fp32 whatever the activation dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def _encoder_layer(config: BertConfig, h: jax.Array, mask: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    """One post-LN BERT layer: self-attention over non-padding keys, then an exact-GELU MLP."""
    b, t, d = h.shape
    dt = config.compute_dtype

    def dense(x, name):
        return x @ p[name].astype(dt) + p[f"{name}_bias"].astype(dt)

    q, k, v = (dense(h, n).reshape(b, t, config.num_heads, d // config.num_heads) for n in ("query", "key", "value"))
    attn = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], implementation="xla")
    h = layer_norm(
        h + dense(attn.reshape(b, t, d), "attn_out"), p["attn_ln_scale"], p["attn_ln_bias"], config.layer_norm_eps
    )
    x = jax.nn.gelu(dense(h, "mlp_in"), approximate=False)
    return layer_norm(h + dense(x, "mlp_out"), p["mlp_ln_scale"], p["mlp_ln_bias"], config.layer_norm_eps)


class BertModel(nnx.Module):
    """BERT without pooler: `(input_ids, attention_mask) [B, T]` -> last hidden states `[B, T, hidden]`."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        for name, (_, shape_fn, kind) in _EMBED_PARAMS.items():
            setattr(self, name, nnx.Param(init_param(kind, rngs.params(), shape_fn(config), config.compute_dtype)))
        for name, (_, shape_fn, kind) in _LAYER_PARAMS.items():
            shape = (config.num_layers, *shape_fn(config))
            setattr(self, name, nnx.Param(init_param(kind, rngs.params(), shape, config.compute_dtype)))

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        c = self.config
        t = input_ids.shape[1]
        if t > c.max_position_embeddings:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings {c.max_position_embeddings}")
        h = self.word[...][input_ids] + self.position[...][:t][None] + self.token_type[...][0]
        h = layer_norm(h, self.embed_ln_scale[...], self.embed_ln_bias[...], c.layer_norm_eps).astype(c.compute_dtype)
        mask = attention_mask.astype(bool)
        layers = {name: getattr(self, name)[...] for name in _LAYER_PARAMS}
        h, _ = jax.lax.scan(lambda h, p: (_encoder_layer(c, h, mask, p), None), h, layers)
        return h


# ---------------------------------------------------------------------------- HF checkpoint -> BertModel


def _prefix(weights: SafetensorsFolder, path: str) -> str:
    """ "" for a bare `BertModel` checkpoint, "bert." for one saved from a task head (BertForX)."""
    for prefix in ("", "bert."):
        if f"{prefix}embeddings.word_embeddings.weight" in weights:
            return prefix
    sample = sorted(weights.keys())[:5]
    raise ValueError(
        f"{path}: not a BERT checkpoint: no 'embeddings.word_embeddings.weight' (with or without "
        f"'bert.' prefix); first tensors are {sample}"
    )


def _check_keys(weights: SafetensorsFolder, prefix: str, config: BertConfig, path: str) -> None:
    """Unknown tensors mean a layout we would silently misread (other architecture, more layers)."""
    known = {prefix + hf for hf, _, _ in _EMBED_PARAMS.values()}
    known |= {
        f"{prefix}encoder.layer.{i}.{hf}" for i in range(config.num_layers) for hf, _, _ in _LAYER_PARAMS.values()
    }
    unknown = sorted(k for k in weights.keys() if k not in known and not _IGNORED.match(k))
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} unexpected tensors for a {config.num_layers}-layer BERT "
            f"(config.json says num_hidden_layers={config.num_layers}), e.g. {unknown[:3]}"
        )


def _host_param(weights: SafetensorsFolder, name: str, prefix: str, config: BertConfig) -> np.ndarray:
    """One of our parameters assembled on the host from its HF tensor(s), shape-checked."""
    if name in _EMBED_PARAMS:
        hf, shape_fn, _ = _EMBED_PARAMS[name]
        keys = [prefix + hf]
    else:
        hf, shape_fn, _ = _LAYER_PARAMS[name]
        keys = [f"{prefix}encoder.layer.{i}.{hf}" for i in range(config.num_layers)]
    ours = shape_fn(config)
    transpose = name in _LAYER_PARAMS and len(ours) == 2
    expected = ours[::-1] if transpose else ours
    pieces = []
    for key in keys:
        if key not in weights:
            raise KeyError(f"tensor {key!r} is missing from the checkpoint")
        if weights.shape(key) != tuple(expected):
            raise ValueError(
                f"shape mismatch for tensor {key!r}: checkpoint has {weights.shape(key)}, "
                f"config.json implies {tuple(expected)}"
            )
        arr = weights.get(key)
        pieces.append(arr.T if transpose else arr)
    out = pieces[0] if name in _EMBED_PARAMS else np.stack(pieces)
    return np.asarray(out, dtype=config.compute_dtype)


def load_bert(path: str, *, dtype: str = "float32", sharding: jax.sharding.Sharding | None = None) -> BertModel:
    """Load a HF BERT directory (config.json + safetensors); every parameter is placed with `sharding`.

    Parameters go straight from the memory-mapped file to the device; the model is never initialised randomly.
    """
    config = BertConfig.from_hf(path, dtype=dtype)
    weights = SafetensorsFolder(path)
    prefix = _prefix(weights, path)
    _check_keys(weights, prefix, config, path)
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: BertModel(config, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(state)
    for keypath, var in flat:
        var.set_value(jax.device_put(_host_param(weights, keypath[-1], prefix, config), sharding))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_bert(model: BertModel, path: str) -> None:
    """Write `model`'s weights as `<path>/model.safetensors` in HF BERT naming (the inverse of `load_bert`).

    Weights only: config.json and the tokenizer files come from the encoder whose shape it has. The
    accelerator benchmark uses this to stand in a random MiniLM-shaped encoder where the real one is too
    large to carry.
    """
    tensors = {}
    for name, (hf, _, _) in _EMBED_PARAMS.items():
        tensors[hf] = np.asarray(jax.device_get(getattr(model, name)[...]))
    for name, (hf, _, _) in _LAYER_PARAMS.items():
        stacked = np.asarray(jax.device_get(getattr(model, name)[...]))
        for i, value in enumerate(stacked):
            tensors[f"encoder.layer.{i}.{hf}"] = np.ascontiguousarray(value.T if value.ndim == 2 else value)
    write_safetensors(os.path.join(path, SAFETENSORS_FILE), tensors)

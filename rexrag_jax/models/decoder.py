"""Qwen2 / Qwen2.5 / Llama decoder in Flax NNX with scanned layers and a paged KV cache.

Parameters of all layers are stacked on a leading "layers" axis and the layer body runs under
`lax.scan` + `jax.checkpoint`, so compile time does not grow with depth and activation memory follows
the remat policy. Attention implementations (XLA, cuDNN, Pallas splash) live in `models/attention.py`.
Two entry points share the layer math:

* `Decoder.__call__` / `forward`: right-padded `[B, T]` ids (training, log-probs), positions follow the mask.
* `Decoder.extend`: appends a chunk of tokens to each row's KV cache (`models/kv_cache.py`) at that row's
  own offset (prompt prefill, decode steps, retrieved text); rows advance independently and attend only to
  their prefix, read through the row's page table.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from rexrag_jax.models.attention import (
    cached_attention,
    causal_self_attention,
    paged_decode_attention,
    resolve_decode_attention,
)
from rexrag_jax.models.config import ModelConfig
from rexrag_jax.models.kv_cache import KVCache, read_layer, read_span, write_layer
from rexrag_jax.models.weights import init_param
from rexrag_jax.sharding import constrain, state_shardings

# name -> (shape builder, logical axes, initialiser) for the per-layer parameters (stacked on axis 0).
_LAYER_PARAMS = {
    "attn_norm": (lambda c: (c.hidden_size,), ("norm",), "ones"),
    "q": (lambda c: (c.hidden_size, c.num_heads, c.head_dim), ("embed", "q_heads", "head_dim"), "normal"),
    "k": (lambda c: (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "normal"),
    "v": (lambda c: (c.hidden_size, c.num_kv_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), "normal"),
    "q_bias": (lambda c: (c.num_heads, c.head_dim), ("q_heads", "head_dim"), "zeros"),
    "k_bias": (lambda c: (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), "zeros"),
    "v_bias": (lambda c: (c.num_kv_heads, c.head_dim), ("kv_heads", "head_dim"), "zeros"),
    "o": (lambda c: (c.num_heads, c.head_dim, c.hidden_size), ("q_heads", "head_dim", "embed"), "normal"),
    "mlp_norm": (lambda c: (c.hidden_size,), ("norm",), "ones"),
    "gate": (lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), "normal"),
    "up": (lambda c: (c.hidden_size, c.intermediate_size), ("embed", "mlp"), "normal"),
    "down": (lambda c: (c.intermediate_size, c.hidden_size), ("mlp", "embed"), "normal"),
}
_BIASES = ("q_bias", "k_bias", "v_bias")
_REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_param_names(config: ModelConfig) -> tuple[str, ...]:
    return tuple(n for n in _LAYER_PARAMS if config.attention_bias or n not in _BIASES)


class DecoderLayers(nnx.Module):
    """All decoder layers' parameters, stacked on a leading axis of size `num_layers`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        for name in layer_param_names(config):
            shape_fn, axes, kind = _LAYER_PARAMS[name]
            shape = (config.num_layers, *shape_fn(config))
            value = init_param(kind, rngs.params(), shape, config.storage_dtype)
            setattr(self, name, nnx.Param(value, logical_axes=("layers", *axes)))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in vars(self) if isinstance(getattr(self, name), nnx.Param)}


# ---------------------------------------------------------------------------- pure layer math


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies `[head_dim // 2]`, with linear or Llama-3 scaling as transformers does."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = dict(config.rope_scaling)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_table(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """fp32 (cos, sin) `[B, T, 1, head_dim // 2]` for integer `positions [B, T]`; shared by all layers."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(config))
    return jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]


def apply_rope(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate-half RoPE on `x [B, T, N, D]` with a `rope_table`, computed in fp32."""
    cos, sin = rope
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def _project_qkv(config: ModelConfig, mesh, x, p, rope):
    dt = config.compute_dtype
    q = jnp.einsum("btd,dhk->bthk", x, p["q"].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x, p["k"].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x, p["v"].astype(dt))
    if config.attention_bias:
        q, k, v = q + p["q_bias"].astype(dt), k + p["k_bias"].astype(dt), v + p["v_bias"].astype(dt)
    q = constrain(apply_rope(q, rope), ("batch", "length", "act_heads", "head_dim"), mesh)
    k = constrain(apply_rope(k, rope), ("batch", "length", "act_kv_heads", "head_dim"), mesh)
    v = constrain(v, ("batch", "length", "act_kv_heads", "head_dim"), mesh)
    return q, k, v


def _finish_layer(config: ModelConfig, mesh, h, attn_out, p):
    dt = config.compute_dtype
    h = h + jnp.einsum("bthk,hkd->btd", attn_out, p["o"].astype(dt))
    h = constrain(h, ("batch", "length", "act_embed"), mesh)
    x = rms_norm(h, p["mlp_norm"], config.rms_norm_eps)
    gate = jnp.einsum("btd,df->btf", x, p["gate"].astype(dt))
    up = jnp.einsum("btd,df->btf", x, p["up"].astype(dt))
    act = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"), mesh)
    h = h + jnp.einsum("btf,fd->btd", act, p["down"].astype(dt))
    return constrain(h, ("batch", "length", "act_embed"), mesh)


# ---------------------------------------------------------------------------- the model


class Decoder(nnx.Module):
    """Causal LM: embeddings, scanned decoder layers, final RMSNorm, tied or separate LM head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
        self.config = config
        self.mesh = mesh
        embed_shape = (config.vocab_size, config.hidden_size)
        self.embed = nnx.Param(
            init_param("normal", rngs.params(), embed_shape, config.storage_dtype), logical_axes=("vocab", "embed")
        )
        self.layers = DecoderLayers(config, rngs=rngs)
        self.final_norm = nnx.Param(jnp.ones((config.hidden_size,), config.storage_dtype), logical_axes=("norm",))
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Param(
                init_param("normal", rngs.params(), embed_shape, config.storage_dtype), logical_axes=("vocab", "embed")
            )

    def _embed(self, tokens: jax.Array) -> jax.Array:
        # Gather the table just in time (as FSDP does for every weight): a lookup into a vocab-sharded
        # table would otherwise force XLA into a full rematerialisation.
        table = constrain(self.embed[...], (None, None), self.mesh)
        h = jnp.take(table, tokens, axis=0).astype(self.config.compute_dtype)
        return constrain(h, ("batch", "length", "act_embed"), self.mesh)

    def head_weight(self) -> jax.Array:
        """`[vocab, hidden]` output projection (the embedding when tied)."""
        return self.embed[...] if self.config.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits for final hidden states `[..., hidden]`."""
        w = self.head_weight().astype(self.config.compute_dtype)
        out = jnp.einsum("...d,vd->...v", hidden, w, preferred_element_type=jnp.float32)
        return constrain(out, ("batch", "length", "act_vocab"), self.mesh) if out.ndim == 3 else out

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Final-norm hidden states `[B, T, hidden]` for right-padded ids; padding keys are masked."""
        cfg, mesh = self.config, self.mesh
        input_ids = constrain(input_ids, ("batch", "length"), mesh)
        valid = constrain(attention_mask.astype(bool), ("batch", "length"), mesh)
        positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)
        rope = rope_table(cfg, positions)

        def layer(h, p):
            x = rms_norm(h, p["attn_norm"], cfg.rms_norm_eps)
            q, k, v = _project_qkv(cfg, mesh, x, p, rope)
            out = causal_self_attention(q, k, v, valid, implementation=cfg.attention, mesh=mesh)
            return _finish_layer(cfg, mesh, h, out, p), None

        policy = _REMAT[cfg.remat]
        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
        h, _ = jax.lax.scan(layer, self._embed(input_ids), self.layers.arrays())
        return rms_norm(h, self.final_norm[...], cfg.rms_norm_eps)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        return self.logits(self.hidden_states(input_ids, attention_mask))

    def extend(
        self, cache: KVCache, tokens: jax.Array, num_new: jax.Array, window: int | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Append `tokens[b, :num_new[b]]` to row b's cache; returns hidden states `[B, T, hidden]`.

        Token t of row b gets position `cache.lengths[b] + t` and attends to the row's cached prefix and
        its own earlier new tokens. Tokens past `num_new[b]` (padding) are not written; their outputs are
        meaningless. Rows with `num_new == 0` are untouched. Writes past the cache end are dropped, so the
        caller must keep `lengths + num_new <= max_length`. With a static `window`, attention reads only
        the first `window` cache slots (decoding is bound by reading the cache: short rows in a long
        cache need not pay for its full length); the caller keeps `lengths + num_new <= window`.
        """
        cfg, mesh = self.config, self.mesh
        b, t = tokens.shape
        window = cache.max_length if window is None else min(window, cache.max_length)
        num_new = num_new.astype(jnp.int32)
        offsets = jnp.arange(t, dtype=jnp.int32)[None]
        positions = cache.lengths[:, None] + offsets  # [B, T]
        slots = jnp.where(offsets < num_new[:, None], positions, cache.max_length)  # out of range -> dropped
        mask = jnp.arange(read_span(window, cache.page_size))[None, None, :] <= positions[:, :, None]  # [B, T, slots]
        rope = rope_table(cfg, positions)
        # One new token per row (a decode step): a Pallas paged-attention kernel may read the pages in place.
        probe = jax.ShapeDtypeStruct((b, t, cfg.num_heads, cfg.head_dim), jnp.dtype(cfg.compute_dtype))
        kernel = resolve_decode_attention(cfg.attention, probe) if t == 1 else "xla"

        def layer(carry, xs):
            h, k_cache, v_cache = carry
            p, i = xs
            x = rms_norm(h, p["attn_norm"], cfg.rms_norm_eps)
            q, k, v = _project_qkv(cfg, mesh, x, p, rope)
            k_cache = write_layer(k_cache, i, cache.table, slots, k)
            v_cache = write_layer(v_cache, i, cache.table, slots, v)
            if kernel != "xla":
                lengths = positions[:, 0] + 1
                out = paged_decode_attention(q, k_cache, v_cache, cache.table, lengths, i, kernel=kernel, mesh=mesh)
            else:
                keys, values = (read_layer(c, i, cache.table, window).astype(q.dtype) for c in (k_cache, v_cache))
                out = cached_attention(q, keys, values, mask)
            return (_finish_layer(cfg, mesh, h, out, p), k_cache, v_cache), None

        xs = (self.layers.arrays(), jnp.arange(cfg.num_layers))
        (h, k_cache, v_cache), _ = jax.lax.scan(layer, (self._embed(tokens), cache.k, cache.v), xs)
        new_cache = cache.replace(k=k_cache, v=v_cache, lengths=cache.lengths + num_new)
        return rms_norm(h, self.final_norm[...], cfg.rms_norm_eps), new_cache


# ---------------------------------------------------------------------------- construction and entry points


def init_model(config: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None) -> Decoder:
    """A randomly initialised decoder; with a mesh, each parameter is created directly in its sharding."""

    def create() -> Decoder:
        # The "rbg" generator compiles ~4x faster than threefry on CPU; init values only need to be seeded.
        return Decoder(config, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg")), mesh=mesh)

    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    shardings = state_shardings(abstract, mesh) if mesh is not None else None
    state = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()  # jitted: eager init is slow
    return nnx.merge(graphdef, state)


def abstract_model(config: ModelConfig, mesh: Mesh | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of ShapeDtypeStructs carrying each parameter's sharding): a restore target that
    allocates nothing."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0), mesh=mesh)))
    if mesh is None:
        return graphdef, abstract
    shardings = state_shardings(abstract, mesh)
    return graphdef, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, input_ids, attention_mask):
    return nnx.merge(graphdef, state)(input_ids, attention_mask)


def forward(model: Decoder, input_ids, attention_mask=None) -> jax.Array:
    """Logits `[B, T, V]` (fp32) for right-padded int32 ids; positions follow the attention mask."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, bool)
    attention_mask = jnp.asarray(attention_mask).astype(bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, input_ids, attention_mask)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _extend(graphdef, state, cache, tokens, num_new):
    model = nnx.merge(graphdef, state)
    hidden, cache = model.extend(cache, tokens, num_new)
    last = jnp.clip(num_new - 1, 0, tokens.shape[1] - 1)
    return model.logits(hidden[jnp.arange(tokens.shape[0]), last]), cache


def extend(model: Decoder, cache: KVCache, tokens, num_new) -> tuple[jax.Array, KVCache]:
    """Jitted `Decoder.extend` (cache donated) returning fp32 logits of each row's last new token `[B, V]`."""
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(tokens, jnp.int32)
    return _extend(graphdef, state, cache, tokens, jnp.asarray(num_new, jnp.int32))

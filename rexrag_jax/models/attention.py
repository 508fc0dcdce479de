"""Attention implementations of the decoder, and the choice between them.

- "xla": `jax.nn.dot_product_attention` with an explicit mask; materialises `[B, H, T, S]` fp32 scores.
  Runs everywhere and is the reference the others are tested against.
- "cudnn": cuDNN's fused flash attention (GPU, 16-bit compute).
- "splash": JAX's Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), the TPU
  flash kernel: block-sparse causal attention that never materialises the scores. Off TPU it runs in
  Pallas interpret mode (slow, exact: how the CPU tests check it).
- "auto": splash on TPU and cuDNN on GPU with 16-bit compute, else XLA.

Decoding attends over the paged KV cache (`models/kv_cache.py`): a decode step (one new token per row)
with JAX's Pallas paged-attention kernels, which read the pages in place (`paged_decode_attention`: the
TPU kernel with "splash", the GPU kernel with "cudnn", the platform's with "auto" and 16-bit compute);
otherwise, and for prefill chunks, XLA's `cached_attention` over the pages gathered through the table.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from rexrag_jax.models.config import ATTENTION_IMPLEMENTATIONS
from rexrag_jax.models.kv_cache import layer_pages
from rexrag_jax.sharding import logical_to_spec

SPLASH_BLOCK = 128  # sequence tile of the splash kernel (a multiple of the TPU's 128 lanes)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """GQA attention (KV heads are not repeated): q `[B,T,H,D]`, k/v `[B,S,K,D]`, mask `[B,T,S]` (True = attend).

    `jax.nn.dot_product_attention` computes scores and softmax in fp32; a query row with nothing to
    attend to gets finite garbage, never NaN.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
    """`attention` over head-major cached keys/values `[B, K, S, D]` (as `kv_cache.read_layer` gives them):
    q `[B, T, H, D]`, mask `[B, T, S]`. fp32 scores and softmax, probabilities in the values' dtype, as
    `jax.nn.dot_product_attention` computes them."""
    b, t, h, d = q.shape
    k = keys.shape[1]
    q = q.reshape(b, t, k, h // k, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, keys, preferred_element_type=jnp.float32) * (d**-0.5)
    scores = jnp.where(mask[:, None, None], scores, -0.7 * float(jnp.finfo(jnp.float32).max))
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, values).reshape(b, t, h, d)


def fused_attention_ok(q: jax.Array) -> bool:
    """Whether cuDNN's fused (flash) attention takes these queries: a GPU, 16-bit compute and a head dim
    it supports."""
    return (
        jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] <= 128
        and q.shape[-1] % 8 == 0
    )


def resolve_attention(choice: str, q: jax.Array) -> str:
    """The implementation `choice` ("auto" | "xla" | "cudnn" | "splash") means for queries `q` here."""
    if choice not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention={choice!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")
    sixteen_bit = q.dtype in (jnp.bfloat16, jnp.float16)
    if choice == "auto":
        if jax.default_backend() == "tpu" and sixteen_bit:
            return "splash"
        return "cudnn" if fused_attention_ok(q) else "xla"
    if choice == "cudnn" and not fused_attention_ok(q):
        raise ValueError(
            f"attention='cudnn' needs a GPU, 16-bit compute and a head dim <= 128 divisible by 8; have backend "
            f"{jax.default_backend()!r}, dtype {q.dtype}, head dim {q.shape[-1]} (use 'auto' or 'xla')"
        )
    return choice


def causal_self_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    valid: jax.Array,
    *,
    implementation: str = "auto",
    mesh: Mesh | None = None,
) -> jax.Array:
    """Causal self-attention of right-padded rows: q `[B,T,H,D]`, k/v `[B,T,K,D]`, `valid` `[B,T]`.

    Every query attends to the valid keys at or before its position. The XLA and splash paths give every
    position that value, padding included; cuDNN's gives it for real tokens only (it takes the causal mask
    alone: a real token's earlier keys are all real), and nothing reads padding positions.
    """
    impl = resolve_attention(implementation, q)
    if impl == "splash":
        return splash_causal_attention(q, k, v, valid, mesh=mesh)
    if impl == "cudnn":
        # The cuDNN training kernels need an even length: one more (causally invisible) position.
        t = q.shape[1]
        if t % 2:
            q, k, v = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (q, k, v))
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")[:, :t]
    t = q.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None] & valid[:, None, :]
    return attention(q, k, v, mask)


# ---------------------------------------------------------------------------- splash


def _splash_kernel(num_heads: int, length: int, interpret: bool):
    """The splash kernel for one example `[heads, length, head_dim]` with the causal mask. Built while
    tracing (the mask's block structure is computed on the host and becomes constants of the program), so
    it is not cached across traces."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    block = max(b for b in (512, 256, SPLASH_BLOCK) if length % b == 0)
    mask = masks.MultiHeadMask([masks.CausalMask((length, length))] * num_heads)
    blocks = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_local(q, k, v, kv_segments):
    """Per shard: q `[b,T,h,D]`, k/v `[b,T,kh,D]`, kv_segments `[b,T]` -> `[b,T,h,D]`."""
    b, t, h, d = q.shape
    kernel = _splash_kernel(h, t, jax.default_backend() != "tpu")
    to_heads = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # [b,T,h,D] <-> [b,h,T,D]
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    # Queries all in segment 1, keys in 1 when valid: each query sees the valid keys before it (the
    # causal mask does the rest), exactly the XLA path's mask.
    segments = SegmentIds(q=jnp.ones((b, t), jnp.int32), kv=kv_segments)
    out = jax.vmap(kernel)(to_heads(q * (d**-0.5)), to_heads(k), to_heads(v), segment_ids=segments)
    return to_heads(out)


def splash_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, *, mesh: Mesh | None = None
) -> jax.Array:
    """`causal_self_attention` with the splash kernel, over `mesh` by `shard_map`: rows split like the
    "batch" activations (data, fsdp), heads like "act_heads" (tensor). Lengths are padded to the kernel's
    tile; padded keys are invalid, padded queries dropped."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    pad = -t % SPLASH_BLOCK
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    kv_segments = valid.astype(jnp.int32)
    if mesh is None:
        return _splash_local(q, k, v, kv_segments)[:, :t]
    row_axes = logical_to_spec(("batch",), (b,), mesh)
    rows = row_axes[0] if len(row_axes) else None
    head_axes = logical_to_spec((None, None, "act_heads"), (b, t + pad, h), mesh)
    heads = head_axes[2] if len(head_axes) > 2 else None
    if heads is not None and kh % int(np.prod([mesh.shape[a] for a in np.atleast_1d(heads)])):
        # The KV heads do not split like the query heads (e.g. 2 KV heads on a tensor axis of 4): each
        # query head gets its own copy, so that every shard holds the KV heads its queries use.
        k, v = (jnp.repeat(x, h // kh, axis=2) for x in (k, v))
    qkv_spec = PartitionSpec(rows, None, heads, None)
    fn = jax.shard_map(
        _splash_local,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, PartitionSpec(rows, None)),
        out_specs=qkv_spec,
        check_vma=False,
    )
    return fn(q, k, v, kv_segments)[:, :t]


# ---------------------------------------------------------------------------- paged decode


# The Pallas paged-attention kernels by `resolve_decode_attention`'s names. jax 0.11 marks the GPU one (a
# Triton kernel, like every `pallas.ops.gpu` op but the Mosaic GPU `*_mgpu` ones) deprecated.
DECODE_KERNELS = {
    "tpu": "jax.experimental.pallas.ops.tpu.paged_attention",
    "gpu": "jax.experimental.pallas.ops.gpu.paged_attention",
}


@functools.cache
def decode_kernel_available(kernel: str) -> bool:
    """Whether this jax ships the Pallas paged-attention module `DECODE_KERNELS[kernel]` (not imported)."""
    import importlib.util

    try:
        return importlib.util.find_spec(DECODE_KERNELS[kernel]) is not None
    except ImportError:  # a parent package is gone
        return False


def resolve_decode_attention(choice: str, q: jax.Array) -> str:
    """How one decode step (one query per row) attends over the paged cache, for `ModelConfig.attention`
    = `choice`: "tpu" (Pallas `tpu.paged_attention`), "gpu" (Pallas `gpu.paged_attention`) or "xla".
    "auto" takes the platform's kernel with 16-bit compute (the TPU kernel reads K/V as bfloat16), or XLA
    where this jax no longer ships it; "splash" means the TPU kernel, "cudnn" the GPU one, either in Pallas
    interpret mode off its platform, and an error where this jax lacks it."""
    auto = choice == "auto"
    if auto:
        choice = resolve_attention(choice, q)
    kernel = {"splash": "tpu", "cudnn": "gpu"}.get(choice, "xla")
    if kernel != "xla" and not decode_kernel_available(kernel):
        if auto:
            return "xla"
        raise ValueError(
            f"attention={choice!r} decodes with {DECODE_KERNELS[kernel]}, which jax {jax.__version__} does not "
            "ship; use 'auto' (XLA decode attention here) or 'xla'"
        )
    return kernel


def _padded_table(table: jax.Array, multiple: int) -> jax.Array:
    """Page table columns padded to a multiple (pad entries point at page 0: never read, past the lengths)."""
    pad = -table.shape[1] % multiple
    return jnp.pad(table, ((0, 0), (0, pad))) if pad else table


def _paged_local(q, k_pages, v_pages, table, lengths, layer, *, kernel: str):
    """Per row shard: q `[b, H, D]`, pages `[K, L, P, ps, D]` (read as `[K, L * P, ps, D]`, in place), table
    `[b, max_pages]` of per-layer page ids, lengths `[b]` -> `[b, H, D]`."""
    k, layers, p, ps, d = k_pages.shape
    k_flat, v_flat = (x.reshape(k, layers * p, ps, d) for x in (k_pages, v_pages))
    pages = jnp.maximum(layer_pages(table, layer, p), 0)  # a released row's NO_PAGE entries: any valid page
    q = q * jnp.asarray(d**-0.5, q.dtype)
    per_block = max(1, min(8, 128 // ps))  # pages per compute block: 128-token blocks
    if kernel == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

        pages = _padded_table(pages, per_block)
        interpret = jax.default_backend() != "tpu"
        with pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext():
            return paged_attention(q, k_flat, v_flat, lengths, pages, pages_per_compute_block=per_block)
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    splits = max(1, min(16, pages.shape[1] // per_block))
    pages = _padded_table(pages, splits * per_block)
    return paged_attention(
        q,
        k_flat,
        v_flat,
        pages,
        lengths,
        pages_per_compute_block=per_block,
        k_splits=splits,
        interpret=jax.default_backend() != "gpu",
    )


def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    table: jax.Array,
    lengths: jax.Array,
    layer: jax.Array,
    *,
    kernel: str,
    mesh: Mesh | None = None,
) -> jax.Array:
    """One query per row over the paged cache with JAX's Pallas paged-attention kernel ("tpu" | "gpu"):
    q `[B, 1, H, D]`, pages in the `models/kv_cache.py` layout, `table [B, max_pages]`, `lengths[b]` keys
    of row b (its new token included, >= 1). Reads the pages in place (no gather into a contiguous copy).
    Over `mesh` by `shard_map`: rows and pages split like the "batch" axes, KV heads like the tensor axis
    (query heads replicated when the KV heads do not split, e.g. 2 KV heads on a tensor axis of 4)."""
    lengths = lengths.astype(jnp.int32)
    b, _, h, d = q.shape
    if mesh is None:  # every shard's rows over its pages
        shards = k_pages.shape[0]
        split = lambda x: x.reshape(shards, b // shards, *x.shape[1:])
        fn = jax.vmap(functools.partial(_paged_local, kernel=kernel), in_axes=(0, 0, 0, 0, 0, None))
        return fn(split(q[:, 0]), k_pages, v_pages, split(table), split(lengths), layer).reshape(b, 1, h, d)

    def fn(q, k_pages, v_pages, table, lengths, layer):  # one shard: pages [1, K, L, P, ps, D]
        return _paged_local(q, k_pages[0], v_pages[0], table, lengths, layer, kernel=kernel)

    row_axes = logical_to_spec(("batch",), (b,), mesh)
    rows = row_axes[0] if len(row_axes) else None
    kv_axes = logical_to_spec((None, "act_kv_heads"), k_pages.shape[:2], mesh)
    heads = kv_axes[1] if len(kv_axes) > 1 else None
    page_spec = PartitionSpec(rows, heads)
    out = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(
            PartitionSpec(rows, heads),
            page_spec,
            page_spec,
            PartitionSpec(rows),
            PartitionSpec(rows),
            PartitionSpec(),
        ),
        out_specs=PartitionSpec(rows, heads),
        check_vma=False,
    )(q[:, 0], k_pages, v_pages, table, lengths, layer)
    return out[:, None]

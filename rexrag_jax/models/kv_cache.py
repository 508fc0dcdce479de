"""The decoder's KV cache: fixed-size pages read and written through a per-row page table.

Why pages: a contiguous cache reserves `rows x max_length` slots, while most trajectories end far shorter
and the G rows of a group start from the same prompt. With pages a row holds only the pages it fills, and
rows can share pages (host-side allocator: `rollout/pages.py`). A contiguous cache is the special case of
one page of `max_length` slots per row with an identity table, which is what `init_cache` builds unless
asked for smaller pages.

Layout: k/v `[layers, shards, kv_heads, pages, page_size, head_dim]`.
- Head-major pages (`[kv_heads, pages, page_size, head_dim]` per layer and shard) are what JAX's paged
  decode kernels (TPU and GPU `paged_attention`) read in place.
- `shards` is the number of row shards of the mesh (the "batch" axes). Rows sharded over the mesh own the
  pages of their shard, and the table holds page ids within that shard. Every gather and scatter below
  has the shard as a batching dimension, so each device reads and writes only its own pages: indexed by
  global page ids, XLA's partitioner would all-gather the pool.
Row b of a batch of B rows lives in shard `b // (B // shards)` (how a NamedSharding splits rows).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.lax import GatherDimensionNumbers, GatherScatterMode, ScatterDimensionNumbers
from jax.sharding import Mesh

from rexrag_jax.models.config import ModelConfig
from rexrag_jax.sharding import batch_shards, named_sharding

NO_PAGE = -1  # a table entry past a row's pages
PAGE_AXES = ("layers", "batch", "act_kv_heads", "cache_length", "cache_length", "head_dim")


@flax.struct.dataclass
class KVCache:
    """k/v pages `[L, shards, K, pages_per_shard, page_size, D]`, `table[b, j]` = page (within row b's
    shard) of row b's tokens `j * page_size ...`, `lengths[b]` = tokens cached for row b."""

    k: jax.Array
    v: jax.Array
    table: jax.Array
    lengths: jax.Array

    @property
    def page_size(self) -> int:
        return self.k.shape[4]

    @property
    def shards(self) -> int:
        return self.k.shape[1]

    @property
    def pages_per_shard(self) -> int:
        return self.k.shape[3]

    @property
    def max_length(self) -> int:
        return self.table.shape[1] * self.page_size


def identity_table(rows: int, max_pages: int, shards: int) -> np.ndarray:
    """Row b (the j-th of its shard) holds pages `j * max_pages ...`: every row its own `max_pages` pages."""
    local = np.arange(rows) % (rows // shards)
    return (local[:, None] * max_pages + np.arange(max_pages)[None]).astype(np.int32)


def init_cache(
    config: ModelConfig,
    batch_size: int,
    max_length: int,
    *,
    mesh: Mesh | None = None,
    dtype: str | None = None,
    page_size: int | None = None,
    pages_per_shard: int | None = None,
) -> KVCache:
    """An empty cache of `batch_size` rows of up to `max_length` tokens; pages sharded with the rows over the
    data axes and KV heads over the tensor axis.

    `page_size` defaults to `max_length` (a contiguous cache: one page per row). `pages_per_shard` defaults to
    every row's full share, with the identity table; fewer pages need an allocator to fill the table
    (entries start as NO_PAGE)."""
    shards = batch_shards(mesh)
    if batch_size % shards:
        raise ValueError(f"init_cache: {batch_size} rows do not split over {shards} row shards of the mesh")
    page_size = int(page_size or max_length)
    max_pages = -(-max_length // page_size)
    full = batch_size // shards * max_pages
    pages_per_shard = full if pages_per_shard is None else int(pages_per_shard)
    if page_size < 1 or pages_per_shard < 1:
        raise ValueError(f"init_cache: page_size={page_size} and pages_per_shard={pages_per_shard} must be >= 1")
    if pages_per_shard >= full:
        table = identity_table(batch_size, max_pages, shards)
    else:
        table = np.full((batch_size, max_pages), NO_PAGE, np.int32)
    shape = (config.num_layers, shards, config.num_kv_heads, pages_per_shard, page_size, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    lengths = np.zeros((batch_size,), np.int32)  # host arrays can be put onto any mesh, multi-host too
    if mesh is None:
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.array(table), jnp.array(lengths))
    kv = named_sharding(mesh, PAGE_AXES, shape)  # created in place on each device, compiled once per shape

    def rows(x: np.ndarray) -> jax.Array:
        return jax.device_put(x, named_sharding(mesh, ("batch", None)[: x.ndim], x.shape), may_alias=False)

    return KVCache(jnp.zeros(shape, dtype, device=kv), jnp.zeros(shape, dtype, device=kv), rows(table), rows(lengths))


# ---------------------------------------------------------------------------- pure page arithmetic


def _by_shard(x: jax.Array, shards: int) -> jax.Array:
    """`[B, ...]` -> `[shards, B // shards, ...]` (row-sharded arrays split without communication)."""
    return x.reshape(shards, x.shape[0] // shards, *x.shape[1:])


def write_layer(pages: jax.Array, layer: jax.Array, table: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """`pages` with row b's token slot `slots[b, t]` of `layer` set to `new[b, t]` (`[B, T, K, D]`); slots at or
    past the table's end are dropped, as are slots in pages the table does not hold. In place."""
    shards, page_size = pages.shape[1], pages.shape[4]
    b, t = slots.shape
    slots = slots.astype(jnp.int32)
    column = jnp.minimum(slots // page_size, table.shape[1] - 1)
    page = jnp.take_along_axis(table, column, axis=1)
    page = jnp.where((slots < table.shape[1] * page_size) & (page >= 0), page, pages.shape[3])  # -> dropped
    index = jnp.stack([jnp.broadcast_to(layer, (b, t)).astype(jnp.int32), page, slots % page_size], axis=-1)
    dims = ScatterDimensionNumbers(
        update_window_dims=(3, 4),
        inserted_window_dims=(0, 3, 4),
        scatter_dims_to_operand_dims=(0, 3, 4),
        operand_batching_dims=(1,),
        scatter_indices_batching_dims=(0,),
    )
    updates = _by_shard(new.astype(pages.dtype), shards)
    return jax.lax.scatter(pages, _by_shard(index, shards), updates, dims, mode=GatherScatterMode.FILL_OR_DROP)


def read_layer(pages: jax.Array, layer: jax.Array, table: jax.Array, window: int) -> jax.Array:
    """The first `window` token slots (rounded up to whole pages) of each row's `layer`, head-major
    `[B, K, >= window, D]`. Slots past a row's length hold stale or zero values: the caller masks them."""
    shards, k, page_size, d = pages.shape[1], pages.shape[2], pages.shape[4], pages.shape[5]
    width = min(page_size, window)
    num = -(-window // page_size)
    b = table.shape[0]
    page = table[:, :num]
    index = jnp.stack([jnp.broadcast_to(layer, page.shape).astype(jnp.int32), page], axis=-1)
    dims = GatherDimensionNumbers(
        offset_dims=(2, 4, 5),
        collapsed_slice_dims=(0, 3),
        start_index_map=(0, 3),
        operand_batching_dims=(1,),
        start_indices_batching_dims=(0,),
    )
    out = jax.lax.gather(
        pages, _by_shard(index, shards), dims, (1, 1, k, 1, width, d), mode=GatherScatterMode.CLIP
    )  # [shards, B/shards, K, num, width, D]
    return out.reshape(b, k, num * width, d)


def copy_pages(pages: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
    """Page `dst[s, i]` of shard s (all layers) becomes a copy of page `src[s, i]`; `dst` out of range
    (padding) is skipped. The copy half of copy-on-write."""
    pages_per_shard = pages.shape[3]
    slab = (pages.shape[0], 1, pages.shape[2], 1, *pages.shape[4:])
    gather = GatherDimensionNumbers(
        offset_dims=(2, 3, 4, 5),
        collapsed_slice_dims=(3,),
        start_index_map=(3,),
        operand_batching_dims=(1,),
        start_indices_batching_dims=(0,),
    )
    src = jnp.clip(src, 0, pages_per_shard - 1)[..., None]
    moved = jax.lax.gather(pages, src, gather, slab, mode=GatherScatterMode.CLIP)  # [S, C, L, K, ps, D]
    scatter = ScatterDimensionNumbers(
        update_window_dims=(2, 3, 4, 5),
        inserted_window_dims=(3,),
        scatter_dims_to_operand_dims=(3,),
        operand_batching_dims=(1,),
        scatter_indices_batching_dims=(0,),
    )
    return jax.lax.scatter(pages, dst[..., None], moved, scatter, mode=GatherScatterMode.FILL_OR_DROP)

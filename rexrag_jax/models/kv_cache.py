"""The decoder's KV cache: fixed-size pages read and written through a per-row page table.

Why pages: a contiguous cache reserves `rows x max_length` slots, while most trajectories end far shorter
and the G rows of a group start from the same prompt. With pages a row holds only the pages it fills, and
rows can share pages (host-side allocator: `rollout/pages.py`). A contiguous cache is the special case of
one page of `max_length` slots per row with an identity table, which is what `init_cache` builds unless
asked for smaller pages.

Layout: k/v `[shards, kv_heads, layers, pages, page_size, head_dim]`.
- Per shard, `[kv_heads, layers * pages, page_size, head_dim]` is a free reshape: every layer's pages are
  pages of one head-major pool, layer l's page p being `l * pages + p`. That is what JAX's paged decode
  kernels (TPU and GPU `paged_attention`) read, so they read the whole cache in place with the table
  offset by the layer; a per-layer slice inside the layer scan would be copied for a custom call.
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
PAGE_AXES = ("batch", "act_kv_heads", "layers", "cache_length", "cache_length", "head_dim")


@flax.struct.dataclass
class KVCache:
    """k/v pages `[shards, K, L, pages_per_shard, page_size, D]`, `table[b, j]` = page (within row b's
    shard, the same for every layer) of row b's tokens `j * page_size ...`, `lengths[b]` = tokens cached
    for row b."""

    k: jax.Array
    v: jax.Array
    table: jax.Array
    lengths: jax.Array

    @property
    def page_size(self) -> int:
        return self.k.shape[4]

    @property
    def max_length(self) -> int:
        return self.table.shape[1] * self.page_size


def identity_table(rows: int, max_pages: int, shards: int) -> np.ndarray:
    """Row b (the j-th of its shard) holds pages `j * max_pages ...`: every row its own `max_pages` pages."""
    local = np.arange(rows) % (rows // shards)
    return (local[:, None] * max_pages + np.arange(max_pages)[None]).astype(np.int32)


def rows_to_device(x: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """A host array `[rows, ...]` as a fresh device buffer, rows over the data axes. Decode state is
    donated, so no buffer may be shared with another leaf or with host memory (on CPU a device_put may
    alias the numpy array: may_alias=False copies). From numpy, not a jax array: every process puts its
    identical copy onto a mesh that may span several processes."""
    if mesh is None:
        return jnp.array(x)
    return jax.device_put(x, named_sharding(mesh, ("batch",) + (None,) * (x.ndim - 1), x.shape), may_alias=False)


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
    shape = (shards, config.num_kv_heads, config.num_layers, pages_per_shard, page_size, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    lengths = np.zeros((batch_size,), np.int32)  # host arrays can be put onto any mesh, multi-host too
    # created in place on each device, compiled once per shape
    kv = named_sharding(mesh, PAGE_AXES, shape) if mesh is not None else None
    k, v = (jnp.zeros(shape, dtype, device=kv) for _ in range(2))
    return KVCache(k, v, rows_to_device(table, mesh), rows_to_device(lengths, mesh))


# ---------------------------------------------------------------------------- pure page arithmetic


def _by_shard(x: jax.Array, shards: int) -> jax.Array:
    """`[B, ...]` -> `[shards, B // shards, ...]` (row-sharded arrays split without communication)."""
    return x.reshape(shards, x.shape[0] // shards, *x.shape[1:])


def flat_pages(pages: jax.Array) -> jax.Array:
    """`[S, K, L, P, ps, D]` -> `[S, K, L * P, ps, D]` (free): layer l's page p is page `l * P + p`."""
    s, k, layers, p, ps, d = pages.shape
    return pages.reshape(s, k, layers * p, ps, d)


def layer_pages(table: jax.Array, layer: jax.Array, pages_per_shard: int) -> jax.Array:
    """Page ids of `layer` in the flat pool for a table of per-layer page ids (NO_PAGE stays negative)."""
    return jnp.where(table >= 0, table + layer * pages_per_shard, NO_PAGE)


def write_layer(pages: jax.Array, layer: jax.Array, table: jax.Array, slots: jax.Array, new: jax.Array) -> jax.Array:
    """`pages` with row b's token slot `slots[b, t]` of `layer` set to `new[b, t]` (`[B, T, K, D]`); slots at or
    past the table's end are dropped, as are slots in pages the table does not hold. In place."""
    shards, per_shard, page_size = pages.shape[0], pages.shape[3], pages.shape[4]
    slots = slots.astype(jnp.int32)
    column = jnp.minimum(slots // page_size, table.shape[1] - 1)
    page = jnp.take_along_axis(layer_pages(table, layer, per_shard), column, axis=1)
    flat = flat_pages(pages)
    page = jnp.where((slots < table.shape[1] * page_size) & (page >= 0), page, flat.shape[2])  # -> dropped
    index = jnp.stack([page, slots % page_size], axis=-1)
    dims = ScatterDimensionNumbers(
        update_window_dims=(3, 4),
        inserted_window_dims=(2, 3),
        scatter_dims_to_operand_dims=(2, 3),
        operand_batching_dims=(0,),
        scatter_indices_batching_dims=(0,),
    )
    updates = _by_shard(new.astype(pages.dtype), shards)
    out = jax.lax.scatter(flat, _by_shard(index, shards), updates, dims, mode=GatherScatterMode.FILL_OR_DROP)
    return out.reshape(pages.shape)


def read_span(window: int, page_size: int) -> int:
    """How many token slots `read_layer` returns for `window`: whole pages, or `window` within one page."""
    return -(-window // page_size) * page_size if window > page_size else window


def read_layer(pages: jax.Array, layer: jax.Array, table: jax.Array, window: int) -> jax.Array:
    """The first `window` token slots (rounded up to whole pages) of each row's `layer`, head-major
    `[B, K, read_span(window, page_size), D]`. Slots past a row's length hold stale or zero values: the
    caller masks them."""
    shards, k, per_shard, page_size, d = pages.shape[0], pages.shape[1], pages.shape[3], pages.shape[4], pages.shape[5]
    width = min(page_size, window)
    num = -(-window // page_size)
    b = table.shape[0]
    page = layer_pages(table[:, :num], layer, per_shard)[..., None]
    dims = GatherDimensionNumbers(
        offset_dims=(2, 4, 5),
        collapsed_slice_dims=(2,),
        start_index_map=(2,),
        operand_batching_dims=(0,),
        start_indices_batching_dims=(0,),
    )
    out = jax.lax.gather(
        flat_pages(pages), _by_shard(page, shards), dims, (1, k, 1, width, d), mode=GatherScatterMode.CLIP
    )  # [shards, B/shards, K, num, width, D]
    return out.reshape(b, k, num * width, d)


def shard_local_dims(rank: int, axis: int, *, gather: bool) -> GatherDimensionNumbers | ScatterDimensionNumbers:
    """Dimension numbers that index `axis` of a `[shards, ...]` array of rank `rank` with `[shards, n, 1]`
    indices, the shard being a batching dimension (so each device touches only its own shard); gathered
    or scattered blocks are `[shards, n, every other axis...]`."""
    window = tuple(range(2, rank))
    if gather:
        return GatherDimensionNumbers(
            offset_dims=window,
            collapsed_slice_dims=(axis,),
            start_index_map=(axis,),
            operand_batching_dims=(0,),
            start_indices_batching_dims=(0,),
        )
    return ScatterDimensionNumbers(
        update_window_dims=window,
        inserted_window_dims=(axis,),
        scatter_dims_to_operand_dims=(axis,),
        operand_batching_dims=(0,),
        scatter_indices_batching_dims=(0,),
    )


def copy_pages(pages: jax.Array, src: jax.Array, dst: jax.Array) -> jax.Array:
    """Page `dst[s, i]` of shard s (all layers) becomes a copy of page `src[s, i]`; `dst` out of range
    (padding) is skipped. The copy half of copy-on-write."""
    s, k, layers, p, ps, d = pages.shape
    src = jnp.clip(src, 0, p - 1)[..., None]
    # [S, C, K, L, ps, D]: every layer of each source page
    moved = jax.lax.gather(pages, src, shard_local_dims(6, 3, gather=True), (1, k, layers, 1, ps, d), mode="clip")
    return jax.lax.scatter(pages, dst[..., None], moved, shard_local_dims(6, 3, gather=False), mode="drop")

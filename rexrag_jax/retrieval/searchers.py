"""Top-k searchers over an embedding matrix: exact (jitted, chunked; the recall reference) and ScaNN.

Both take float32 L2-normalised queries and return `(scores float32 [B, k], rows int64 [B, k])`, best
first, scored by inner product.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("auto", "scann", "exact")
BRUTE_FORCE_BELOW = 4096  # ScaNN partitioning is pointless for fewer rows than this
SCANN_MISSING = (
    "backend 'scann' needs the `scann` package, which cannot be imported here ({err}); install "
    "it with `pip install scann==1.4.2` (Linux x86_64 wheels only) or use backend 'exact'"
)


def import_scann() -> Any:
    import scann  # noqa: F401 - only for the error below
    from scann import scann_ops_pybind

    return scann_ops_pybind


def scann_available() -> bool:
    try:
        import_scann()
    except ImportError:
        return False
    return True


@functools.partial(jax.jit, static_argnames="k")
def _merge_chunk(best_scores, best_rows, queries, chunk, n_valid, base, *, k: int):
    """Fold one chunk into the running top-k. Ties keep the lower row: lax.top_k keeps the lower index, and
    the running best (earlier rows) comes before the chunk in the concatenation."""
    scores = jnp.dot(queries, chunk.T, precision=jax.lax.Precision.HIGHEST)
    scores = jnp.where(jnp.arange(chunk.shape[0])[None, :] < n_valid, scores, -jnp.inf)
    chunk_scores, chunk_rows = jax.lax.top_k(scores, k)
    all_scores = jnp.concatenate([best_scores, chunk_scores], axis=1)
    all_rows = jnp.concatenate([best_rows, chunk_rows + base], axis=1)
    top, pos = jax.lax.top_k(all_scores, k)
    return top, jnp.take_along_axis(all_rows, pos, axis=1)


class ExactSearcher:
    """Reference top-k by inner product. The matrix streams through a jitted matmul + top_k in fixed-shape
    chunks (the last one padded and masked), so 21M x 768 never sits in memory and each (query bucket, k)
    compiles once."""

    def __init__(self, embeddings: np.ndarray, *, chunk_rows: int = 65536, max_query_batch: int = 1024):
        if embeddings.ndim != 2 or embeddings.dtype != np.float32:
            raise ValueError(f"embeddings must be float32 [rows, dim], got {embeddings.dtype} {embeddings.shape}")
        self.embeddings, self.chunk_rows, self.max_query_batch = embeddings, chunk_rows, max_query_batch

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(scores float32 [B, k], rows int64 [B, k])`, best first."""
        out = [
            self._search_block(queries[i : i + self.max_query_batch], k)
            for i in range(0, len(queries), self.max_query_batch)
        ]
        return np.concatenate([s for s, _ in out]), np.concatenate([r for _, r in out])

    def _search_block(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n, dim = self.embeddings.shape
        bucket = min(max(8, 1 << (len(queries) - 1).bit_length()), max(8, self.max_query_batch))
        padded = np.zeros((bucket, dim), np.float32)
        padded[: len(queries)] = queries
        chunks = -(-n // max(self.chunk_rows, k))
        size = max(-(-n // chunks), k)  # equal chunks: at most chunks - 1 rows of padding
        q = jnp.asarray(padded)
        best_scores = jnp.full((bucket, k), -jnp.inf, jnp.float32)
        best_rows = jnp.full((bucket, k), -1, jnp.int32)
        for base in range(0, n, size):
            chunk = np.asarray(self.embeddings[base : base + size])
            valid = len(chunk)
            if valid < size:
                chunk = np.concatenate([chunk, np.zeros((size - valid, dim), np.float32)])
            best_scores, best_rows = _merge_chunk(best_scores, best_rows, q, chunk, valid, base, k=k)
        return (np.asarray(best_scores)[: len(queries)], np.asarray(best_rows)[: len(queries)].astype(np.int64))


def scann_params(rows: int) -> dict:
    """Tree + anisotropic hashing + exact reordering; plain brute force below BRUTE_FORCE_BELOW rows.

    Searching 30% of ~sqrt(N) leaves gave recall@10 0.961 at 6.4x exact's queries/s on 100k real MiniLM
    embeddings (benchmarks/retrieval_throughput.py); 10% gave 0.872 at 12.5x.
    """
    if rows < BRUTE_FORCE_BELOW:
        return {"brute_force": True}
    leaves = max(1, round(math.sqrt(rows)))
    return {
        "brute_force": False,
        "num_leaves": leaves,
        "num_leaves_to_search": max(1, math.ceil(0.3 * leaves)),
        "training_sample_size": min(rows, 250_000),
        "dimensions_per_block": 2,
        "anisotropic_quantization_threshold": 0.2,
        "reorder": 200,
    }


class ScannSearcher:
    """ScaNN approximate top-k. A lock serialises calls: the pybind searcher makes no thread-safety promise."""

    def __init__(self, searcher: Any, params: dict):
        self._searcher, self.params, self._lock = searcher, params, threading.Lock()

    @classmethod
    def build(cls, embeddings: np.ndarray, params: dict) -> ScannSearcher:
        """Needs the whole float32 matrix in memory (ScaNN copies it; reordering keeps it)."""
        builder = import_scann().builder(np.ascontiguousarray(embeddings), 10, "dot_product")
        builder.set_n_training_threads(os.cpu_count() or 1)
        if params["brute_force"]:
            builder = builder.score_brute_force()
        else:
            builder = builder.tree(
                num_leaves=params["num_leaves"],
                num_leaves_to_search=params["num_leaves_to_search"],
                training_sample_size=params["training_sample_size"],
            )
            builder = builder.score_ah(
                params["dimensions_per_block"],
                anisotropic_quantization_threshold=params["anisotropic_quantization_threshold"],
            )
            builder = builder.reorder(params["reorder"])
        return cls(builder.build(), params)

    @classmethod
    def load(cls, directory: str, params: dict) -> ScannSearcher:
        return cls(import_scann().load_searcher(directory), params)

    def save(self, directory: str) -> None:
        self._searcher.serialize(directory, relative_path=True)

    def search(
        self, queries: np.ndarray, k: int, *, leaves_to_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k; `leaves_to_search` overrides the built-in setting (more leaves: higher recall, slower)."""
        queries = np.ascontiguousarray(queries, np.float32)
        scores, rows = self._search(queries, k, leaves_to_search)
        short = np.isnan(scores).any(axis=1)  # ScaNN pads with NaN when the searched leaves hold < k rows
        if short.any():
            scores[short], rows[short] = self._search(queries[short], k, self.params["num_leaves"])
        return scores, rows

    def _search(self, queries: np.ndarray, k: int, leaves: int | None) -> tuple[np.ndarray, np.ndarray]:
        pre = k if self.params["brute_force"] else max(k, self.params["reorder"])
        with self._lock:
            rows, scores = self._searcher.search_batched_parallel(
                queries, final_num_neighbors=k, pre_reorder_num_neighbors=pre, leaves_to_search=leaves
            )
        shape = (len(queries), k)
        return np.asarray(scores, np.float32).reshape(shape), np.asarray(rows, np.int64).reshape(shape)


def resolve_backend(backend: str) -> str:
    """ "auto" -> "scann" where it imports, else "exact" (with a note); "scann" without scann is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    try:
        import_scann()
    except ImportError as e:
        if backend == "scann":
            raise RuntimeError(SCANN_MISSING.format(err=e)) from e
        if backend == "auto":
            print(f"note: scann is not importable ({e}); using exact search")
        return "exact"
    return "scann" if backend == "auto" else backend

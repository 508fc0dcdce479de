"""Dense retrieval beside the rollout: corpus -> Flax encoder -> ScaNN / exact index -> search server.

The rollout engine only needs an object with `search(queries, k) -> list[list[Hit]]`: a local `Index`
and the HTTP `RetrievalClient` are interchangeable.
"""

from rexrag_jax.retrieval.client import RetrievalClient, RetrievalError
from rexrag_jax.retrieval.corpus import CorpusError, read_corpus
from rexrag_jax.retrieval.encoder import Encoder, load_encoder
from rexrag_jax.retrieval.index import Index, build_index, load_index
from rexrag_jax.retrieval.types import Hit, Passage

__all__ = [
    "CorpusError", "Encoder", "Hit", "Index", "Passage", "RetrievalClient", "RetrievalError", "build_index",
    "load_encoder", "load_index", "read_corpus",
]

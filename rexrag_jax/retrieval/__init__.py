"""Dense retrieval beside the rollout: corpus -> Flax encoder -> ScaNN / exact index -> search server.

The rollout engine only needs an object with `search(queries, k) -> list[list[Hit]]`: a local `Index`
and the HTTP `RetrievalClient` are interchangeable. Names load on first use.
"""

from rexrag_jax.lazy import lazy_exports

_M = "rexrag_jax.retrieval."
__getattr__, __all__ = lazy_exports(
    __name__,
    {
        **{n: _M + "client" for n in ("RetrievalClient", "RetrievalError")},
        **{n: _M + "corpus" for n in ("CorpusError", "read_corpus")},
        **{n: _M + "encoder" for n in ("Encoder", "load_encoder")},
        **{n: _M + "index" for n in ("Index", "build_index", "load_index")},
        **{n: _M + "types" for n in ("Hit", "Passage")},
    },
)

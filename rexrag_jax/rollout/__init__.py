"""Rollouts: jitted KV-cache decoding kernels and the REX-RAG host loop of the search agent (names load
on first use; the protocol itself is `rexrag_jax.protocol`)."""

from rexrag_jax.lazy import lazy_exports

_M = "rexrag_jax.rollout."
__getattr__, __all__ = lazy_exports(
    __name__,
    {
        **{n: _M + "engine" for n in ("RolloutEngine", "RolloutStats", "Trajectory")},
        "GenerateResult": _M + "generate",  # the function: `rollout.generate.generate` (same name as its module)
        "ExplorationPool": _M + "pool",
        "RolloutConfig": "rexrag_jax.config",
        "DecodeSession": _M + "session",
        **{n: _M + "stops" for n in ("StopTable", "build_stop_table", "tokenizer_bytes")},
    },
)

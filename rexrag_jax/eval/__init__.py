"""Evaluation: the search agent with greedy decoding over QA datasets, EM / F1 in the paper's layout
(names load on first use)."""

from rexrag_jax.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__, {n: "rexrag_jax.eval.evaluator" for n in ("PAPER_COLUMNS", "evaluate", "results_table")}
)

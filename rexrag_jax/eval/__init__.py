"""Evaluation: the search agent with greedy decoding over QA datasets, EM / F1 in the paper's layout."""

from rexrag_jax.eval.evaluator import PAPER_COLUMNS, evaluate, results_table

__all__ = ["PAPER_COLUMNS", "evaluate", "results_table"]

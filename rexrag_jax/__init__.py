"""rexrag_jax: REX-RAG (reasoning exploration with policy correction) for search agents, in JAX.

Pipeline: models/ -> rollout/ -> rl/ <- data/, with retrieval/ beside the rollout. Importing the package
has no side effects; subpackages are imported where used.
"""

__version__ = "0.1.0"

"""Rollouts: jitted KV-cache decoding kernels, the Search-R1 protocol and the REX-RAG host loop."""

from rexrag_jax.rollout.engine import RolloutConfig, RolloutEngine, RolloutStats, Trajectory
from rexrag_jax.rollout.generate import GenerateResult, generate
from rexrag_jax.rollout.pool import ExplorationPool
from rexrag_jax.rollout.session import DecodeSession
from rexrag_jax.rollout.stops import StopTable, build_stop_table, tokenizer_bytes

__all__ = ["DecodeSession", "ExplorationPool", "GenerateResult", "RolloutConfig", "RolloutEngine", "RolloutStats",
           "StopTable", "Trajectory", "build_stop_table", "generate", "tokenizer_bytes"]

"""REX-RAG training: rewards, GRPO losses, the policy correction (pure, jit-able) and the trainer.

Import the submodules (`rexrag_jax.rl.losses`, `.rewards`, `.correction`, `.trainer`, ...); this package
imports nothing itself, so config files can use `rexrag_jax.rl.config` without starting jax.
"""

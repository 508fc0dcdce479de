"""REX-RAG training: GRPO losses, the policy correction, the objectives (pure, jit-able), the jitted update
and the trainer. Import the submodules (`rexrag_jax.rl.losses`, `.correction`, `.trainer`, ...); this
package imports nothing itself."""

"""A tiny REX-RAG run that trains end to end on a laptop CPU (and in the test suite).

A 2-layer, 64-wide decoder with the Qwen2.5 architecture and vocabulary, randomly initialised, on a
(2, 2, 2) mesh of 8 fake CPU devices; 16 questions about a 12-passage fictional world, indexed with
MiniLM on first use. Everything else is the paper's algorithm at toy sizes. A random policy rarely
answers, so expect rewards near 0: this config checks the machinery, not learning (issue 7's
embedded run warm-starts a policy first).
"""

import ml_collections

from rexrag_jax.config import default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.seed = 0
    c.steps = 4
    c.cpu_devices = 8
    c.mesh = ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2})
    c.model.init = "random"
    c.model.dtype = "float32"
    c.model.arch.update(
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        dtype="float32",
    )
    c.data.train_file = "configs/data/tiny_train.jsonl"
    c.data.batch_size = 4
    c.retrieval.corpus = "configs/data/tiny_corpus.jsonl"
    c.rollout.update(
        group_size=3,
        max_turns=2,
        max_response_length=24,
        max_obs_length=64,
        max_start_length=512,
        max_context_length=640,
        decode_chunk=8,
        prefill_chunk=256,
        prefill_rows=4,
        precompile=False,  # a short CPU run: compile each shape when first used
    )
    c.train.update(mini_batch_size=8, micro_batch_size=4, length_multiple=128, logprob_chunk=128)
    c.optim.update(learning_rate=1e-4, warmup_steps=2)
    c.probes.update(keep_ratio=0.25, keep_multiple=1)
    c.checkpoint.update(every=2, keep=2)
    c.eval.update(data_dir="configs/data/tiny_eval", batch_size=4)  # FlashRAG layout: nq/test, hotpotqa/dev
    return c

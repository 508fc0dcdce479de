"""The embedded default: REX-RAG vs GRPO on a synthetic multi-hop world, on a laptop CPU (`make demo`).

A world of invented people, towns, countries and companies (questions of 1-3 hops, answers only
reachable through retrieval), a BPE tokenizer learned on it, a tiny Qwen2-architecture policy warm-started
on imperfect demonstrations, then GRPO (G=5), GRPO with REX-RAG's decode budget (G=6) and REX-RAG from
that same warm start with the same questions, steps and seeds.

The setting is the dead-end study's clearest level (docs/dead_end_study.md): no complete multi-hop chain
among the demonstrations, so ~87% of multi-hop training groups start with every sample wrong, and probe
prompts the policy has never seen. The two seeds are seeds 0 and 1 of that level's study runs; the
study's 12 paired seeds carry the confidence intervals. Sizes fit ~15 minutes on 2 CPU cores (venv included).
"""

import ml_collections

from rexrag_jax.config import default_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # world, tokenizer, demonstrations, warm start
    c.seeds = (0, 1)  # RL seeds, each run for every arm
    # Arms (rexrag_jax/embedded/arms.py): grpo, grpo_g6 (GRPO with G=6), rexrag, rexrag_dd (decoupled
    # correction + dead-end-first probe budget). Seeds and arms may grow on an existing workdir.
    c.arms = ("grpo", "grpo_g6", "rexrag")  # rexrag_jax/embedded/arms.py
    c.pilot = True  # before RL: dead-end and rescue rates of the warm start's sampler (pilot.json, in the report)
    c.cpu_devices = 0  # > 0: fake this many CPU devices
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.world = ml_collections.ConfigDict(
        dict(seed=0, people=60, towns=16, countries=8, companies=12, test_fraction=0.4, max_test=0)
    )
    c.vocab_size = 1024
    c.prompt = "Question: {question}\n"
    c.model = ml_collections.ConfigDict(
        dict(
            architecture="qwen2",
            hidden_size=128,
            intermediate_size=384,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            attention_bias=True,
            max_position_embeddings=512,
            param_dtype="float32",
            dtype="float32",
            remat="none",
        )
    )
    # Demonstration behaviours (see rexrag_jax/embedded/demonstrations.py): on multi-hop questions the
    # warm start mostly stops one hop short, so many GRPO groups are all wrong (dead ends).
    # complete_share >= 0: the share of complete chains among multi-hop demonstrations, the others scaled
    # to keep their proportions (the dead-end knob); < 0: the mix as written. pool_reflections: reflections
    # may use the exploratory prompts' own sentences (False: a probe's prompt is new to the policy).
    c.demos = ml_collections.ConfigDict(
        dict(
            per_question=4,
            complete_share=0.0,
            pool_reflections=False,
            single=dict(complete=0.8, guess=0.12, reflect=0.08),
            multi=dict(complete=0.3, premature=0.45, reflect=0.15, guess=0.1),
        )
    )
    c.warm_start = ml_collections.ConfigDict(
        dict(
            steps=600,
            batch_size=16,
            learning_rate=3e-3,
            warmup_steps=25,
            weight_decay=0.01,
            max_grad_norm=1.0,
            length_multiple=128,
            logprob_chunk=128,
        )
    )
    rl = default_config()
    rl.steps = 20
    rl.data.batch_size = 8
    rl.rollout.update(
        group_size=5,
        max_turns=4,
        max_response_length=64,
        max_obs_length=96,
        max_start_length=48,
        max_context_length=256,
        topk=1,
        temperature=0.7,
        probe_prob=0.5,
        decode_chunk=8,
        prefill_chunk=64,
        prefill_rows=4,
        precompile=False,  # compile the shapes a CPU run uses, when first used
    )
    rl.train.update(mini_batch_size=64, micro_batch_size=32, length_multiple=128, logprob_chunk=128)
    rl.optim.update(learning_rate=2e-4, warmup_steps=0)
    rl.loss.update(kl_coef=0.001)
    rl.probes.update(keep_ratio=0.08, keep_multiple=1)
    rl.checkpoint.update(every=10, keep=1, async_save=False)
    rl.model.init = "random"  # unused: runs start from the warm start
    c.rl = rl
    c.eval_every = 5  # the primary metric averages the last two evaluations (steps 15 and 20)
    c.eval_batch_size = 40  # = questions x group size of a training step: one set of compiled rollout shapes
    return c

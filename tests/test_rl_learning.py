"""The update moves the policy the right way: GRPO on a bandit-like task with the real pieces (sampling
with the rollout kernels, packing, log-probs, advantages, the sharded update) raises the reward.

A sign error in the advantage, the ratio or the behaviour log-probs passes every formula test but fails
this one."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rexrag_jax import protocol as P
from rexrag_jax.config import LossConfig, OptimConfig
from rexrag_jax.models import ModelConfig, init_model
from rexrag_jax.rl.batch import pack_trajectories
from rexrag_jax.rl.losses import grpo_advantages
from rexrag_jax.rl.objective import RLObjective
from rexrag_jax.rl.update import batch_logprobs, init_optimizer, update
from rexrag_jax.rollout.engine import Trajectory
from rexrag_jax.rollout.generate import generate
from rexrag_jax.sharding import make_mesh

TARGET = 7  # reward 1 when the response contains this token


def test_grpo_updates_raise_the_reward(devices):
    mesh = make_mesh((2, 2, 2))
    cfg = ModelConfig(
        architecture="qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        attention_bias=True,
        eos_token_id=(0,),
    )
    model = init_model(cfg, seed=1, mesh=mesh)
    graphdef, params = nnx.split(model)
    ref = jax.tree.map(jnp.copy, params)
    optim = OptimConfig(learning_rate=2e-2, warmup_steps=0)
    opt = init_optimizer(optim, params)
    prompts = [[11, 12, 13], [21, 22], [31, 32, 33, 34], [41]]
    group = 8
    rewards_per_step = []
    for step in range(12):
        out = generate(model, [p for p in prompts for _ in range(group)], max_new_tokens=4, temperature=1.0, seed=step)
        trajs, rewards = [], []
        for i, response in enumerate(out.tokens):
            prompt = prompts[i // group]
            trajs.append(
                Trajectory(
                    i // group,
                    prompt + response,
                    [P.PROMPT] * len(prompt) + [P.MODEL] * len(response),
                    [0.0] * (len(prompt) + len(response)),
                    len(prompt),
                )
            )
            rewards.append(float(TARGET in response))
        rewards_per_step.append(np.mean(rewards))
        batch = pack_trajectories(trajs, length_multiple=8, row_multiple=8)
        old, _ = batch_logprobs(graphdef, params, batch, rows=8, mesh=mesh, chunk=8)
        ref_lp, _ = batch_logprobs(graphdef, ref, batch, rows=8, mesh=mesh, chunk=8)
        # the sampled log-probs from the decode kernel are the old policy's (same parameters, T = 1)
        sampled = np.concatenate([np.asarray(lp) for lp in out.logprobs])
        np.testing.assert_allclose(old[batch.loss_mask], sampled, atol=1e-4)
        adv = np.asarray(grpo_advantages(np.asarray(rewards, np.float32), batch.group_ids[: len(trajs)]))
        batch = batch.replace(old_logprobs=old, ref_logprobs=ref_lp, advantages=adv)
        params, opt, metrics = update(
            graphdef,
            params,
            opt,
            batch,
            micro_rows=8,
            alpha=0.0,
            error_rate=1.0,
            lr=optim.learning_rate,
            mesh=mesh,
            objective=RLObjective(LossConfig()),
            optim_cfg=optim,
            chunk=8,
        )
        nnx.update(model, params)
    first, last = np.mean(rewards_per_step[:3]), np.mean(rewards_per_step[-3:])
    print("reward per step", np.round(rewards_per_step, 3))
    assert first < 0.4 and last > first + 0.3, rewards_per_step

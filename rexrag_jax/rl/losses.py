"""GRPO advantages, the clipped policy loss and the k3 KL (docs/algorithm.md#grpo-advantages,
#surrogate-loss-and-kl): small pure, jit-able functions.

Losses return token sums and token counts as well as the mean, so that a mini-batch split into
micro-batches is aggregated exactly: sum the sums, divide once by the mini-batch's token count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grpo_advantages(rewards, group_ids, eps: float = 1e-6, baseline=None) -> jax.Array:
    """Per-trajectory `(r - mean_g) / (std_g + eps)` with the unbiased std of the trajectory's group g.

    Group ids are any integers (probes carry their source's). A group of one keeps its raw score
    (mean 0, std 1, as verl), an all-equal group gets 0. `baseline` (bool `[N]`, default all) says which
    rows define the group's mean and std; the others are scored against them (`loss.advantage_baseline =
    "originals"`: probes do not move their group's statistics). Where the baseline rows of a group all
    agree (std 0) the std is taken as 1, so a probe of a dead-end group scores `r - mean` instead of
    `r / eps`; for the baseline rows themselves that is 0 either way. Shape `[N]`, float32.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    group_ids = jnp.asarray(group_ids)
    n = rewards.shape[0]
    weight = jnp.ones_like(rewards) if baseline is None else jnp.asarray(baseline, jnp.float32)
    _, inverse = jnp.unique(group_ids, size=n, fill_value=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    count = jax.ops.segment_sum(weight, inverse, n)
    mean = jax.ops.segment_sum(rewards * weight, inverse, n) / jnp.maximum(count, 1.0)
    sq = jax.ops.segment_sum(weight * (rewards - mean[inverse]) ** 2, inverse, n)
    std = jnp.sqrt(sq / jnp.maximum(count - 1.0, 1.0))
    single = count[inverse] <= 1
    mean_i = jnp.where(single, 0.0, mean[inverse])
    std_i = jnp.where(single | (std[inverse] == 0.0), 1.0, std[inverse])
    return (rewards - mean_i) / (std_i + eps)


def k3_kl(logprobs, ref_logprobs) -> jax.Array:
    """Elementwise k3 ("low_var_kl") estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = log pi_ref - log pi
    clamped to [-20, 20] and the result to [-10, 10]. >= 0, and 0 exactly where the log-probs agree."""
    d = jnp.clip(ref_logprobs - logprobs, -20.0, 20.0)
    # expm1(d) - d == exp(d) - d - 1, but cannot round below 0 in float32 (exp(d) - d - 1 reaches -6e-8)
    return jnp.clip(jnp.expm1(d) - d, -10.0, 10.0)


def masked_sum(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of values where mask, number of mask tokens) - the exact-accumulation form of a token mean."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask), jnp.sum(mask)


def clipped_surrogate(
    logprobs, behaviour_logprobs, advantages, clip_low: float = 0.2, clip_high: float = 0.2
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Elementwise PPO objective `max(-A r, -A clip(r, 1-low, 1+high))` with r = pi / q (q held fixed).

    `advantages` broadcast against the log-probs. Returns (loss, ratio, clipped) where `clipped` marks
    tokens whose gradient the clip removed. No dual clip (the authors' is commented out).
    """
    log_ratio = jnp.clip(logprobs - jax.lax.stop_gradient(behaviour_logprobs), -20.0, 20.0)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.maximum(unclipped, clipped), ratio, clipped > unclipped


def decoupled_surrogate(
    logprobs, old_logprobs, behaviour_logprobs, advantages, clip_low: float = 0.2, clip_high: float = 0.2
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decoupled PPO (Hilton et al. 2021): `-w min(r A, clip(r, 1-low, 1+high) A)` with the trust region on
    r = pi / pi_old and the off-policy correction as a fixed weight w = pi_old / q (q: the behaviour
    probability). Same returns as `clipped_surrogate` (ratio = r). With q = pi_old (no probes) it is PPO.
    """
    weight = jnp.exp(jnp.clip(jax.lax.stop_gradient(old_logprobs - behaviour_logprobs), -20.0, 20.0))
    loss, ratio, clipped = clipped_surrogate(logprobs, old_logprobs, advantages, clip_low, clip_high)
    return weight * loss, ratio, clipped


def policy_loss(
    logprobs, behaviour_logprobs, advantages, loss_mask, clip_low: float = 0.2, clip_high: float = 0.2
) -> tuple[jax.Array, dict]:
    """Token-mean clipped policy loss over `loss_mask` (`[N, T]`); `advantages` `[N]` broadcast over tokens.

    The dict has `sum` and `count` (exact accumulation), `clip_fraction` (masked tokens whose gradient
    the clip removed) and `ratio_mean`.
    """
    advantages = jnp.asarray(advantages, jnp.float32)[:, None]
    loss, ratio, clipped = clipped_surrogate(logprobs, behaviour_logprobs, advantages, clip_low, clip_high)
    total, count = masked_sum(loss, loss_mask)
    denom = jnp.maximum(count, 1.0)
    clip_sum, _ = masked_sum(clipped.astype(jnp.float32), loss_mask)
    ratio_sum, _ = masked_sum(ratio, loss_mask)
    stats = {"sum": total, "count": count, "clip_fraction": clip_sum / denom, "ratio_mean": ratio_sum / denom}
    return total / denom, stats

"""REX-RAG's policy correction and probe budget (docs/algorithm.md#policy-correction, #probe-budget) as pure functions.

Probes are sampled from a different policy than originals: the prefix of a failed trajectory, then an
exploratory prompt drawn from the pool, then the policy again. The PPO "old" log-prob is replaced by
the log of the mixture behaviour probability `(1 - alpha) pi_old + alpha mu`, per token as the authors
do, or per sequence (flag). Positions are absolute token indices of `[N, T]` arrays that hold prompt
and response; `response_start[b]` is where row b's response begins and `probe_start[b]` its first
exploratory-prompt token, so the authors' j is `probe_start - response_start`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MIN_ERROR_RATE = 1e-6  # floor on eps in eps^(-1/j): with no failed originals there is nothing to divide by


def probe_mu(old_logprobs, is_probe, prompt_mask, conditionals, response_start, probe_start, error_rate) -> jax.Array:
    """The probe policy's probability mu of every token, `[N, T]` (docs/algorithm.md#probe-policy-probability).

    Originals: 0. Probes: pi_old * eps^(-1/j) on the response before the prompt (the prefix law is pi
    conditioned on failure, spread over its j tokens), the pool's trie conditional U on prompt tokens
    (`conditionals`, U = 1 on the first), pi_old after it. `error_rate` eps is the batch's fraction of
    failed originals.
    """
    pi = jnp.exp(old_logprobs)
    t = jnp.arange(old_logprobs.shape[1])[None]
    is_probe = jnp.asarray(is_probe, bool)[:, None]
    response_start = jnp.asarray(response_start)[:, None]
    probe_start = jnp.asarray(probe_start)[:, None]
    j = jnp.maximum(probe_start - response_start, 1).astype(jnp.float32)
    log_factor = -jnp.log(jnp.clip(error_rate, MIN_ERROR_RATE, 1.0)) / j
    prefix = (t >= response_start) & (t < probe_start)
    mu = jnp.where(prefix, pi * jnp.exp(log_factor), pi)
    mu = jnp.where(jnp.asarray(prompt_mask, bool), conditionals, mu)
    return jnp.where(is_probe, mu, 0.0)


def behaviour_logprobs(old_logprobs, probe_mu, mask, alpha: float) -> jax.Array:
    """Per-token `log((1 - alpha) pi_old + alpha mu)` where mask, `old_logprobs` elsewhere (`[N, T]`).

    Computed with logaddexp so mu = 0 or alpha in {0, 1} stay finite; alpha = 0 returns `old_logprobs`
    exactly. Where both mixture terms vanish (alpha = 1 on an original) it falls back to `old_logprobs`.
    """
    alpha = jnp.asarray(alpha, jnp.float32)
    log_pi = jnp.log1p(-alpha) + old_logprobs
    log_mu = jnp.log(alpha) + jnp.log(probe_mu)
    mixed = jnp.logaddexp(log_pi, log_mu)
    mixed = jnp.where(alpha == 0.0, old_logprobs, mixed)
    mixed = jnp.where(jnp.isfinite(mixed), mixed, old_logprobs)
    return jnp.where(jnp.asarray(mask, bool), mixed, old_logprobs)


def sequence_behaviour_logprobs(old_logprobs, probe_mu, is_probe, mask, alpha: float, response_mask=None) -> jax.Array:
    """The sequence-level alternative (flag `correction = "sequence"`): originals keep q = pi_old; a probe's
    q(y) = (1 - alpha) pi_old(y) + alpha mu(y), i.e. log q(y)/pi_old(y) = log((1 - alpha) + alpha mu(y)/pi_old(y))
    with mu/pi_old taken over the whole response (`response_mask`, default `mask`: the eps^(-1/j) prefix factor
    covers information and feedback tokens too, so it multiplies to 1/eps only over all of them). That log
    ratio is spread evenly over the `mask` tokens, so the per-token ratios multiply to the sequence weight and
    a uniform PPO clip still applies."""
    mask = jnp.asarray(mask, bool)
    response = mask if response_mask is None else jnp.asarray(response_mask, bool)
    alpha = jnp.asarray(alpha, jnp.float32)
    log_ratio = jnp.sum(jnp.where(response, jnp.log(probe_mu) - old_logprobs, 0.0), axis=1)  # log mu(y)/pi(y)
    shift = jnp.logaddexp(jnp.log1p(-alpha), jnp.log(alpha) + log_ratio)
    shift = jnp.where(jnp.asarray(is_probe, bool) & (alpha > 0) & jnp.isfinite(shift), shift, 0.0)
    per_token = shift / jnp.maximum(jnp.sum(mask, axis=1), 1)
    return jnp.where(mask, old_logprobs + per_token[:, None], old_logprobs)


# -------------------------------------------------------- probe budget (docs/algorithm.md#probe-budget)


def update_keep_ratio(rho, probe_accuracy, weight: float = 0.1):
    """rho_{t+1} = (1 - weight) rho_t + weight acc_probe_t (pandas ewm(alpha=weight, adjust=False))."""
    return (1.0 - weight) * rho + weight * probe_accuracy


def probe_keep_count(num_prompts: int, group_size: int, rho: float, multiple: int = 8) -> int:
    """int(B G rho), rounded down to a multiple of `multiple` (the authors' GPU count)."""
    keep = int(num_prompts * group_size * rho)
    return keep - keep % multiple if multiple > 1 else keep


def mean_prompt_logprob(old_logprobs, prompt_mask) -> jax.Array:
    """Each row's mean pi_old log-prob over its exploratory-prompt tokens (0 for rows without any)."""
    mask = jnp.asarray(prompt_mask, jnp.float32)
    return jnp.sum(old_logprobs * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


def select_probes(is_probe, scores, keep_num, first=None) -> jax.Array:
    """Keep mask `[N]`: every original, and the `keep_num` probes with the highest scores (ties by index).
    `first` (bool `[N]`, optional) ranks those probes ahead of all others whatever their score
    (`probes.priority = "dead_end_groups"`: probes of groups with no correct original)."""
    is_probe = jnp.asarray(is_probe, bool)
    index = jnp.arange(is_probe.shape[0], dtype=jnp.int32)
    first = jnp.zeros_like(is_probe) if first is None else jnp.asarray(first, bool)
    # probes first (a key of its own, so a probe scored -inf cannot tie with an original), then the
    # priority rows, score descending, index
    order = jnp.lexsort((index, -jnp.asarray(scores, jnp.float32), ~first, ~is_probe))
    rank = jnp.zeros(is_probe.shape[0], jnp.int32).at[order].set(index)
    return ~is_probe | (rank < keep_num)


def _groups(group_ids) -> tuple[jax.Array, int]:
    group_ids = jnp.asarray(group_ids)
    n = group_ids.shape[0]
    _, inverse = jnp.unique(group_ids, size=n, fill_value=0, return_inverse=True)
    return inverse.reshape(-1), n


def dead_end_rows(rewards, group_ids, is_probe) -> jax.Array:
    """Bool `[N]`: the row's group has no correct original (reward >= 1) - a dead end, where GRPO's
    originals alone carry no signal."""
    inverse, n = _groups(group_ids)
    correct = (~jnp.asarray(is_probe, bool) & (jnp.asarray(rewards) >= 1.0)).astype(jnp.int32)
    return jax.ops.segment_max(correct, inverse, n)[inverse] == 0


def dead_end_stats(rewards, group_ids, is_probe, kept) -> dict[str, jax.Array]:
    """Diagnostics of whether probes do their job: `dead_end_rate` (share of groups whose originals are all
    wrong), `rescue_rate` (share of dead-end groups with at least one correct kept probe; 0 without dead
    ends), the number of dead-end groups and the kept probes that sit in one."""
    rewards = jnp.asarray(rewards, jnp.float32)
    is_probe, kept = jnp.asarray(is_probe, bool), jnp.asarray(kept, bool)
    inverse, n = _groups(group_ids)
    dead = dead_end_rows(rewards, group_ids, is_probe)
    one = lambda mask: jax.ops.segment_max(mask.astype(jnp.int32), inverse, n) > 0
    present = one(jnp.ones_like(is_probe))
    dead_groups = one(dead) & present
    rescued = one(is_probe & kept & (rewards >= 1.0)) & dead_groups
    n_dead = jnp.sum(dead_groups)
    return {
        "dead_end_rate": n_dead / jnp.maximum(jnp.sum(present), 1),
        "rescue_rate": jnp.sum(rescued) / jnp.maximum(n_dead, 1),
        "dead_end_groups": n_dead,
        "probes_kept_dead_end": jnp.sum(is_probe & kept & dead),
    }


def mixture_stats(rewards, is_probe, kept) -> dict[str, jax.Array]:
    """alpha (probe share of the kept batch), eps (failed share of originals) and the kept probes'
    accuracy (reward >= 1; 0 when none) that drives rho."""
    rewards = jnp.asarray(rewards, jnp.float32)
    is_probe, kept = jnp.asarray(is_probe, bool), jnp.asarray(kept, bool)
    probes, originals = is_probe & kept, ~is_probe & kept
    n_probe, n_orig = jnp.sum(probes), jnp.sum(originals)
    alpha = n_probe / jnp.maximum(n_probe + n_orig, 1)
    eps = jnp.sum(originals & (rewards < 1.0)) / jnp.maximum(n_orig, 1)
    acc = jnp.sum(probes & (rewards >= 1.0)) / jnp.maximum(n_probe, 1)
    return {"alpha": alpha, "error_rate": eps, "probe_accuracy": acc}

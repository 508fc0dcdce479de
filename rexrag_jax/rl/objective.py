"""The REX-RAG training objective of one micro-batch, from log-probs to (loss, sums) - pure and jit-able.

`loss_terms` turns the policy's token log-probs into the clipped, importance-corrected policy loss plus
the k3 KL penalty, using the behaviour log-probs of `correction` (docs/algorithm.md#policy-correction).
It returns the loss already divided by the *mini-batch's* token count, so summing it over micro-batches
gives the exact token mean, and per-segment sums (originals, probe prefix, exploratory prompt, probe
continuation) of the clipped tokens and ratios, so a run shows where the trust region bites.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from rexrag_jax.config import LossConfig
from rexrag_jax.rl.batch import TrainBatch
from rexrag_jax.rl.correction import behaviour_logprobs, probe_mu, sequence_behaviour_logprobs
from rexrag_jax.rl.losses import clipped_surrogate, decoupled_surrogate, k3_kl, masked_sum

SEGMENTS = ("original", "probe_prefix", "probe_prompt", "probe_continuation")
SUM_KEYS = ("pg", "kl", "tokens", "clipped", "ratio") + tuple(
    f"{k}_{seg}" for seg in SEGMENTS for k in ("tokens", "clipped", "ratio")
)


def behaviour(batch: TrainBatch, alpha, error_rate, correction: str = "token") -> jax.Array:
    """The behaviour log-probs log q of every token (docs/algorithm.md#behaviour-probability): the PPO
    "old" log-probs of the token and sequence corrections; the decoupled correction weights by pi_old / q
    with the token mixture q."""
    old = batch.old_logprobs
    mu = probe_mu(
        old, batch.is_probe, batch.prompt_mask, batch.conditionals, batch.response_start, batch.probe_start, error_rate
    )
    response = batch.valid & (jnp.arange(old.shape[1])[None] >= batch.response_start[:, None])
    if correction == "sequence":
        return sequence_behaviour_logprobs(old, mu, batch.is_probe, batch.loss_mask, alpha, response)
    return behaviour_logprobs(old, mu, response, alpha)


def segment_masks(batch: TrainBatch) -> dict[str, jax.Array]:
    """Loss-mask tokens split by role: originals; a probe's copied prefix, its exploratory prompt and what
    the policy wrote after it."""
    mask, prompt = batch.loss_mask, batch.prompt_mask
    probe = jnp.asarray(batch.is_probe, bool)[:, None]
    before = jnp.arange(mask.shape[1])[None] < batch.probe_start[:, None]
    return {
        "original": mask & ~probe,
        "probe_prefix": mask & probe & before & ~prompt,
        "probe_prompt": mask & probe & prompt,
        "probe_continuation": mask & probe & ~before & ~prompt,
    }


def loss_terms(logprobs: jax.Array, batch: TrainBatch, scalars: dict, cfg: LossConfig) -> tuple[jax.Array, dict]:
    """(loss contribution, sums) for one micro-batch.

    `batch`: a micro-batch with log-probs and advantages. `scalars`: alpha, error_rate and total_tokens
    (loss-mask tokens of the whole mini-batch). `sums` has the SUM_KEYS.
    """
    lq = behaviour(batch, scalars["alpha"], scalars["error_rate"], cfg.correction)
    adv = batch.advantages[:, None]
    if cfg.correction == "decoupled":
        pg, ratio, clipped = decoupled_surrogate(logprobs, batch.old_logprobs, lq, adv, cfg.clip_low, cfg.clip_high)
    else:
        pg, ratio, clipped = clipped_surrogate(logprobs, lq, adv, cfg.clip_low, cfg.clip_high)
    kl = k3_kl(logprobs, batch.ref_logprobs)
    mask = batch.loss_mask
    pg_sum, count = masked_sum(pg, mask)
    kl_sum, _ = masked_sum(kl, mask)
    clipped = clipped.astype(jnp.float32)
    sums = {
        "pg": pg_sum,
        "kl": kl_sum,
        "tokens": count,
        "clipped": masked_sum(clipped, mask)[0],
        "ratio": masked_sum(ratio, mask)[0],
    }
    for seg, seg_mask in segment_masks(batch).items():
        sums[f"clipped_{seg}"], sums[f"tokens_{seg}"] = masked_sum(clipped, seg_mask)
        sums[f"ratio_{seg}"] = masked_sum(ratio, seg_mask)[0]
    return (pg_sum + cfg.kl_coef * kl_sum) / scalars["total_tokens"], sums


def sft_loss(logprobs: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p over loss tokens, number of loss tokens); `logprobs` aligned with the tokens."""
    mask = loss_mask.astype(jnp.float32)
    return -(logprobs * mask).sum(), mask.sum()


# ---------------------------------------------------------------------------- objectives of `rl.update`
# An objective is a hashable jit static argument: `terms` gives one micro-batch's loss contribution (already
# divided by the mini-batch's loss tokens) and sums; `metrics` turns the mini-batch's sums into means.


@dataclass(frozen=True)
class RLObjective:
    """The REX-RAG / GRPO policy loss (`loss_terms`)."""

    loss: LossConfig
    sum_keys = SUM_KEYS

    def terms(self, logprobs: jax.Array, batch: TrainBatch, scalars: dict) -> tuple[jax.Array, dict]:
        return loss_terms(logprobs, batch, scalars, self.loss)

    def metrics(self, sums: dict) -> dict:
        count = jnp.maximum(sums["tokens"], 1.0)
        out = {
            "pg_loss": sums["pg"] / count,
            "kl": sums["kl"] / count,
            "clip_fraction": sums["clipped"] / count,
            "ratio_mean": sums["ratio"] / count,
            "loss": (sums["pg"] + self.loss.kl_coef * sums["kl"]) / count,
            "tokens": sums["tokens"],
        }
        # per-segment sums (not means): the trainer adds them over a step's updates before dividing
        out.update({f"{k}_{seg}": sums[f"{k}_{seg}"] for seg in SEGMENTS for k in ("tokens", "clipped", "ratio")})
        return out


@dataclass(frozen=True)
class SFTObjective:
    """Masked next-token cross-entropy (`sft_loss`): the embedded warm start and the smoke run."""

    sum_keys = ("nll", "tokens")

    def terms(self, logprobs: jax.Array, batch: TrainBatch, scalars: dict) -> tuple[jax.Array, dict]:
        total, count = sft_loss(logprobs, batch.loss_mask)
        return total / scalars["total_tokens"], {"nll": total, "tokens": count}

    def metrics(self, sums: dict) -> dict:
        return {"loss": sums["nll"] / jnp.maximum(sums["tokens"], 1.0), "tokens": sums["tokens"]}

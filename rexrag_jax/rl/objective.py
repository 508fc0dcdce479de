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

from rexrag_jax.rl.correction import behaviour_logprobs, probe_mu, sequence_behaviour_logprobs
from rexrag_jax.rl.losses import clipped_surrogate, decoupled_surrogate, k3_kl, masked_sum

# "token": the authors' per-token mixture in the PPO ratio; "sequence": one mixture weight per probe;
# "decoupled": clip pi/pi_old, correct with the fixed weight pi_old/q (token mixture q).
CORRECTIONS = ("token", "sequence", "decoupled")
SEGMENTS = ("original", "probe_prefix", "probe_prompt", "probe_continuation")
SUM_KEYS = ("pg", "kl", "tokens", "clipped", "ratio") + tuple(
    f"{k}_{seg}" for seg in SEGMENTS for k in ("tokens", "clipped", "ratio"))


@dataclass(frozen=True)
class LossConfig:
    """Static loss settings (hashable: a jit static argument). Defaults are the authors'
    (docs/algorithm.md#constants)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.001
    correction: str = "token"  # one of CORRECTIONS
    logprob_chunk: int = 256  # sequence positions per LM-head chunk
    temperature: float = 1.0  # rollout temperature; log-probs are of logits / temperature

    def __post_init__(self):
        if self.correction not in CORRECTIONS:
            raise ValueError(f"loss.correction must be one of {CORRECTIONS}, got {self.correction!r}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0 (log-probs of a greedy policy are undefined), "
                             f"got {self.temperature}")


def behaviour(batch: dict, alpha, error_rate, correction: str = "token") -> jax.Array:
    """The behaviour log-probs log q of every token (docs/algorithm.md#behaviour-probability): the PPO
    "old" log-probs of the token and sequence corrections; the decoupled correction weights by pi_old / q
    with the token mixture q."""
    old = batch["old_logprobs"]
    mu = probe_mu(old, batch["is_probe"], batch["prompt_mask"], batch["conditionals"], batch["response_start"],
                  batch["probe_start"], error_rate)
    response = batch["valid"] & (jnp.arange(old.shape[1])[None] >= batch["response_start"][:, None])
    if correction == "sequence":
        return sequence_behaviour_logprobs(old, mu, batch["is_probe"], batch["loss_mask"], alpha, response)
    return behaviour_logprobs(old, mu, response, alpha)


def segment_masks(batch: dict) -> dict[str, jax.Array]:
    """Loss-mask tokens split by role: originals; a probe's copied prefix, its exploratory prompt and what
    the policy wrote after it."""
    mask, prompt = batch["loss_mask"], batch["prompt_mask"]
    probe = jnp.asarray(batch["is_probe"], bool)[:, None]
    before = jnp.arange(mask.shape[1])[None] < batch["probe_start"][:, None]
    return {"original": mask & ~probe, "probe_prefix": mask & probe & before & ~prompt,
            "probe_prompt": mask & probe & prompt, "probe_continuation": mask & probe & ~before & ~prompt}


def loss_terms(logprobs: jax.Array, batch: dict, scalars: dict, cfg: LossConfig) -> tuple[jax.Array, dict]:
    """(loss contribution, sums) for one micro-batch.

    `batch`: per-token old_logprobs, ref_logprobs, loss_mask, valid, prompt_mask, conditionals `[m, T]` and
    per-row advantages, is_probe, response_start, probe_start `[m]`. `scalars`: alpha, error_rate and
    total_tokens (loss-mask tokens of the whole mini-batch). `sums` has the SUM_KEYS.
    """
    lq = behaviour(batch, scalars["alpha"], scalars["error_rate"], cfg.correction)
    adv = batch["advantages"][:, None]
    if cfg.correction == "decoupled":
        pg, ratio, clipped = decoupled_surrogate(logprobs, batch["old_logprobs"], lq, adv, cfg.clip_low, cfg.clip_high)
    else:
        pg, ratio, clipped = clipped_surrogate(logprobs, lq, adv, cfg.clip_low, cfg.clip_high)
    kl = k3_kl(logprobs, batch["ref_logprobs"])
    mask = batch["loss_mask"]
    pg_sum, count = masked_sum(pg, mask)
    kl_sum, _ = masked_sum(kl, mask)
    clipped = clipped.astype(jnp.float32)
    sums = {"pg": pg_sum, "kl": kl_sum, "tokens": count,
            "clipped": masked_sum(clipped, mask)[0], "ratio": masked_sum(ratio, mask)[0]}
    for seg, seg_mask in segment_masks(batch).items():
        sums[f"clipped_{seg}"], sums[f"tokens_{seg}"] = masked_sum(clipped, seg_mask)
        sums[f"ratio_{seg}"] = masked_sum(ratio, seg_mask)[0]
    return (pg_sum + cfg.kl_coef * kl_sum) / scalars["total_tokens"], sums

"""The REX-RAG training objective of one micro-batch, from log-probs to (loss, sums) - pure and jit-able.

`loss_terms` turns the policy's token log-probs into the clipped, importance-corrected policy loss plus
the k3 KL penalty, using the behaviour log-probs of `correction` (spec §4). It returns the loss already
divided by the *mini-batch's* token count, so summing it over micro-batches gives the exact token mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from rexrag_jax.rl.correction import behaviour_logprobs, probe_mu, sequence_behaviour_logprobs
from rexrag_jax.rl.losses import clipped_surrogate, k3_kl, masked_sum

CORRECTIONS = ("token", "sequence")


@dataclass(frozen=True)
class LossConfig:
    """Static loss settings (hashable: a jit static argument). Defaults are the authors' (spec §4, §5)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.001
    correction: str = "token"  # "token": per-token mixture as the authors; "sequence": per-sequence
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
    """The PPO "old" log-probs: the mixture behaviour log-prob of every token (spec §4)."""
    old = batch["old_logprobs"]
    mu = probe_mu(old, batch["is_probe"], batch["prompt_mask"], batch["conditionals"], batch["response_start"],
                  batch["probe_start"], error_rate)
    response = batch["valid"] & (jnp.arange(old.shape[1])[None] >= batch["response_start"][:, None])
    if correction == "sequence":
        return sequence_behaviour_logprobs(old, mu, batch["is_probe"], batch["loss_mask"], alpha, response)
    return behaviour_logprobs(old, mu, response, alpha)


def loss_terms(logprobs: jax.Array, batch: dict, scalars: dict, cfg: LossConfig) -> tuple[jax.Array, dict]:
    """(loss contribution, sums) for one micro-batch.

    `batch`: per-token old_logprobs, ref_logprobs, loss_mask, valid, prompt_mask, conditionals `[m, T]` and
    per-row advantages, is_probe, response_start, probe_start `[m]`. `scalars`: alpha, error_rate and
    total_tokens (loss-mask tokens of the whole mini-batch).
    """
    lq = behaviour(batch, scalars["alpha"], scalars["error_rate"], cfg.correction)
    pg, ratio, clipped = clipped_surrogate(logprobs, lq, batch["advantages"][:, None], cfg.clip_low, cfg.clip_high)
    kl = k3_kl(logprobs, batch["ref_logprobs"])
    mask = batch["loss_mask"]
    pg_sum, count = masked_sum(pg, mask)
    kl_sum, _ = masked_sum(kl, mask)
    sums = {"pg": pg_sum, "kl": kl_sum, "tokens": count,
            "clipped": masked_sum(clipped.astype(jnp.float32), mask)[0], "ratio": masked_sum(ratio, mask)[0]}
    return (pg_sum + cfg.kl_coef * kl_sum) / scalars["total_tokens"], sums

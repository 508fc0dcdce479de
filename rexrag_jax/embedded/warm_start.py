"""Supervised warm start: next-token cross-entropy on demonstration trajectories, model tokens only.

The pure loss returns a sum and a token count (like the RL losses); the jitted step averages over the
batch's loss tokens, clips, and applies AdamW with warmup + cosine decay. Batches are padded to a
multiple of `length_multiple`, so a handful of shapes compile once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from rexrag_jax.models.decoder import Decoder
from rexrag_jax.rl.batch import round_up
from rexrag_jax.rl.logprobs import sequence_logprobs
from rexrag_jax.sharding import put


@dataclass(frozen=True)
class WarmStartConfig:
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    length_multiple: int = 64
    logprob_chunk: int = 128
    seed: int = 0


def sft_loss(logprobs: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p over loss tokens, number of loss tokens); `logprobs` aligned with the tokens."""
    mask = loss_mask.astype(jnp.float32)
    return -(logprobs * mask).sum(), mask.sum()


def make_sft_optimizer(cfg: WarmStartConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                                  max(cfg.steps, cfg.warmup_steps + 1), cfg.learning_rate * 0.05)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm),
                       optax.adamw(schedule, weight_decay=cfg.weight_decay))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"), donate_argnums=(1, 2))
def _sft_step(graphdef, params, opt_state, tokens, valid, loss_mask, *, cfg: WarmStartConfig):
    def loss_fn(p):
        logp, _ = sequence_logprobs(nnx.merge(graphdef, p), tokens, valid, chunk=cfg.logprob_chunk)
        total, count = sft_loss(logp, loss_mask)
        return total / jnp.maximum(count, 1.0), count

    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = make_sft_optimizer(cfg).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, "tokens": count,
                                                             "grad_norm": optax.tree.norm(grads)}


def pad_batch(rows: Sequence[tuple[list[int], list[bool]]], length_multiple: int, pad_id: int):
    """`tokens, valid, loss_mask` `[B, T]` with T the longest row rounded up to `length_multiple`."""
    t = round_up(max(len(tok) for tok, _ in rows), length_multiple)
    tokens = np.full((len(rows), t), pad_id, np.int32)
    valid = np.zeros((len(rows), t), bool)
    mask = np.zeros((len(rows), t), bool)
    for i, (tok, m) in enumerate(rows):
        tokens[i, : len(tok)], valid[i, : len(tok)], mask[i, : len(m)] = tok, True, m
    return tokens, valid, mask


def train_warm_start(model: Decoder, rows: Sequence[tuple[list[int], list[bool]]], cfg: WarmStartConfig, *,
                     pad_id: int, progress: bool = True) -> list[dict]:
    """Fit `model` (in place) to the encoded demonstrations `rows` (tokens, loss mask); returns per-step
    metrics. Batches are drawn by shuffled epochs of `cfg.seed`, sorted by length within a window so
    short and long demonstrations do not share a padded batch."""
    if not rows:
        raise ValueError("warm start needs at least one demonstration")
    mesh = model.mesh
    graphdef, params = nnx.split(model)
    tx = make_sft_optimizer(cfg)
    opt_state = jax.jit(tx.init)(params)
    rng = np.random.default_rng([cfg.seed, 5])
    order: list[int] = []
    history = []
    bar = tqdm(range(cfg.steps), desc="warm start (SFT)", unit="step", disable=not progress)
    for step in bar:
        if len(order) < cfg.batch_size:
            perm = rng.permutation(len(rows))
            window = cfg.batch_size * 8  # length-sort within windows of 8 batches, then shuffle the batches
            chunks = [sorted(perm[i: i + window], key=lambda j: len(rows[j][0])) for i in range(0, len(perm), window)]
            batches = [c[i: i + cfg.batch_size] for c in chunks for i in range(0, len(c), cfg.batch_size)]
            batches = [b for b in batches if len(b) == cfg.batch_size]
            order += [j for k in rng.permutation(len(batches)) for j in batches[k]]
        picked, order = order[: cfg.batch_size], order[cfg.batch_size:]
        arrays = pad_batch([rows[j] for j in picked], cfg.length_multiple, pad_id)
        tokens, valid, mask = (put(x, ("batch", "length"), mesh) for x in arrays)
        params, opt_state, m = _sft_step(graphdef, params, opt_state, tokens, valid, mask, cfg=cfg)
        if step % 10 == 0 or step == cfg.steps - 1:
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            history.append({"step": step + 1, **m})
            bar.set_postfix(loss=f"{m['loss']:.3f}")
    nnx.update(model, params)
    return history

"""Supervised warm start: next-token cross-entropy on demonstration trajectories, model tokens only.

Each step is the training update (`rl.update`) with the SFT objective: the batch's loss tokens averaged,
gradients clipped, AdamW with warmup + cosine decay. Batches are padded to a multiple of
`length_multiple`, so a handful of shapes compile once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from rexrag_jax.config import OptimConfig
from rexrag_jax.models.decoder import Decoder
from rexrag_jax.rl.batch import TrainBatch, round_up
from rexrag_jax.rl.objective import SFTObjective
from rexrag_jax.rl.update import init_optimizer, update


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


def lr_schedule(cfg: WarmStartConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate`, cosine decay to 5% of it at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1), cfg.learning_rate * 0.05
    )


def optim_config(cfg: WarmStartConfig) -> OptimConfig:
    """AdamW's moments, decay and clip as the RL run's optimizer has them (the rate follows `lr_schedule`)."""
    return OptimConfig(
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
    )


def pad_batch(rows: Sequence[tuple[list[int], list[bool]]], length_multiple: int, pad_id: int):
    """`tokens, valid, loss_mask` `[B, T]` with T the longest row rounded up to `length_multiple`."""
    t = round_up(max(len(tok) for tok, _ in rows), length_multiple)
    tokens = np.full((len(rows), t), pad_id, np.int32)
    valid = np.zeros((len(rows), t), bool)
    mask = np.zeros((len(rows), t), bool)
    for i, (tok, m) in enumerate(rows):
        tokens[i, : len(tok)], valid[i, : len(tok)], mask[i, : len(m)] = tok, True, m
    return tokens, valid, mask


def train_warm_start(
    model: Decoder,
    rows: Sequence[tuple[list[int], list[bool]]],
    cfg: WarmStartConfig,
    *,
    pad_id: int,
    progress: bool = True,
) -> list[dict]:
    """Fit `model` (in place) to the encoded demonstrations `rows` (tokens, loss mask); returns per-step
    metrics. Batches are drawn by shuffled epochs of `cfg.seed`, sorted by length within a window so
    short and long demonstrations do not share a padded batch."""
    if not rows:
        raise ValueError("warm start needs at least one demonstration")
    mesh = model.mesh
    graphdef, params = nnx.split(model)
    optim = optim_config(cfg)
    opt_state = init_optimizer(optim, params)
    schedule = jax.jit(lr_schedule(cfg))
    rng = np.random.default_rng([cfg.seed, 5])
    order: list[int] = []
    history = []
    bar = tqdm(range(cfg.steps), desc="warm start (SFT)", unit="step", disable=not progress)
    for step in bar:
        if len(order) < cfg.batch_size:
            perm = rng.permutation(len(rows))
            window = cfg.batch_size * 8  # length-sort within windows of 8 batches, then shuffle the batches
            chunks = [sorted(perm[i : i + window], key=lambda j: len(rows[j][0])) for i in range(0, len(perm), window)]
            batches = [c[i : i + cfg.batch_size] for c in chunks for i in range(0, len(c), cfg.batch_size)]
            batches = [b for b in batches if len(b) == cfg.batch_size]
            order += [j for k in rng.permutation(len(batches)) for j in batches[k]]
        picked, order = order[: cfg.batch_size], order[cfg.batch_size :]
        tokens, valid, mask = pad_batch([rows[j] for j in picked], cfg.length_multiple, pad_id)
        lr = float(schedule(jnp.int32(step)))
        params, opt_state, m = update(
            graphdef,
            params,
            opt_state,
            TrainBatch(tokens, valid, mask),
            lr=lr,
            mesh=mesh,
            micro_rows=len(tokens),
            objective=SFTObjective(),
            optim_cfg=optim,
            chunk=cfg.logprob_chunk,
        )
        if step % 10 == 0 or step == cfg.steps - 1:
            m = {k: float(jax.device_get(m[k])) for k in ("loss", "tokens", "grad_norm")}
            history.append({"step": step + 1, **m})
            bar.set_postfix(loss=f"{m['loss']:.3f}")
    nnx.update(model, params)
    return history

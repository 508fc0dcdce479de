"""Jitted kernels of a training step: batched log-probs and the one sharded, accumulated update.

Module-level functions over explicit state (graphdef static, parameters and optimizer state donated),
with a thin host wrapper each. The update scans over micro-batches of a `TrainBatch`, accumulating
gradients and the objective's sums (the RL loss or the SFT loss, `rl.objective`), then clips by global
norm and applies AdamW with the learning rate the caller gives (the RL run's warmup follows the
*training* step); a non-finite gradient norm leaves parameters and optimizer state untouched and is
reported.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rexrag_jax.config import OptimConfig
from rexrag_jax.distributed import tree_to_host
from rexrag_jax.rl.batch import TrainBatch
from rexrag_jax.rl.logprobs import sequence_logprobs
from rexrag_jax.rl.objective import RLObjective, SFTObjective
from rexrag_jax.sharding import put

Objective = RLObjective | SFTObjective


def learning_rate(cfg: OptimConfig, step) -> jax.Array:
    """The RL run's schedule (docs/algorithm.md#training-step): lr(step) = peak * min(1, step / warmup) for
    the 0-based training step (verl's LambdaLR: step 0 has 0)."""
    if cfg.warmup_steps <= 0:
        return jnp.asarray(cfg.learning_rate, jnp.float32)
    return cfg.learning_rate * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / cfg.warmup_steps)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Clip, Adam moments, decoupled weight decay; the caller scales by -lr (so lr follows the training step)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.scale_by_adam(cfg.b1, cfg.b2, cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay),
    )


def init_optimizer(cfg: OptimConfig, params):
    """Optimizer state with every moment sharded like its parameter (scalars replicated)."""
    tx = make_optimizer(cfg)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    mesh = next((s.mesh for s in jax.tree.leaves(param_shardings) if isinstance(s, NamedSharding)), None)
    if mesh is None:
        return jax.jit(tx.init)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, params), param_shardings, transform_non_params=lambda _: replicated
    )
    return jax.jit(tx.init, out_shardings=shardings)(params)


# ---------------------------------------------------------------------------- log-probs


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "temperature", "with_entropy"))
def _logprob_kernel(graphdef, params, tokens, valid, *, chunk, temperature, with_entropy):
    return sequence_logprobs(
        nnx.merge(graphdef, params), tokens, valid, chunk=chunk, temperature=temperature, with_entropy=with_entropy
    )


def batch_logprobs(
    graphdef,
    params,
    batch: TrainBatch,
    *,
    rows: int,
    mesh: Mesh | None,
    chunk: int = 256,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Token log-probs (and entropies) of every row of `batch` under `params`, `rows` rows per call."""
    n, t = batch.tokens.shape
    if n % rows:
        raise ValueError(f"batch has {n} rows, not a multiple of {rows}")
    outs = []
    for start in range(0, n, rows):  # dispatch every chunk before reading any back
        part = batch.rows(start, start + rows)
        tokens, valid = (put(x, ("batch", "length"), mesh) for x in (part.tokens, part.valid))
        outs.append(
            _logprob_kernel(
                graphdef, params, tokens, valid, chunk=chunk, temperature=temperature, with_entropy=with_entropy
            )
        )
    outs = tree_to_host(outs)  # every process gets all rows (multi-host)
    return (
        np.concatenate([lp for lp, _ in outs]).reshape(n, t).astype(np.float32),
        np.concatenate([en for _, en in outs]).reshape(n, t).astype(np.float32),
    )


# ---------------------------------------------------------------------------- update


@functools.partial(
    jax.jit, static_argnames=("graphdef", "objective", "optim_cfg", "chunk", "temperature"), donate_argnums=(1, 2)
)
def _update_kernel(
    graphdef,
    params,
    opt_state,
    micro: TrainBatch,
    scalars,
    *,
    objective: Objective,
    optim_cfg: OptimConfig,
    chunk: int,
    temperature: float,
):
    def micro_loss(p, mb):
        logp, _ = sequence_logprobs(nnx.merge(graphdef, p), mb.tokens, mb.valid, chunk=chunk, temperature=temperature)
        return objective.terms(logp, mb, scalars)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def body(carry, mb):
        grads, sums = carry
        (_, s), g = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    zero_sums = {k: jnp.zeros((), jnp.float32) for k in objective.sum_keys}
    (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), micro)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(grad_norm)
    updates, new_opt = make_optimizer(optim_cfg).update(grads, opt_state, params)
    lr = scalars["lr"]
    new_params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)
    keep = lambda new, old: jnp.where(finite, new, old)
    params = jax.tree.map(keep, new_params, params)
    opt_state = jax.tree.map(keep, new_opt, opt_state)
    metrics = {**objective.metrics(sums), "grad_norm": grad_norm, "skipped": 1.0 - finite.astype(jnp.float32)}
    return params, opt_state, metrics


def update(
    graphdef,
    params,
    opt_state,
    batch: TrainBatch,
    *,
    micro_rows: int,
    lr: float,
    mesh: Mesh | None,
    objective: Objective,
    optim_cfg: OptimConfig,
    chunk: int = 256,
    temperature: float = 1.0,
    alpha: float = 0.0,
    error_rate: float = 0.0,
):
    """One optimizer update on a mini-batch of M rows (M a multiple of `micro_rows`), of the RL or the SFT
    objective; `alpha` / `error_rate` are the RL policy correction's mixture statistics. Log-probs are of
    logits / `temperature` in LM-head chunks of `chunk` positions. Returns new (params, opt_state) and a
    dict of metrics (device scalars)."""
    m = batch.tokens.shape[0]
    if m % micro_rows:
        raise ValueError(f"mini-batch has {m} rows, not a multiple of micro_rows={micro_rows}")
    n = m // micro_rows

    def to_micro(x):
        x = np.asarray(x).reshape(n, micro_rows, *np.shape(x)[1:])
        return put(x, (None, "batch", "length")[: x.ndim], mesh)

    micro = jax.tree.map(to_micro, batch.replace(num_rows=m))  # num_rows is static: one compile per shape
    scalars = {
        "alpha": jnp.float32(alpha),
        "error_rate": jnp.float32(error_rate),
        "lr": jnp.float32(lr),
        "total_tokens": jnp.float32(max(float(np.sum(batch.loss_mask)), 1.0)),
    }
    return _update_kernel(
        graphdef,
        params,
        opt_state,
        micro,
        scalars,
        objective=objective,
        optim_cfg=optim_cfg,
        chunk=chunk,
        temperature=temperature,
    )

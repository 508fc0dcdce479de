"""Token log-probs (and entropies) from final hidden states, computed in chunks along the sequence.

With V = 151936, fp32 logits of a whole `[B, T, V]` batch are the largest tensor of the update by far.
Here the LM head runs on `chunk` positions at a time under `jax.checkpoint`, so neither the forward nor
the backward pass ever holds more than `[B, chunk, V]` logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rexrag_jax.sharding import constrain


def _chunk_stats(hidden, weight, targets, temperature, with_entropy: bool, mesh):
    logits = jnp.einsum("btd,vd->btv", hidden, weight, preferred_element_type=jnp.float32) / temperature
    logits = constrain(logits, ("batch", "length", "act_vocab"), mesh)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logp = picked - lse
    if not with_entropy:
        return logp, jnp.zeros_like(logp)
    probs = jax.nn.softmax(logits, axis=-1)
    return logp, lse - jnp.sum(probs * logits, axis=-1)


def chunked_logprobs(
    hidden: jax.Array,
    head_weight: jax.Array,
    targets: jax.Array,
    *,
    chunk: int = 256,
    temperature: float = 1.0,
    with_entropy: bool = False,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, jax.Array]:
    """log softmax(h W^T / T)[target] for hidden `[B, T, H]`, head `[V, H]`, targets `[B, T]`.

    Returns (logprobs, entropies) `[B, T]` fp32 (entropies are zeros unless `with_entropy`).
    """
    b, t, _ = hidden.shape
    chunk = max(1, min(chunk, t))
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, n, chunk, -1).swapaxes(0, 1)
    ts = targets.reshape(b, n, chunk).swapaxes(0, 1)
    weight = head_weight.astype(hidden.dtype)

    @jax.checkpoint
    def body(_, xs):
        h, tgt = xs
        return None, _chunk_stats(h, weight, tgt, temperature, with_entropy, mesh)

    _, (logp, ent) = jax.lax.scan(body, None, (hs, ts))
    logp = logp.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    ent = ent.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    return logp, ent


def sequence_logprobs(
    model,
    tokens: jax.Array,
    attention_mask: jax.Array,
    *,
    chunk: int = 256,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Log-prob of each token given the ones before it, aligned with `tokens [B, T]` (column 0 is 0).

    `model` is a `Decoder`; padding is right of each row and masked by `attention_mask`.
    """
    hidden = model.hidden_states(tokens[:, :-1], attention_mask[:, :-1])
    logp, ent = chunked_logprobs(
        hidden,
        model.head_weight(),
        tokens[:, 1:],
        chunk=chunk,
        temperature=temperature,
        with_entropy=with_entropy,
        mesh=model.mesh,
    )
    zero = jnp.zeros((tokens.shape[0], 1), jnp.float32)
    return jnp.concatenate([zero, logp], axis=1), jnp.concatenate([zero, ent], axis=1)

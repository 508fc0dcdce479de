"""Per-row token sampling: temperature, top-p and top-k are traced `[B]` arrays, so changing them never
recompiles. Temperature 0 is greedy. Pure and jit-able."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(scaled: jax.Array, top_p: jax.Array, top_k: jax.Array) -> jax.Array:
    """Set logits outside each row's top-k / nucleus (top-p) set to -inf.

    `scaled [B, V]` are temperature-scaled logits; `top_k <= 0` keeps every token, `top_p >= 1` keeps the
    whole distribution. The nucleus is the smallest set of most likely tokens whose mass reaches `top_p`
    (the token that crosses the threshold is kept), as in HF's `TopPLogitsWarper` and vLLM.
    """
    vocab = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    rank = jnp.arange(vocab)[None]
    keep = (mass_before < top_p[:, None]) & ((top_k[:, None] <= 0) | (rank < top_k[:, None]))
    keep = keep.at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample_tokens(
    logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Sample one token per row from fp32 `logits [B, V]` with per-row PRNG `keys [B]`.

    Returns `(tokens [B] int32, logprobs [B] f32)`. The logprob is the token's log-probability under the
    temperature-scaled, *unfiltered* distribution (temperature 1 for greedy rows): what the trainer
    recomputes for PPO's old policy. The vocab sort for top-p/top-k runs only when some sampling row
    asks for it.
    """
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 0.0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]

    def draw(scaled):
        needs_filter = jnp.any(~greedy & ((top_p < 1.0) | (top_k > 0)))
        filtered = jax.lax.cond(needs_filter, filter_logits, lambda s, p, k: s, scaled, top_p, top_k)
        return inverse_cdf_sample(keys, filtered)

    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = jax.lax.cond(jnp.all(greedy), lambda s: argmax, draw, scaled)  # all-greedy batches skip it
    tokens = jnp.where(greedy, argmax, sampled)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs


def inverse_cdf_sample(keys: jax.Array, logits: jax.Array) -> jax.Array:
    """One categorical draw per row from one uniform per row: the first token whose cumulative
    probability reaches u. Same law as Gumbel-max, but it needs B random numbers instead of B x V (on
    CPU the vocab-sized random draw costs more than the LM head)."""
    probs = jax.nn.softmax(logits, axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys) * cdf[:, -1]
    token = jnp.sum(cdf <= u[:, None], axis=-1)  # cdf is flat over zero-probability tokens: never chosen
    return jnp.minimum(token, logits.shape[-1] - 1).astype(jnp.int32)


def row_keys(seed: int, num_rows: int) -> jax.Array:
    """Independent per-row PRNG keys: row r gets `fold_in(key(seed), r)`."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.arange(num_rows))


def split_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(carry, use) keys for one sampling step, per row."""
    both = jax.vmap(jax.random.split)(keys)
    return both[:, 0], both[:, 1]

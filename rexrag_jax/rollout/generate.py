"""`generate`: batched KV-cache decoding of token prompts (the public, protocol-free entry point)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


from rexrag_jax.models.decoder import Decoder
from rexrag_jax.rollout.session import DecodeSession, pow2_bucket
from rexrag_jax.rollout.stops import build_stop_table


@dataclass
class GenerateResult:
    """Per row: the new tokens (through the stop sequence or EOS, or up to the budget) and their logprobs."""

    tokens: list[list[int]]
    logprobs: list[list[float]]


def _rows_multiple(model: Decoder) -> int:
    mesh = model.mesh
    return 1 if mesh is None else int(mesh.shape["data"] * mesh.shape["fsdp"])


def generate(
    model: Decoder,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[list[int]] | None = None,
    seed: int = 0,
) -> GenerateResult:
    """Decode up to `max_new_tokens` after each prompt; temperature 0 is greedy (equal to transformers'
    `generate(do_sample=False)`). A row ends after any `stop` token sequence or an EOS id of
    `model.config`; both are included in its tokens. Rows are sharded over the model's mesh."""
    config = model.config
    if not prompts:
        raise ValueError("generate: prompts is empty")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"generate: prompt {i} is empty")
        bad = [t for t in p if not 0 <= int(t) < config.vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids outside [0, {config.vocab_size}): {bad[:5]}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    stops = build_stop_table(config.vocab_size, [*(stop or []), *([e] for e in config.eos_token_id)])

    multiple = _rows_multiple(model)
    num_rows = max(pow2_bucket(len(prompts)), multiple)
    num_rows = -(-num_rows // multiple) * multiple
    longest = max(len(p) for p in prompts)
    max_length = pow2_bucket(longest + max_new_tokens, 128)
    session = DecodeSession(model, num_rows, max_length, stops, seed=seed, chunk=min(64, pow2_bucket(max_new_tokens)))
    session.set_sampling(temperature, top_p)
    rows = list(range(len(prompts)))
    for r, p in zip(rows, prompts):
        session.context[r] = [int(t) for t in p]
    session.commit(rows, [max_new_tokens] * len(rows), [True] * len(rows))

    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    live = set(rows)
    while live:
        for r, out in session.decode().items():
            tokens[r].extend(out.tokens)
            logprobs[r].extend(out.logprobs)
            if out.ended:
                live.discard(r)
    return GenerateResult(tokens, logprobs)

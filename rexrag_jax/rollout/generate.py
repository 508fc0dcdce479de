"""`generate`: batched KV-cache decoding of token prompts (the public, protocol-free entry point)."""

from __future__ import annotations

from dataclasses import dataclass

from rexrag_jax.models.decoder import Decoder
from rexrag_jax.rollout.session import DecodeSession, check_prompts, pow2_bucket
from rexrag_jax.rollout.stops import build_stop_table
from rexrag_jax.sharding import batch_shards


@dataclass
class GenerateResult:
    """Per row: the new tokens (through the stop sequence or EOS, or up to the budget) and their logprobs."""

    tokens: list[list[int]]
    logprobs: list[list[float]]


def generate(
    model: Decoder,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[list[int]] | None = None,
    seed: int = 0,
    page_size: int | None = None,
) -> GenerateResult:
    """Decode up to `max_new_tokens` after each prompt; temperature 0 is greedy (equal to transformers'
    `generate(do_sample=False)`). A row ends after any `stop` token sequence or an EOS id of
    `model.config`; both are included in its tokens. Rows are sharded over the model's mesh. `page_size`:
    tokens per KV cache page (default: a contiguous cache, one page per row)."""
    config = model.config
    if not prompts:
        raise ValueError("generate: prompts is empty")
    check_prompts(prompts, config.vocab_size, "generate")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    stops = build_stop_table(config.vocab_size, [*(stop or []), *([e] for e in config.eos_token_id)])

    multiple = batch_shards(model.mesh)
    num_rows = max(pow2_bucket(len(prompts)), multiple)
    num_rows = -(-num_rows // multiple) * multiple
    longest = max(len(p) for p in prompts)
    max_length = pow2_bucket(longest + max_new_tokens, 128)
    chunk = min(64, pow2_bucket(max_new_tokens))
    session = DecodeSession(model, num_rows, max_length, stops, seed=seed, chunk=chunk, page_size=page_size)
    session.set_sampling(temperature, top_p)
    rows = list(range(len(prompts)))
    for r, p in zip(rows, prompts):
        session.context[r] = [int(t) for t in p]
    session.commit(rows, [max_new_tokens] * len(rows), [True] * len(rows))

    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    live = set(rows)
    while live:
        results = session.decode()
        if not results:  # every row has its pages: a row that cannot decode is a bug, not a wait
            raise RuntimeError(f"generate: rows {sorted(live)[:8]} stopped decoding before their end")
        for r, out in results.items():
            tokens[r].extend(out.tokens)
            logprobs[r].extend(out.logprobs)
            if out.ended:
                live.discard(r)
    return GenerateResult(tokens, logprobs)

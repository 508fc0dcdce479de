"""Greedy decode throughput of Tunix's vanilla sampler, as a peer for our own decode benchmark.

Why it exists: to put our sampler's tokens/s next to Tunix's (PyPI `google-tunix`) on the same model
config, batch, prompt length, generated length and thread count. Tunix pins other library versions
than ours, so this runs in its own venv (benchmarks/setup_tunix_venv.sh) and is called as a
subprocess; the last stdout line is one JSON object.

What it measures: `tunix.models.qwen2.model.Qwen2` with random fp32 weights, driven by
`tunix.generate.sampler.Sampler` (greedy: temperature 0, no top_p). `batch` prompts of exactly
`prompt_len` random ids (no padding, no BOS), `new_tokens` generated per row: EOS is an id the model
can never emit (vocab_size + 1) and the pad id is vocab_size, so no row stops early and no generated
token is masked as padding. The KV cache holds exactly prompt_len + new_tokens positions. One untimed
warm-up call (its wall time, compile + one run, is `compile_s`), then `repeats` timed calls of the
whole `Sampler.__call__` (string "tokenization" of ids, prefill, the decode while_loop, host copy):
tokens_per_s = batch * new_tokens / median call time.

Threads: XLA:CPU has no thread-count flag (`intra_op_parallelism_threads` is a TensorFlow option and
XLA_FLAGS rejects unknown flags); it sizes its pools from the visible cores. As in
benchmarks/model_throughput.py, --threads N < cpu count pins the process to N cores with
os.sched_setaffinity before jax is imported.

Run: .venv-tunix/bin/python benchmarks/tunix_decode.py [--batch 8 --new-tokens 128 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [
        ("vocab", 151936),
        ("hidden", 256),
        ("layers", 4),
        ("heads", 8),
        ("kv-heads", 2),
        ("head-dim", 32),
        ("intermediate", 1024),
        ("batch", 8),
        ("prompt-len", 64),
        ("new-tokens", 128),
        ("repeats", 3),
        ("threads", 2),
        ("seed", 0),
    ]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--norm-eps", type=float, default=1e-6)
    p.add_argument("--tie-embeddings", action="store_true", help="share embedding and LM head")
    return p.parse_args()


class IdTokenizer:
    """The duck-typed tokenizer Tunix's TokenizerAdapter accepts: prompts are space-separated ids."""

    def __init__(self, vocab_size: int) -> None:
        self._pad, self._eos = vocab_size, vocab_size + 1  # ids the model can never produce

    def encode(self, text: str, **_: object) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids: list[int], **_: object) -> str:
        return " ".join(map(str, ids))

    def bos_id(self) -> None:  # falsy: Sampler.tokenize prepends no BOS
        return None

    def eos_id(self) -> int:
        return self._eos

    def pad_id(self) -> int:
        return self._pad


def main() -> None:
    args = parse_args()
    if args.threads < (os.cpu_count() or 1):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax
    import jax.numpy as jnp
    import numpy as np
    import tunix
    from flax import nnx
    from tunix.generate.sampler import CacheConfig, Sampler
    from tunix.models.qwen2.model import ModelConfig, Qwen2

    cfg = ModelConfig(
        num_layers=args.layers,
        vocab_size=args.vocab,
        embed_dim=args.hidden,
        hidden_dim=args.intermediate,
        num_heads=args.heads,
        head_dim=args.head_dim,
        num_kv_heads=args.kv_heads,
        rope_theta=args.rope_theta,
        norm_eps=args.norm_eps,
        use_tied_embedding=args.tie_embeddings,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )
    model = Qwen2(cfg, rngs=nnx.Rngs(args.seed))
    tok = IdTokenizer(args.vocab)
    sampler = Sampler(
        model,
        tok,
        CacheConfig(
            cache_size=args.prompt_len + args.new_tokens,
            num_layers=args.layers,
            num_kv_heads=args.kv_heads,
            head_dim=args.head_dim,
        ),
    )
    ids = np.random.default_rng(args.seed).integers(0, args.vocab, (args.batch, args.prompt_len))
    prompts = [tok.decode(row.tolist()) for row in ids]

    def call() -> float:
        t0 = time.perf_counter()
        out = sampler(
            prompts,
            max_generation_steps=args.new_tokens,
            max_prompt_length=args.prompt_len,
            temperature=0.0,
            eos_tokens=[tok.eos_id()],
        )
        dt = time.perf_counter() - t0  # the call ends with a device_get of the token buffer
        lens = {len(t) for t in out.tokens}
        assert lens == {args.new_tokens}, f"generated lengths {lens} != {args.new_tokens}"
        return dt

    compile_s = call()
    times = [call() for _ in range(args.repeats)]
    med = statistics.median(times)
    print(f"tunix decode: calls {[f'{t:.3f}' for t in times]} s", file=sys.stderr)
    print(
        json.dumps(
            {
                "impl": "tunix",
                "tunix_version": tunix.__version__,
                "jax_version": jax.__version__,
                "tokens_per_s": round(args.batch * args.new_tokens / med, 2),
                "median_s": round(med, 4),
                "compile_s": round(compile_s, 3),
                "batch": args.batch,
                "new_tokens": args.new_tokens,
                "prompt_len": args.prompt_len,
                "threads": len(os.sched_getaffinity(0)),
            }
        )
    )


if __name__ == "__main__":
    main()

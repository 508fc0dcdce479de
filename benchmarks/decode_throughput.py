"""Decode throughput: our `rexrag_jax.rollout.generate` vs transformers' PyTorch `generate` and Tunix's
vanilla sampler, plus batch-1 decode as a fraction of the machine's memory-bandwidth bound.

Same model config (Qwen2 architecture, random fp32 weights, by default the Qwen2.5 vocabulary), batch,
prompt length, generated length and thread count for all three. Each call is timed whole: prefill,
decode loop and the host copy of the tokens, greedy, exactly `--new-tokens` per row (EOS disabled).
Median of `--repeats` calls after one untimed warm-up (compile). Ours and torch share the same weights
(a transformers checkpoint loaded with `load_hf`); Tunix builds its own random model with the same
config (speed does not depend on the values) and runs in its own venv as a subprocess
(benchmarks/setup_tunix_venv.sh); without that venv its row is skipped with a note.

Bandwidth bound (batch 1): a decode step must read every weight except the embedding table (one row)
plus the KV cache so far. The bound is bytes / bandwidth, with the bandwidth measured in this run as
the best of a jitted XLA reduction and a numpy reduction over a 1 GiB buffer (read-only streams).
The fraction is bound time / measured time per token (1.0 = at the bound).

Run:  .venv/bin/python benchmarks/decode_throughput.py [--tunix-python .venv-tunix/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
        ("threads", os.cpu_count() or 1),
        ("batch1-tokens", 256),
        ("page-size", 0),
    ]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--tunix-python", default=os.path.join(ROOT, ".venv-tunix", "bin", "python"))
    p.add_argument("--skip", default="", help="comma list of parts to skip: torch,tunix,batch1")
    p.add_argument("--json", default="", help="also write the results here")
    return p.parse_args()


def pin_threads(threads: int) -> None:
    """XLA:CPU sizes its pool from the visible cores: pin the process (before jax is imported)."""
    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])


def median_call(fn, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def build_checkpoint(args, path: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        eos_token_id=None,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def bench_ours(path: str, prompts: list[list[int]], args) -> dict:
    import dataclasses

    from rexrag_jax.models import load_hf
    from rexrag_jax.rollout.generate import generate

    model, config = load_hf(path)
    model.config = dataclasses.replace(config, eos_token_id=())  # no EOS: every row decodes its budget

    def call():
        out = generate(model, prompts, max_new_tokens=args.new_tokens, page_size=args.page_size or None)
        assert {len(t) for t in out.tokens} == {args.new_tokens}

    med, first = median_call(call, args.repeats)
    return {"impl": "ours", "tokens_per_s": args.batch * args.new_tokens / med, "median_s": med, "first_call_s": first}


def bench_torch(model, prompts: list[list[int]], args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    ids = torch.tensor(prompts)

    def call():
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] == args.prompt_len + args.new_tokens

    med, first = median_call(call, args.repeats)
    return {
        "impl": "transformers",
        "tokens_per_s": args.batch * args.new_tokens / med,
        "median_s": med,
        "first_call_s": first,
        "torch_version": torch.__version__,
    }


def bench_tunix(args) -> dict:
    if not os.path.exists(args.tunix_python):
        return {
            "impl": "tunix",
            "skipped": f"no Tunix venv at {args.tunix_python}: bash benchmarks/setup_tunix_venv.sh",
        }
    cmd = [args.tunix_python, os.path.join(ROOT, "benchmarks", "tunix_decode.py")]
    for name in (
        "vocab",
        "hidden",
        "layers",
        "heads",
        "kv_heads",
        "head_dim",
        "intermediate",
        "batch",
        "prompt_len",
        "new_tokens",
        "repeats",
        "threads",
    ):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
    if run.returncode:
        return {"impl": "tunix", "skipped": f"tunix_decode.py failed: {run.stderr[-2000:]}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def measure_bandwidth() -> dict:
    import jax
    import jax.numpy as jnp

    n = 1 << 28  # 1 GiB of fp32
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(x))
    xla = min(_timed(lambda: jax.block_until_ready(total(x))) for _ in range(5))
    y = np.ones((n,), np.float32)
    npy = min(_timed(lambda: y.sum()) for _ in range(5))
    return {
        "bytes": 4 * n,
        "xla_gb_s": 4 * n / xla / 1e9,
        "numpy_gb_s": 4 * n / npy / 1e9,
        "bound_gb_s": 4 * n / min(xla, npy) / 1e9,
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_batch1(path: str, args, bandwidth: dict) -> dict:
    import dataclasses

    import jax

    from rexrag_jax.models import load_hf
    from rexrag_jax.rollout import DecodeSession, build_stop_table

    model, config = load_hf(path)
    model.config = dataclasses.replace(config, eos_token_id=())
    steps = args.batch1_tokens
    session = DecodeSession(model, 1, args.prompt_len + steps + 64, build_stop_table(config.vocab_size), chunk=64)
    session.warmup()
    prompt = np.random.default_rng(1).integers(0, config.vocab_size, args.prompt_len).tolist()
    session.context[0] = prompt
    session.commit([0], [steps], [True])
    jax.block_until_ready(session.state)
    t0 = time.perf_counter()
    produced = 0
    while produced < steps:
        produced += len(session.decode()[0].tokens)
    per_token = (time.perf_counter() - t0) / steps
    params = sum(x.size for x in jax.tree.leaves(nnx_state(model)))
    weight_bytes = 4 * (params - config.vocab_size * config.hidden_size + config.hidden_size)  # one embedding row
    mean_len = args.prompt_len + steps / 2
    kv_bytes = 4 * 2 * config.num_layers * mean_len * config.num_kv_heads * config.head_dim
    bound = (weight_bytes + kv_bytes) / (bandwidth["bound_gb_s"] * 1e9)
    return {
        "ms_per_token": 1e3 * per_token,
        "bytes_per_token": weight_bytes + kv_bytes,
        "bound_ms_per_token": 1e3 * bound,
        "fraction_of_bound": bound / per_token,
    }


def nnx_state(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def main() -> None:
    args = parse_args()
    pin_threads(args.threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    skip = set(filter(None, args.skip.split(",")))
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, args.vocab, (args.batch, args.prompt_len)).tolist()
    results: dict = {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "skip", "tunix_python")},
        "visible_cores": len(os.sched_getaffinity(0)),
    }
    with tempfile.TemporaryDirectory() as path:
        torch_model = build_checkpoint(args, path)
        results["ours"] = bench_ours(path, prompts, args)
        print(json.dumps(results["ours"]), flush=True)
        if "torch" not in skip:
            results["transformers"] = bench_torch(torch_model, prompts, args)
            print(json.dumps(results["transformers"]), flush=True)
        if "tunix" not in skip:
            results["tunix"] = bench_tunix(args)
            print(json.dumps(results["tunix"]), flush=True)
        if "batch1" not in skip:
            results["bandwidth"] = measure_bandwidth()
            results["batch1"] = bench_batch1(path, args, results["bandwidth"])
            print(json.dumps({"bandwidth": results["bandwidth"], "batch1": results["batch1"]}), flush=True)
    ours = results["ours"]["tokens_per_s"]
    for peer in ("transformers", "tunix"):
        if "tokens_per_s" in results.get(peer, {}):
            results[f"ratio_vs_{peer}"] = ours / results[peer]["tokens_per_s"]
    print(
        f"\ndecode tokens/s  batch {args.batch}, prompt {args.prompt_len}, new {args.new_tokens}, "
        f"{results['visible_cores']} cores"
    )
    for peer in ("ours", "transformers", "tunix"):
        r = results.get(peer)
        if r:
            print(f"  {peer:13s} " + (f"{r['tokens_per_s']:9.1f}" if "tokens_per_s" in r else r.get("skipped", "")))
    for peer in ("transformers", "tunix"):
        if f"ratio_vs_{peer}" in results:
            print(f"  ours / {peer}: {results[f'ratio_vs_{peer}']:.2f}x")
    if "batch1" in results:
        b = results["batch1"]
        print(
            f"batch-1: {b['ms_per_token']:.2f} ms/token, bound {b['bound_ms_per_token']:.2f} ms "
            f"({results['bandwidth']['bound_gb_s']:.1f} GB/s) -> {b['fraction_of_bound']:.2f} of the bound"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())

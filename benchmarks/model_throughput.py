"""Training-step throughput of our JAX decoder vs. the PyTorch reference (transformers' Qwen2ForCausalLM).

What it measures, for the same config, batch, sequence length and thread count in both frameworks:
  * one forward+backward step of mean next-token cross-entropy computed from full fp32 logits
    (labels = ids shifted by one; no optimizer update);
  * ours: `jax.jit(jax.value_and_grad(...))` over `nnx.merge(graphdef, state)`; compile time is
    `.lower(...)` + `.compile()` (reported separately); steady state is the median of --steps timed
    steps after --warmup untimed ones, each ended by `jax.block_until_ready`;
  * torch: eager `loss.backward()` per step (grads set to None between steps), sdpa attention; its
    "compile" time is the first step (eager has no compile), or with --torch-compile the first step of
    `torch.compile(model)`;
  * tokens/s = batch * seq / median step time, the ratio ours/torch, and an *estimated* model FLOP/s of
    6 * N * tokens with N = non-embedding params + LM head (ignores attention scores and remat recompute).

--dtype bfloat16 is mixed precision in both: fp32 parameters, bf16 compute (ours: ModelConfig.dtype;
torch: autocast). --remat full also turns on transformers' gradient checkpointing (per-layer full
recompute, the same policy); the "dots*" policies have no torch counterpart, torch then runs without.

Threads: --threads N (default os.cpu_count()) sets torch.set_num_threads(N). XLA:CPU has no thread-count
flag; it sizes its pool from the cores visible to the process, so when N < cpu count the process is
pinned to N cores with os.sched_setaffinity (before jax is imported), which bounds both frameworks alike.

On an accelerator (jax.default_backend() != "cpu") ours runs there and torch on CUDA if available;
otherwise the torch row is skipped with a note.

Run (defaults finish in ~1-2 minutes on 2 CPU cores):
    .venv/bin/python benchmarks/model_throughput.py
    .venv/bin/python benchmarks/model_throughput.py --preset small --steps 5 --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32, intermediate_size=512, vocab_size=8192
    ),
    "small": dict(
        num_layers=8,
        hidden_size=512,
        num_heads=8,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=32768,
    ),
    "qwen2p5_0p5b": dict(
        num_layers=24,
        hidden_size=896,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=4864,
        vocab_size=151936,
    ),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compile / first step")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--remat", choices=("none", "full", "dots", "dots_no_batch"), default="none")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile(model)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args()


def pin_threads(threads: int) -> None:
    """Must run before jax/torch are imported: XLA reads XLA_FLAGS and the visible cores at start-up."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cores and threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])


def timed_steps(step: Callable[[], Any], warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def bench_ours(cfg: Any, ids: np.ndarray, mask: np.ndarray, warmup: int, steps: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from rexrag_jax.models import init_model

    graphdef, state = nnx.split(init_model(cfg, seed=0, mesh=None))

    def loss_fn(s: Any, x: jax.Array, m: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, s)(x, m)[:, :-1]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:])
        w = m[:, 1:].astype(jnp.float32)
        return (ce * w).sum() / w.sum()

    train_step = jax.jit(jax.value_and_grad(loss_fn))
    x, m = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)
    t0 = time.perf_counter()
    lowered = train_step.lower(state, x, m)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    loss = float(jax.block_until_ready(compiled(state, x, m))[0])
    times = timed_steps(lambda: jax.block_until_ready(compiled(state, x, m)), warmup, steps)
    return dict(
        lower_s=t1 - t0,
        compile_s=t2 - t1,
        first_loss=loss,
        step_times_s=times,
        device=str(jax.devices()[0]).strip(),
        backend=jax.default_backend(),
    )


def bench_torch(
    cfg: Any, ids: np.ndarray, mask: np.ndarray, warmup: int, steps: int, threads: int, device: str, use_compile: bool
) -> dict[str, Any]:
    import contextlib

    import torch
    import torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type", "dtype")}
    model = Qwen2ForCausalLM._from_config(Qwen2Config(**hf), attn_implementation="sdpa", dtype=torch.float32)
    model.to(device).train()  # dropout is 0, train() only matters for gradient checkpointing
    if cfg.remat == "full":
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fwd = torch.compile(model) if use_compile else model
    x = torch.tensor(ids, dtype=torch.long, device=device)
    m = torch.tensor(mask, dtype=torch.long, device=device)
    autocast = (
        torch.autocast(device_type=device, dtype=torch.bfloat16)
        if cfg.dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        with autocast:
            logits = fwd(input_ids=x, attention_mask=m, use_cache=False).logits[:, :-1]
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        w = m[:, 1:].reshape(-1).float()
        loss = (ce * w).sum() / w.sum()
        loss.backward()
        sync()
        return float(loss.detach())

    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    times = timed_steps(step, warmup, steps)
    return dict(
        first_step_s=first,
        first_loss=loss,
        step_times_s=times,
        device=device,
        compiled=use_compile,
        torch_version=torch.__version__,
        gradient_checkpointing=cfg.remat == "full",
    )


def summarize(
    name: str, compile_note: str, compile_s: float, times: list[float], tokens: int, flops_per_step: float
) -> dict[str, Any]:
    med = statistics.median(times)
    return dict(
        name=name,
        compile_note=compile_note,
        compile_s=compile_s,
        step_ms_median=1e3 * med,
        step_ms_min=1e3 * min(times),
        tokens_per_s=tokens / med,
        est_tflops=flops_per_step / med / 1e12,
    )


def main() -> None:
    args = parse_args()
    pin_threads(args.threads)  # before anything imports jax or torch
    import jax

    from rexrag_jax.models import ModelConfig

    cfg = ModelConfig(
        architecture="qwen2",
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=True,
        param_dtype="float32",
        dtype=args.dtype,
        remat=args.remat,
        max_position_embeddings=max(32768, args.seq),
        **PRESETS[args.preset],
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids, dtype=bool)
    tokens = args.batch * args.seq
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    n_flop_params = cfg.num_params() - embed + cfg.vocab_size * cfg.hidden_size  # non-embedding + LM head
    flops_per_step = 6.0 * n_flop_params * tokens

    backend = jax.default_backend()
    print(
        f"preset={args.preset} params={cfg.num_params() / 1e6:.2f}M (non-embedding+head {n_flop_params / 1e6:.2f}M) "
        f"layers={cfg.num_layers} d={cfg.hidden_size} heads={cfg.num_heads}/{cfg.num_kv_heads} "
        f"vocab={cfg.vocab_size}"
    )
    print(
        f"batch={args.batch} seq={args.seq} tokens/step={tokens} dtype={args.dtype} remat={args.remat} "
        f"threads={args.threads} visible_cores={len(os.sched_getaffinity(0))} "
        f"jax={jax.__version__} backend={backend} device={jax.devices()[0]}"
    )
    print(f"steps={args.steps} (median) after warmup={args.warmup}", flush=True)
    load_before = os.getloadavg()[0]

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    ours = bench_ours(cfg, ids, mask, args.warmup, args.steps)
    rows.append(
        summarize(
            "ours (jax)",
            f"lower {ours['lower_s']:.2f}s + compile {ours['compile_s']:.2f}s",
            ours["lower_s"] + ours["compile_s"],
            ours["step_times_s"],
            tokens,
            flops_per_step,
        )
    )
    print(f"ours done: first loss {ours['first_loss']:.4f}", flush=True)

    import torch

    torch_device = "cpu" if backend == "cpu" else ("cuda" if torch.cuda.is_available() else None)
    results: dict[str, Any] = {"ours": ours}
    if torch_device is None:
        notes.append(f"torch skipped: jax runs on {backend} but torch has no CUDA device")
    else:
        if args.remat not in ("none", "full"):
            notes.append(f"torch has no '{args.remat}' remat policy; it runs without gradient checkpointing")
        variants = [False] + ([True] if args.torch_compile else [])
        for use_compile in variants:
            r = bench_torch(cfg, ids, mask, args.warmup, args.steps, args.threads, torch_device, use_compile)
            name = "torch.compile" if use_compile else "torch eager"
            note = "first step (incl. compile)" if use_compile else "first step (eager: no compile)"
            rows.append(summarize(name, note, r["first_step_s"], r["step_times_s"], tokens, flops_per_step))
            results["torch_compile" if use_compile else "torch_eager"] = r
            print(f"{name} done: first loss {r['first_loss']:.4f}", flush=True)

    print()
    print(
        f"{'framework':<14} {'compile s':>9} {'step ms':>10} {'min ms':>10} {'tokens/s':>11} {'est TFLOP/s':>11}"
        "  compile"
    )
    for r in rows:
        print(
            f"{r['name']:<14} {r['compile_s']:>9.2f} {r['step_ms_median']:>10.1f} {r['step_ms_min']:>10.1f} "
            f"{r['tokens_per_s']:>11.0f} {r['est_tflops']:>11.4f}  {r['compile_note']}"
        )
    for ref in rows[1:]:
        label = "torch" if ref["name"] == "torch eager" else ref["name"]
        print(f"ratio (ours/{label}) tokens/s: {rows[0]['tokens_per_s'] / ref['tokens_per_s']:.2f}x")
    print("est TFLOP/s is an estimate: 6 * (non-embedding params + LM head) * tokens / step time")
    load_after = os.getloadavg()[0]
    if max(load_before, load_after) > (os.cpu_count() or 1) + 0.5:  # heuristic: the machine was oversubscribed
        notes.append(
            f"1-min load average {load_before:.1f} -> {load_after:.1f} exceeds the machine's cores: other "
            "processes were competing, numbers are unreliable (torch eager's OpenMP suffers most)"
        )
    for n in notes:
        print("note:", n)

    if args.json:
        out = dict(
            args=vars(args),
            config=cfg.to_hf_dict(),
            num_params=cfg.num_params(),
            flop_params=n_flop_params,
            tokens_per_step=tokens,
            load_avg=[load_before, load_after],
            rows=rows,
            raw=results,
            notes=notes,
        )
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2, default=str)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

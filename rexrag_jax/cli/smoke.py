"""`make smoke`: an end-to-end smoke of the model stack.

Builds the real Qwen2.5 tokenizer, a tiny Qwen2.5-architecture decoder sharded over a device mesh,
exports it to a HF directory and loads it back tensor by tensor, trains it (sharded, remat, AdamW) to
emit a search action for a chat prompt, decodes greedily with the rollout kernels and checks the sampled
logprobs against a full forward pass, then runs one search-agent rollout whose `<search>` goes through
a real encoder, index and HTTP retrieval server and whose `<information>` block is appended to the KV
cache. Writes `smoke_report.json` to the workdir.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from absl import flags
from ml_collections import config_flags

from rexrag_jax.cli.devices import fake_cpu_devices

# No default file here (config_flags would parse overrides at import, outside run_config_app's clear
# errors); `cli` supplies configs/smoke.py, found from any directory.
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "The smoke run's config file (default configs/smoke.py); keys are overridden with --config.KEY=VALUE.",
)
DEFAULT_CONFIG = "configs/smoke.py"
_WORKDIR = flags.DEFINE_string("workdir", "workdir/smoke", "Where the tokenizer, checkpoint and report go.")


def run(cfg, workdir: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from tqdm.auto import tqdm

    from rexrag_jax import protocol
    from rexrag_jax.config import OptimConfig, RolloutConfig
    from rexrag_jax.models import (
        ModelConfig,
        encode_chat,
        forward,
        init_model,
        load_hf,
        load_tokenizer,
        make_qwen25_tokenizer_dir,
        save_hf,
    )
    from rexrag_jax.rl.batch import TrainBatch
    from rexrag_jax.rl.objective import SFTObjective
    from rexrag_jax.rl.update import init_optimizer, learning_rate, update
    from rexrag_jax.rollout import RolloutEngine
    from rexrag_jax.rollout.generate import generate
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

    # 2. train on one chat transcript with the training update and the SFT loss: the assistant's tokens only.
    prompt = encode_chat(tok, [{"role": "user", "content": cfg.question}])
    target = tok(cfg.response, add_special_tokens=False)["input_ids"] + [eos]
    ids = np.asarray([prompt + target] * cfg.train.batch_size, np.int32)
    loss_mask = np.zeros(ids.shape, bool)
    loss_mask[:, len(prompt) :] = True
    batch = TrainBatch(ids, np.ones(ids.shape, bool), loss_mask, num_rows=len(ids))
    optim = OptimConfig(learning_rate=cfg.train.learning_rate, warmup_steps=cfg.train.warmup_steps)
    graphdef, params = nnx.split(loaded)
    opt_state = init_optimizer(optim, params)
    losses = []
    t0 = time.perf_counter()
    for step in tqdm(range(cfg.train.steps), desc="train", unit="step"):
        params, opt_state, m = update(
            graphdef,
            params,
            opt_state,
            batch,
            micro_rows=len(ids),
            lr=float(learning_rate(optim, step)),
            mesh=mesh,
            objective=SFTObjective(),
            optim_cfg=optim,
            chunk=64,
        )
        losses.append(float(m["loss"]))
    nnx.update(loaded, params)
    report.update(train_seconds=time.perf_counter() - t0, loss_first=losses[0], loss_last=losses[-1])

    # 3. greedy decoding with the rollout kernels (jitted prefill + while_loop decode over the KV cache),
    #    rows sharded over the mesh; the sampled logprobs must equal a full forward pass's.
    rows = cfg.generate.rows
    out = generate(loaded, [prompt] * rows, max_new_tokens=cfg.generate.max_new_tokens)
    generated = out.tokens[0]
    full = np.asarray(jax.nn.log_softmax(forward(loaded, np.asarray([prompt + generated], np.int32))[0], -1))
    expected = [full[len(prompt) - 1 + i, t] for i, t in enumerate(generated)]
    report["cache_vs_full_max_diff"] = float(np.abs(np.asarray(out.logprobs[0]) - expected).max())
    report["rows_agree"] = all(t == generated for t in out.tokens)
    text = tok.decode(generated, skip_special_tokens=True)
    report["generated"] = text
    report["reproduced_target"] = text == cfg.response

    # 4. one search-agent rollout: the <search> goes through encoder -> index -> HTTP server -> client and
    #    the <information> block is appended to the KV cache; then the final (no-search) turn.
    with serve_corpus(cfg, workdir) as client:
        retriever = _Recording(client)
        engine = RolloutEngine(
            loaded,
            tok,
            retriever,
            RolloutConfig(
                group_size=rows,
                max_turns=1,
                temperature=0.0,
                probe_prob=0.0,
                max_response_length=cfg.generate.max_new_tokens,
                max_context_length=len(prompt) + 256,
                precompile=False,  # one rollout: compile only the shapes it uses
            ),
        )
        trajs, stats = engine.rollout(params, [prompt])
    traj = trajs[0]
    info = [t for t, seg in zip(traj.tokens, traj.segments) if seg == protocol.INFORMATION]
    report.update(
        search_query=retriever.queries[0] if retriever.queries else None,
        retrieved=[h.id for h in retriever.hits[0]] if retriever.hits else [],
        information=tok.decode(info),
        turns=traj.turns,
        finish=traj.finish,
        prefill_tokens=stats.prefill_tokens,
        decode_tokens=stats.decode_tokens,
    )
    return report


class _Recording:
    """Passes searches through to the client and keeps what it returned."""

    def __init__(self, client):
        self.client, self.queries, self.hits = client, [], []

    def search(self, queries, k):
        hits = self.client.search(queries, k)
        self.queries += list(queries)
        self.hits += hits
        return hits


@contextlib.contextmanager
def serve_corpus(cfg, workdir: str):
    """Index `cfg.corpus` with a real encoder, serve it over HTTP and yield a `RetrievalClient`."""
    import threading

    from rexrag_jax.retrieval import RetrievalClient, build_index, load_encoder, load_index
    from rexrag_jax.retrieval.encoder import minilm_dir
    from rexrag_jax.retrieval.server import make_server

    encoder_dir = cfg.retrieval.encoder or minilm_dir()
    corpus = os.path.join(workdir, "corpus.jsonl")
    with open(corpus, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(dict(row)) + "\n" for row in cfg.corpus)
    encoder = load_encoder(encoder_dir)
    build_index(corpus, encoder, os.path.join(workdir, "index"), resume=False)
    with load_index(os.path.join(workdir, "index"), encoder=encoder) as index:
        server = make_server(index, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield RetrievalClient(server.url)
        finally:
            server.shutdown()
            server.server_close()


def main(argv) -> None:
    del argv
    cfg = _CONFIG.value
    fake_cpu_devices(cfg.cpu_devices)  # before jax starts
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.makedirs(_WORKDIR.value, exist_ok=True)
    report = run(cfg, _WORKDIR.value)
    path = os.path.join(_WORKDIR.value, "smoke_report.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"\ndevices: {report['devices']} ({report['backend']}), mesh {dict(cfg.mesh)}")
    print(f"HF export -> sharded reload, max |logit diff|: {report['export_reload_max_diff']:.2e}")
    print(f"train loss: {report['loss_first']:.3f} -> {report['loss_last']:.4f} in {report['train_seconds']:.1f}s")
    print(f"KV-cache decode vs full forward, max |logprob diff|: {report['cache_vs_full_max_diff']:.2e}")
    print(f"greedy output: {report['generated']!r}")
    print(
        f"rollout: search {report['search_query']!r} over HTTP -> {report['retrieved']}; appended "
        f"{report['information']!r}; {report['turns']} turns, finish {report['finish']!r}"
    )
    print(f"report: {path}")
    ok = (
        report["export_reload_max_diff"] == 0.0
        and report["cache_vs_full_max_diff"] < 1e-3
        and report["reproduced_target"]
        and report["rows_agree"]
        and report["retrieved"][:1] == [cfg.retrieval.expected_id]
        and "<information>Doc 1" in report["information"]
    )
    print("SMOKE OK" if ok else "SMOKE FAILED")
    if not ok:
        raise SystemExit(1)


def cli() -> None:
    """console_scripts entry point."""
    from rexrag_jax.cli.components import run_config_app

    if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
        sys.argv[1:1] = ["--config", DEFAULT_CONFIG]
    run_config_app(main, sys.modules[__name__])


if __name__ == "__main__":
    cli()

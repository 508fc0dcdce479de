"""One process of a multi-process CPU run (tests/test_multihost.py starts 1 or 2 of these).

`python multihost_worker.py MODES OUT_DIR PROCESS_ID NUM_PROCESSES PORT TOKENIZER_DIR` fakes 8 / n CPU
devices, starts `jax.distributed` on 127.0.0.1:PORT (n > 1) and runs each of the comma-separated MODES on
a (2, 2, 2) mesh over all processes' devices (the test runs the same functions in-process as the
one-process reference):
  update:  two `rl.update.update` steps on a fixed packed batch -> the parameters, optimizer moments
           and metrics;
  trainer: two `Trainer` steps (REX-RAG, a scripted search agent, the real model for log-probs and the
           update, per-host data shares, orbax checkpoints) -> metrics rows and parameters;
  rollout: one `RolloutEngine.rollout` with the real decode kernels (sampling at T=1) -> the trajectories
           (the trainer mode covers retrieval shared between processes: its scripted agent searches);
  eval:    `eval.evaluate` (greedy, 3 questions in batches of 2) into a folder per process -> the scores
           and which files each process wrote (process 0 only).
Every process writes OUT_DIR/MODE.<process_id>.pkl, so the test can check that the processes agree
with each other and with the one-process run.
"""

from __future__ import annotations

import json
import os
import pickle
import sys

import numpy as np


def _model(vocab_size: int, seed: int, mesh, eos=()):
    from rexrag_jax.models import ModelConfig, init_model

    return init_model(
        ModelConfig(
            architecture="qwen2",
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            tie_word_embeddings=True,
            attention_bias=True,
            eos_token_id=eos,
        ),
        seed=seed,
        mesh=mesh,
    )


def _engine(tokenizer_dir: str, seed: int, **settings):
    """(tokenizer, a real RolloutEngine on the (2, 2, 2) mesh with a fake retriever); `settings` override
    the small rollout shapes shared by the rollout and eval modes."""
    from rexrag_jax.models import load_tokenizer
    from rexrag_jax.rollout import RolloutConfig, RolloutEngine
    from rexrag_jax.sharding import make_mesh
    from rollout_fakes import FakeRetriever

    tok = load_tokenizer(tokenizer_dir)
    cfg = RolloutConfig(
        **{
            **dict(
                max_obs_length=32,
                max_context_length=256,
                probe_prob=0.0,
                decode_chunk=4,
                prefill_chunk=64,
                prefill_rows=4,
                precompile=False,
            ),
            **settings,
        }
    )
    return tok, RolloutEngine(_model(151936, seed, make_mesh((2, 2, 2))), tok, FakeRetriever(), cfg)


def host_tree(tree):
    import jax

    from rexrag_jax import distributed

    return jax.tree.map(lambda x: distributed.to_host(x).astype(np.float32), tree)


def run_update(out_dir: str, tokenizer_dir: str) -> dict:
    from flax import nnx

    from rexrag_jax import distributed
    from rexrag_jax.config import LossConfig, OptimConfig
    from rexrag_jax.models import init_model
    from rexrag_jax.rl.batch import pack_trajectories
    from rexrag_jax.rl.objective import RLObjective
    from rexrag_jax.rl.update import batch_logprobs, init_optimizer, update
    from rexrag_jax.sharding import make_mesh
    from test_rl_update import CFG, trajectories

    mesh = make_mesh((2, 2, 2))
    graphdef, params = nnx.split(init_model(CFG, seed=0, mesh=mesh))
    optim_cfg, objective = OptimConfig(learning_rate=1e-2, warmup_steps=0), RLObjective(LossConfig())
    opt_state = init_optimizer(optim_cfg, params)
    batch = pack_trajectories(trajectories(np.random.default_rng(0), n=8), length_multiple=16, row_multiple=4)
    old, _ = batch_logprobs(graphdef, params, batch, rows=4, mesh=mesh, chunk=16)
    batch = batch.replace(
        old_logprobs=old - 0.05,
        ref_logprobs=old + 0.05,
        advantages=np.linspace(-1, 1, len(batch.tokens)).astype(np.float32),
    )
    metrics = []
    for _ in range(2):
        params, opt_state, m = update(
            graphdef,
            params,
            opt_state,
            batch,
            micro_rows=4,
            alpha=0.2,
            error_rate=0.5,
            lr=1e-2,
            mesh=mesh,
            objective=objective,
            optim_cfg=optim_cfg,
            chunk=16,
        )
        metrics.append({k: float(v) for k, v in distributed.tree_to_host(m).items()})
    return {"params": host_tree(params), "mu": host_tree(opt_state[1].mu), "metrics": metrics, "old_logprobs": old}


def run_rollout(out_dir: str, tokenizer_dir: str) -> dict:
    from flax import nnx

    tok, engine = _engine(tokenizer_dir, 1, group_size=2, max_turns=3, max_response_length=12, temperature=1.0)
    prompts = [tok(f"Question {i}: what is item {i}?", add_special_tokens=False)["input_ids"] for i in range(4)]
    trajs, _ = engine.rollout(nnx.state(engine.model), prompts, seed=7)
    return {
        "tokens": [t.tokens for t in trajs],
        "segments": [t.segments for t in trajs],
        "logprobs": [t.logprobs for t in trajs],
    }


def run_trainer(out_dir: str, tokenizer_dir: str) -> dict:
    import jax

    from rexrag_jax.config import as_config, training_rollout
    from rexrag_jax.data import prompt_ids
    from rexrag_jax.models import load_tokenizer
    from rexrag_jax.rl.trainer import Trainer
    from rexrag_jax.rollout import ExplorationPool
    from rexrag_jax.sharding import make_mesh
    from rollout_fakes import FakeRetriever, ScriptedEngine
    from test_trainer import EXAMPLES, POOL, config, policy

    tok = load_tokenizer(tokenizer_dir)
    cfg = config()
    model = _model(151936, 0, make_mesh((2, 2, 2)), eos=(tok.convert_tokens_to_ids("<|im_end|>"),))
    pool = ExplorationPool.from_file(POOL, tok)
    engine = ScriptedEngine(model, tok, FakeRetriever(), training_rollout(as_config(cfg)), pool, policy=policy)
    workdir = os.path.join(out_dir, f"trainer_{jax.process_count()}")
    trainer = Trainer(
        cfg,
        workdir,
        model=model,
        tokenizer=tok,
        retriever=None,
        examples=EXAMPLES * 2,
        encode_prompt=lambda q: prompt_ids(tok, q),
        pool=pool,
        engine=engine,
    )
    rows = trainer.run()
    rows = [{k: v for k, v in r.items() if not k.startswith(("time_", "tokens_per_s"))} for r in rows]
    return {
        "rows": rows,
        "params": host_tree(trainer.params),
        "checkpoints": trainer.ckpt.steps(),
        "queries_here": sum(len(q) for q, _ in engine.retriever.calls),
        "workdir": workdir,
    }


def run_eval(out_dir: str, tokenizer_dir: str) -> dict:
    import jax
    from flax import nnx

    from rexrag_jax.data import QAExample, prompt_ids
    from rexrag_jax.eval import evaluate

    tok, engine = _engine(tokenizer_dir, 2, group_size=1, max_turns=2, max_response_length=8, temperature=0.0)
    # 8 questions in one batch: the rollout mode's 8 rows, so the decode programs compiled there are reused
    examples = [QAExample(str(i), f"What is item {i}?", (f"code{i}",)) for i in range(8)]
    eval_dir = os.path.join(out_dir, f"eval_{jax.process_count()}_{jax.process_index()}")
    results = evaluate(
        engine,
        nnx.state(engine.model),
        tok,
        {"nq": examples},
        eval_dir,
        encode_prompt=lambda q: prompt_ids(tok, q),
        batch_size=8,
        progress=False,
    )
    files = sorted(os.path.relpath(os.path.join(d, f), eval_dir) for d, _, fs in os.walk(eval_dir) for f in fs)
    rows = [] if not files else [json.loads(line) for line in open(os.path.join(eval_dir, "trajectories", "nq.jsonl"))]
    return {"results": results, "files": files, "predictions": [r["response"] for r in rows]}


MODES = {"update": run_update, "rollout": run_rollout, "trainer": run_trainer, "eval": run_eval}


def main() -> None:
    modes, out_dir, pid, nproc, port, tokenizer_dir = sys.argv[1].split(","), *sys.argv[2:7]
    pid, nproc = int(pid), int(nproc)
    from rexrag_jax.cli.devices import fake_cpu_devices

    fake_cpu_devices(8 // nproc)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax

    from rexrag_jax import distributed

    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    if nproc > 1:
        assert distributed.initialize(f"127.0.0.1:{port}", nproc, pid)
    assert jax.process_count() == nproc and jax.device_count() == 8, (jax.process_count(), jax.device_count())
    for mode in modes:
        result = MODES[mode](out_dir, tokenizer_dir)
        with open(os.path.join(out_dir, f"{mode}.{pid}.pkl"), "wb") as f:
            pickle.dump(result, f)
        print(f"process {pid}/{nproc}: {mode} done", flush=True)
    distributed.sync("multihost_worker: done")


if __name__ == "__main__":
    main()

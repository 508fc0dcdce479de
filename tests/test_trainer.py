"""The trainer in-process: REX-RAG and GRPO steps on a scripted search agent with a real model, metrics,
and checkpoints (resume onto another mesh, a corrupt latest step, a partial one)."""

import dataclasses
import glob
import os
import re
import shutil
import struct

import jax
import numpy as np
import pytest
from flax import nnx

from rexrag_jax.config import as_config, default_config, training_rollout
from rexrag_jax.data import QAExample, prompt_ids
from rexrag_jax.models import ModelConfig, init_model
from rexrag_jax.rl.metrics import read_metrics
from rexrag_jax.rl.trainer import Trainer
from rexrag_jax.rollout import ExplorationPool
from rexrag_jax.sharding import make_mesh
from rollout_fakes import FakeRetriever, ScriptedEngine

POOL = os.path.join(os.path.dirname(__file__), "..", "configs", "exploration_prompts.txt")
EXAMPLES = [QAExample(str(i), f"What is the code of item {i}", (f"code{i}",)) for i in range(6)]
METRIC_KEYS = {
    "reward",
    "em",
    "f1",
    "probes",
    "probes_kept",
    "alpha",
    "epsilon",
    "rho",
    "clip_fraction",
    "kl",
    "entropy",
    "grad_norm",
    "tokens_per_s",
    "time_rollout",
    "time_retrieval_wait",
    "time_logprobs",
    "time_update",
    "skipped_updates",
    "lr",
}


def policy(row: int, text: str) -> str:
    """Search first; then rows 0 mod 3 answer right, the others wrong; a probe (after its exploratory
    prompt, which opens a <think>) answers right."""
    item = re.findall(r"item (\d+)", text)[0]
    tail = text[text.rfind("<|im_start|>assistant") :]
    if tail.rstrip().endswith(("<think>", ".", "?")) and "<information>" in tail and "</answer>" not in tail[-60:]:
        return f" I should check. </think><answer> code{item} </answer>"
    if "<information>" not in tail:
        return f"<think> I need the code. </think><search> code of item {item} </search>"
    answer = f"code{item}" if row % 3 == 0 else "unknown"
    return f"<think> found it </think><answer> {answer} </answer>"


def config(algorithm="rexrag", steps=2):
    c = default_config()
    c.seed, c.algorithm, c.steps, c.progress = 3, algorithm, steps, False
    c.data.batch_size = 2
    c.rollout.update(group_size=3, max_turns=3, max_response_length=24, max_context_length=448, probe_prob=1.0)
    c.train.update(mini_batch_size=8, micro_batch_size=4, length_multiple=128, logprob_chunk=128)
    c.optim.update(learning_rate=1e-3, warmup_steps=0)
    c.probes.update(keep_ratio=0.5, keep_multiple=1)
    c.checkpoint.update(every=1, keep=3)
    return c


@pytest.fixture(scope="module")
def tok(qwen25_tokenizer):
    return qwen25_tokenizer


def make_trainer(cfg, workdir, tok, mesh_shape=(2, 2, 2)):
    mesh = make_mesh(mesh_shape)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model = init_model(
        ModelConfig(
            architecture="qwen2",
            vocab_size=151936,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            tie_word_embeddings=True,
            attention_bias=True,
            eos_token_id=(eos,),
        ),
        seed=0,
        mesh=mesh,
    )
    pool = ExplorationPool.from_file(POOL, tok)
    engine = ScriptedEngine(model, tok, FakeRetriever(), training_rollout(as_config(cfg)), pool, policy=policy)
    return Trainer(
        cfg,
        str(workdir),
        model=model,
        tokenizer=tok,
        retriever=None,
        examples=EXAMPLES,
        encode_prompt=lambda q: prompt_ids(tok, q),
        pool=pool,
        engine=engine,
    )


@pytest.fixture(scope="module")
def rexrag_run(tok, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rexrag")
    trainer = make_trainer(config(), workdir, tok)
    rows = trainer.run()
    return trainer, rows, workdir


def test_rexrag_steps_follow_the_probe_budget(rexrag_run):
    trainer, rows, workdir = rexrag_run
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert METRIC_KEYS <= set(r) and all(np.isfinite(r[k]) for k in METRIC_KEYS)
        originals = r["trajectories"] - r["probes"]
        assert originals == 6 and r["probes"] == 4  # rows 1, 2 of each group answer wrong -> one probe each
        assert r["keep_num"] == int(2 * 3 * r["rho"]) and r["probes_kept"] == min(r["probes"], r["keep_num"])
        assert r["alpha"] == pytest.approx(r["probes_kept"] / (originals + r["probes_kept"]))
        assert r["epsilon"] == pytest.approx(4 / 6) and r["reward"] == pytest.approx(2 / 6)
        assert r["probe_accuracy"] == 1.0 and r["skipped_updates"] == 0 and r["grad_norm"] > 0
        assert r["updates"] == -(-(originals + r["probes_kept"]) // 8)  # one per mini-batch of 8 trajectories
    assert rows[0]["rho"] == 0.5 and rows[1]["rho"] == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)
    assert trainer.rho == pytest.approx(0.9 * rows[1]["rho"] + 0.1)
    assert rows[1]["kl"] > 0 and rows[0]["lr"] == pytest.approx(1e-3)
    assert trainer.engine.retriever.calls  # searches went out
    # each rollout decodes with the trainer's parameters of that step; the model it was built from is untouched
    first, second = trainer.engine.params_seen[-2:]
    initial = jax.tree.leaves(nnx.state(trainer.model))
    assert all(a is b for a, b in zip(jax.tree.leaves(first), initial))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(second), initial))


def test_metrics_files(rexrag_run):
    _, rows, workdir = rexrag_run
    assert [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))] == [1, 2]
    events = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboardX.proto import event_pb2

    tags, data = set(), open(events[0], "rb").read()
    pos = 0
    while pos < len(data):  # TFRecord framing: length, crc, payload, crc
        (n,) = struct.unpack("<Q", data[pos : pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
        tags |= {v.tag for v in event.summary.value}
        pos += 12 + n + 4
    assert {"reward", "alpha", "rho", "kl", "clip_fraction", "time_rollout"} <= tags


def test_grpo_has_no_probes(tok, tmp_path):
    trainer = make_trainer(config("grpo", steps=1), tmp_path, tok)
    (row,) = trainer.run()
    assert row["probes"] == 0 and row["alpha"] == 0.0 and row["trajectories"] == 6
    assert row["rho"] == 0.5 and trainer.rho == 0.5  # rho only moves with probes


def test_batch_decoded_in_sessions(rexrag_run, tok):
    trainer, _, _ = rexrag_run
    whole = trainer.cfg
    # each question in its own session (a smaller KV cache)
    trainer.cfg = whole.replace(rollout=dataclasses.replace(whole.rollout, session_prompts=1))
    prompts = [trainer._prompt(e) for e in EXAMPLES[:2]]
    trajs, stats = trainer._rollout(prompts, [("code0",), ("code1",)])
    trainer.cfg = whole
    originals = [t for t in trajs if not t.is_probe]
    assert [t.prompt_index for t in originals] == [0, 0, 0, 1, 1, 1]
    assert len(trajs) == 10 and all(t.is_probe for t in trajs[6:])
    for probe in trajs[6:]:  # batch-global sources: the original it branched from has its group id
        assert trajs[probe.source].prompt_index == probe.prompt_index and not trajs[probe.source].is_probe
        assert probe.tokens[: probe.prompt_length] == prompts[probe.prompt_index][-probe.prompt_length :]
    assert stats.searches == 6 and stats.probes == 4  # summed over the two sessions


def _params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(trainer.params)]


def test_resume_onto_another_mesh(rexrag_run, tok, tmp_path):
    trainer, _, workdir = rexrag_run
    shutil.copytree(workdir, tmp_path / "run")
    resumed = make_trainer(config(steps=2), tmp_path / "run", tok, mesh_shape=(4, 1, 2))
    assert resumed.step == 2 and resumed.rho == pytest.approx(trainer.rho)
    assert resumed.batches.get_state() == trainer.batches.get_state()
    for a, b in zip(_params(trainer), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    leaf = jax.tree.leaves(resumed.params)[0]
    assert dict(leaf.sharding.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert resumed.run() == []  # already at cfg.steps


def test_corrupt_or_partial_latest_checkpoint_falls_back(rexrag_run, tok, tmp_path, capsys):
    _, _, workdir = rexrag_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    ckpts = run / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["1", "2"]
    (ckpts / "3.orbax-checkpoint-tmp-12345").mkdir()  # a save that died before it was committed
    for path in glob.glob(str(ckpts / "2" / "state" / "**" / "*"), recursive=True):
        if os.path.isfile(path) and os.path.getsize(path) > 64:
            with open(path, "r+b") as f:  # bit rot in every data file of the latest step
                f.seek(32)
                f.write(os.urandom(32))
    trainer = make_trainer(config(steps=2), run, tok)
    assert trainer.step == 1
    out = capsys.readouterr().out
    assert "checkpoint" in out and "/2 is unreadable or corrupt" in out and "resumed from checkpoint step 1" in out
    assert sorted(os.listdir(ckpts)) == ["1", "2.unreadable-0", "3.orbax-checkpoint-tmp-12345"]
    rows = trainer.run()  # redoes step 2 from step 1 and saves it afresh
    assert [r["step"] for r in rows] == [2]
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl"))] == [1, 2]
    assert make_trainer(config(steps=2), run, tok).step == 2


def test_no_readable_checkpoint_is_an_error(rexrag_run, tok, tmp_path):
    _, _, workdir = rexrag_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    for step in ("1", "2"):
        shutil.rmtree(run / "checkpoints" / step / "state")
    with pytest.raises(RuntimeError, match="no readable checkpoint in .*step 2: .*step 1: "):
        make_trainer(config(steps=2), run, tok)


def test_params_only_restore_for_evaluation(rexrag_run):
    from rexrag_jax.models.decoder import abstract_model
    from rexrag_jax.rl.checkpoint import Checkpointer

    trainer, _, workdir = rexrag_run
    mesh = make_mesh((1, 4, 2))
    graphdef, target = abstract_model(trainer.model.config, mesh)
    step, params = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).restore_params(target)
    assert step == 2
    model = nnx.merge(graphdef, params)
    for a, b in zip(_params(trainer), [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.leaves(params)[0].sharding.mesh.shape["fsdp"] == 4
    with pytest.raises(FileNotFoundError, match="step 7 not in"):
        Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).restore_params(target, 7)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Checkpointer(os.path.join(workdir, "nope"), read_only=True)


def test_probe_without_its_prompt_ranks_last(rexrag_run):
    """A probe whose exploratory prompt the context cap cut off has no prompt tokens to score; it must not
    win the budget with a mean log-prob of 0."""
    from rexrag_jax import protocol as P
    from rexrag_jax.rl.batch import pack_trajectories
    from rexrag_jax.rollout.engine import Trajectory

    trainer, _, _ = rexrag_run

    def traj(probe, with_prompt):
        tr = Trajectory(
            0,
            [1, 2, 3, 4, 5, 6],
            [P.PROMPT, P.PROMPT, P.MODEL, P.MODEL, P.MODEL, P.MODEL],
            [0.0] * 6,
            2,
            is_probe=probe,
            probe_start=4 if probe else -1,
        )
        if with_prompt:
            tr.segments[4:6], tr.probe_conditionals = [P.PROBE_PROMPT] * 2, (1.0, 0.5)
        return tr

    packed = pack_trajectories([traj(False, False), traj(True, False), traj(True, True)], length_multiple=8)
    old = np.full(packed.tokens.shape, -3.0, np.float32)
    rho = trainer.rho
    trainer.rho = 1 / 3  # keep_num = int(1 prompt x 3 x 1/3) = 1
    try:
        kept, keep_num, _ = trainer._probe_budget(packed, old, np.zeros(3, np.float32), 1)
    finally:
        trainer.rho = rho
    assert keep_num == 1 and kept.tolist() == [True, False, True]

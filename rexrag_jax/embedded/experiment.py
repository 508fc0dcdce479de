"""The embedded default, end to end: world -> tokenizer -> index -> demonstrations -> warm start ->
GRPO and REX-RAG runs (same warm start, budget and seeds) -> test EM -> report.

Every stage writes its output into the workdir and is skipped when that output is already there, so an
interrupted run continues where it stopped (RL runs resume from their checkpoints). The config the
workdir was made with is stored; a different one is refused rather than mixed in.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rexrag_jax import protocol as P
from rexrag_jax.config import Config, from_config_dict, greedy_rollout, validate
from rexrag_jax.embedded import demonstrations as D
from rexrag_jax.embedded import world as W
from rexrag_jax.embedded.arms import apply_arm, get_arm
from rexrag_jax.embedded.errors import error_breakdown
from rexrag_jax.embedded.pilot import run_pilot
from rexrag_jax.embedded.report import write_report
from rexrag_jax.embedded.vocab import load_tokenizer_dir, train_tokenizer
from rexrag_jax.embedded.warm_start import WarmStartConfig, train_warm_start
from rexrag_jax.eval.evaluator import greedy_rollouts
from rexrag_jax.jsonfile import read_json, write_json_atomic
from rexrag_jax.models.config import ModelConfig
from rexrag_jax.models.decoder import Decoder, init_model
from rexrag_jax.rl.checkpoint import Checkpointer, abstract_like
from rexrag_jax.rl.metrics import read_metrics
from rexrag_jax.rl.trainer import Trainer
from rexrag_jax.rollout.engine import RolloutEngine
from rexrag_jax.rollout.pool import ExplorationPool, read_pool_file
from rexrag_jax.scoring import exact_match, score
from rexrag_jax.sharding import make_mesh

SELECTION_KEYS = ("seeds", "arms")  # config keys that select runs, not change them
SEGMENT_KINDS = {
    P.PROMPT: "prompt",
    P.MODEL: "model",
    P.FEEDBACK: "feedback",
    P.INFORMATION: "information",
    P.PROBE_PROMPT: "probe",
}


def _log(msg: str) -> None:
    print(f"[embedded] {msg}", flush=True)


class Experiment:
    """Holds the shared pieces (world, tokenizer, retriever, mesh) of one embedded run in `workdir`."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, *, pool_file: str, progress: bool = True):
        self.cfg, self.workdir, self.progress = cfg, workdir, progress
        for arm in cfg.arms:
            get_arm(arm)  # an unknown arm or a bad demonstration mix fails before any work
        mix = {"single": cfg.demos.single.to_dict(), "multi": cfg.demos.multi.to_dict()}
        self.demo_mix = D.with_complete_share(mix, cfg.demos.complete_share)
        D.check_mix(self.demo_mix)
        os.makedirs(workdir, exist_ok=True)
        self._check_config()
        self.world = W.make_world(
            cfg.world.seed, W.WorldSizes(cfg.world.people, cfg.world.towns, cfg.world.countries, cfg.world.companies)
        )
        questions = W.make_questions(self.world, cfg.world.seed)
        self.train_qs, self.test_qs = W.split_questions(questions, cfg.world.test_fraction, cfg.world.seed)
        if cfg.world.max_test:
            self.test_qs = self.test_qs[: cfg.world.max_test]
        self.paths = {
            k: os.path.join(workdir, v)
            for k, v in dict(
                corpus="data/corpus.jsonl",
                train="data/train.jsonl",
                test="data/test.jsonl",
                tokenizer="tokenizer",
                index="index",
                warm_start="warm_start",
                runs="runs",
                report="report",
            ).items()
        }
        W.write_jsonl(self.paths["corpus"], W.corpus_rows(self.world))
        W.write_jsonl(self.paths["train"], W.question_rows(self.train_qs))
        W.write_jsonl(self.paths["test"], W.question_rows(self.test_qs))
        self.pool_texts = read_pool_file(pool_file)
        self.tokenizer = self._tokenizer()
        # One CPU device: no mesh. XLA:CPU runs an SPMD-partitioned program ~3.5x slower than the same
        # unpartitioned one even on a one-device mesh (measured: SFT step 1.55 s vs 0.41 s), and there is
        # nothing to shard. More devices (TPU, GPU, fake CPU devices) get the configured mesh.
        self.mesh = make_mesh(dict(cfg.mesh)) if jax.device_count() > 1 else None
        self.model_config = ModelConfig(
            **cfg.model.to_dict(), vocab_size=len(self.tokenizer), eos_token_id=(int(self.tokenizer.eos_token_id),)
        )
        self.pool = ExplorationPool.from_texts(self.pool_texts, self.tokenizer)
        self._prompt_cache: dict[str, list[int]] = {}
        self._greedy_engines: dict[int, RolloutEngine] = {}  # per retriever (kept alive by the engine: ids stay unique)

    # ------------------------------------------------------------------ stages

    def _check_config(self) -> None:
        """Refuse a workdir made with another config; `seeds` and `arms` may change (they only choose which
        runs to add or report: a study grows by seeds)."""
        path = os.path.join(self.workdir, "embedded_config.json")
        mine = json.loads(self.cfg.to_json_best_effort())
        if os.path.exists(path):
            theirs = read_json(path)
            mine_flat, theirs_flat = _flatten(mine), _flatten(theirs)
            diff = sorted(
                k
                for k in set(mine_flat) | set(theirs_flat)
                if mine_flat.get(k) != theirs_flat.get(k) and k not in SELECTION_KEYS
            )
            if diff:
                raise ValueError(
                    f"{self.workdir} holds a run of a different config (differs in {diff}); "
                    "use a new --workdir or delete that one"
                )
        write_json_atomic(path, mine)

    def _tokenizer(self):
        path = self.paths["tokenizer"]
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            return load_tokenizer_dir(path)
        # Text the tokenizer should compress: passages, questions, demonstration phrasing, prompts.
        texts = [self.world.passage(n) for n in self.world.kind_of] * 4 + [q.question for q in self.train_qs]
        texts += [self.encode_prompt_text("")] + list(D.REFLECTIONS) + self.pool_texts
        texts += [
            f"I need the {r[2]} of . The {r[2]} of is . Next I need the {r[2]} of ." for r in W.RELATIONS.values()
        ]
        texts += ["Doc 1(Title: ) \nDoc 2(Title: ) I think the answer is ."] * 50
        return train_tokenizer(texts, self.cfg.vocab_size, path)

    def encode_prompt_text(self, question: str) -> str:
        return self.cfg.prompt.format(question=question)

    def encode_prompt(self, question: str) -> list[int]:
        if question not in self._prompt_cache:
            self._prompt_cache[question] = self.tokenizer(self.encode_prompt_text(question), add_special_tokens=False)[
                "input_ids"
            ]
        return self._prompt_cache[question]

    def open_retriever(self):
        """The MiniLM index of the world's corpus (built on first use; ScaNN where installed)."""
        from rexrag_jax.retrieval import build_index, load_index
        from rexrag_jax.retrieval.encoder import minilm_dir

        build_index(self.paths["corpus"], minilm_dir(), self.paths["index"], resume=True)
        return load_index(self.paths["index"])

    def warm_start(self, retriever) -> tuple[Decoder, dict]:
        """The SFT policy (trained once, then restored) and its training history."""
        cfg = self.cfg
        model = init_model(self.model_config, seed=cfg.seed, mesh=self.mesh)
        ckpt = Checkpointer(self.paths["warm_start"], save_every=1, keep=1, async_save=False)
        try:
            restored = ckpt.restore(abstract_like({"params": nnx.state(model)}))
            if restored is not None:
                nnx.update(model, restored[1]["params"])
                _log(f"warm start restored from {self.paths['warm_start']}")
                return model, restored[2]
            reflections = list(D.REFLECTIONS)
            if cfg.demos.pool_reflections:  # the probe prompts' own sentences, as pretraining text would have them
                reflections += [t.removeprefix("<think>").strip() for t in self.pool_texts]
            demos = D.make_demonstrations(
                self.train_qs,
                self.world,
                retriever,
                per_question=cfg.demos.per_question,
                mix=self.demo_mix,
                topk=cfg.rl.rollout.topk,
                seed=cfg.seed,
                reflections=reflections,
            )
            rows = [D.encode_demonstration(self.tokenizer, self.encode_prompt(d.question.question), d) for d in demos]
            counts = {b: sum(d.behaviour == b for d in demos) for b in D.BEHAVIOURS}
            _log(f"{len(demos)} demonstrations {counts}, {sum(len(t) for t, _ in rows)} tokens")
            t0 = time.perf_counter()
            history = train_warm_start(
                model,
                rows,
                WarmStartConfig(**cfg.warm_start.to_dict(), seed=cfg.seed),
                pad_id=int(self.tokenizer.pad_token_id),
                progress=self.progress,
            )
            meta = {
                "rho": 0.0,
                "data": {},
                "seed": int(cfg.seed),
                "demonstrations": counts,
                "loss": history[-1]["loss"],
                "time_s": time.perf_counter() - t0,
            }
            ckpt.save(0, {"params": nnx.state(model)}, meta, force=True)
            return model, meta
        finally:
            ckpt.close()

    # ------------------------------------------------------------------ evaluation

    def evaluate(
        self, model: Decoder, retriever, questions: Sequence[W.WorldQuestion] | None = None, *, params=None
    ) -> tuple[dict, list]:
        """Greedy test EM by hop count (single = 1 hop, multi = 2+), and the trajectories, of `model` with
        `params` (default: its own)."""
        questions = list(self.test_qs if questions is None else questions)
        engine = self._greedy_engines.get(id(retriever))  # stop tables and warmup once
        if engine is None:
            rc = greedy_rollout(from_config_dict(self.cfg.rl).rollout)
            engine = self._greedy_engines[id(retriever)] = RolloutEngine(model, self.tokenizer, retriever, rc)
        params = nnx.state(model) if params is None else params
        prompts = [self.encode_prompt(q.question) for q in questions]
        trajs = [
            t for part in greedy_rollouts(engine, params, prompts, batch_size=self.cfg.eval_batch_size) for t in part
        ]
        answers = [self.answer(t) for t in trajs]
        correct = [exact_match(a, q.golden_answers) for q, a in zip(questions, answers)]
        scores = {**em_by_hops(questions, correct), "errors": error_breakdown(questions, answers, self.world)}
        return scores, list(zip(questions, trajs, correct))

    def answer(self, traj) -> str | None:
        return score(traj.response_text(self.tokenizer), ()).prediction

    def segments(self, traj) -> list[list[str]]:
        """The trajectory as `[kind, text]` runs of equal segment label (for the HTML page)."""
        out, start = [], 0
        labels = traj.segments
        for i in range(1, len(labels) + 1):
            if i == len(labels) or labels[i] != labels[start]:
                out.append([SEGMENT_KINDS.get(labels[start], "other"), self.tokenizer.decode(traj.tokens[start:i])])
                start = i
        return out

    # ------------------------------------------------------------------ RL runs

    def run_config(self, arm: str, seed: int) -> Config:
        c = ml_collections.ConfigDict(self.cfg.rl.to_dict())
        apply_arm(c, arm)
        c.seed, c.progress = int(seed), self.progress
        c.data.train_file = self.paths["train"]
        c.retrieval.index = self.paths["index"]
        return validate(c)

    def rl_run(self, arm: str, seed: int, warm: Decoder, retriever, warm_eval: dict) -> dict:
        """Train arm `arm` from a copy of the warm start; test EM every `eval_every` steps and at the end.
        Returns the run's record (also written to the run's `result.json`, which makes a rerun skip it)."""
        run_dir = os.path.join(self.paths["runs"], f"{arm}-seed{seed}")
        done = os.path.join(run_dir, "result.json")
        if os.path.exists(done):
            return read_json(done)
        cfg = self.run_config(arm, seed)
        algorithm = cfg.algorithm
        graphdef, state = nnx.split(warm)
        model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
        t0 = time.perf_counter()
        trainer = Trainer(
            cfg,
            run_dir,
            model=model,
            tokenizer=self.tokenizer,
            retriever=retriever,
            examples=self.train_qs,
            encode_prompt=self.encode_prompt,
            pool=self.pool if algorithm == "rexrag" else None,
        )
        evals_path = os.path.join(run_dir, "evals.json")
        # evaluations past the restored step belong to steps that will be trained again (a kill before the
        # next checkpoint, or a run continued in another sitting without its checkpoints)
        evals = [e for e in _read_json(evals_path, [{"step": 0, **warm_eval}]) if e["step"] <= trainer.step]
        last: list = []

        def evaluate(step: int) -> None:
            scores, last[:] = self.evaluate(model, retriever, params=trainer.params)
            evals.append({"step": step, **scores})
            write_json_atomic(evals_path, evals)

        def on_step(step: int, metrics: dict) -> None:
            if step % self.cfg.eval_every == 0 or step == cfg.steps:
                evaluate(step)

        trainer.run(on_step=on_step)
        if evals[-1]["step"] != cfg.steps or not last:  # resumed after the last step: evaluate once more
            evals = [e for e in evals if e["step"] != cfg.steps]
            evaluate(cfg.steps)
        history = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        record = {
            "arm": arm,
            "algorithm": algorithm,
            "seed": int(seed),
            "evals": evals,
            "final": {k: v for k, v in evals[-1].items() if k != "step"},
            "history": [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in history],
            "trajectories": int(sum(h.get("trajectories", 0) for h in history)),
            "time_s": time.perf_counter() - t0,
            "samples": self._samples(f"{get_arm(arm).name} seed {seed}", last, trainer),
        }
        write_json_atomic(done, record)
        return record

    def _samples(self, title: str, evaluated, trainer: Trainer) -> list[dict]:
        """A few test trajectories (multi-hop first) and, for REX-RAG, a probe from a training rollout."""
        out = []
        multi = [x for x in evaluated if x[0].hops > 1]
        for q, t, ok in multi[:2] + [x for x in evaluated if x[0].hops == 1][:1]:
            out.append(self._sample(f"{title}, test, {q.hops}-hop", q, t, ok))
        if trainer.cfg.algorithm == "rexrag":
            # one training-sized batch (the rollout shapes compiled for training are reused)
            qs = [q for q in self.train_qs if q.hops > 1][: trainer.cfg.data.batch_size]
            golds = [q.golden_answers for q in qs]
            trajs, _ = trainer.engine.rollout(
                trainer.params,
                [self.encode_prompt(q.question) for q in qs],
                reward_fn=lambda p, a: exact_match(a, golds[p]),
                seed=1,
            )
            probes = sorted(
                (t for t in trajs if t.is_probe), key=lambda t: -exact_match(self.answer(t), golds[t.prompt_index])
            )
            for t in probes[:2]:
                q = qs[t.prompt_index]
                out.append(
                    self._sample(
                        f"{title}, training probe, {q.hops}-hop", q, t, exact_match(self.answer(t), q.golden_answers)
                    )
                )
        return out

    def _sample(self, title: str, q: W.WorldQuestion, traj, correct: float) -> dict:
        return {
            "title": title,
            "question": q.question,
            "golden": list(q.golden_answers),
            "prediction": self.answer(traj) or "",
            "correct": bool(correct),
            "segments": self.segments(traj),
        }


def em_by_hops(questions: Sequence[W.WorldQuestion], correct: Sequence[float]) -> dict:
    """Mean EM overall, single-hop, multi-hop and per hop count (as fractions)."""
    hops = np.asarray([q.hops for q in questions])
    c = np.asarray(correct, np.float64)
    mean = lambda sel: float(c[sel].mean()) if sel.any() else 0.0
    return {
        "overall": mean(hops > 0),
        "single": mean(hops == 1),
        "multi": mean(hops > 1),
        "hops": {str(h): mean(hops == h) for h in sorted(set(hops.tolist()))},
    }


def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested dicts as {"a.b.c": value}, so a config difference names the exact keys."""
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _describe_demos(steps: int, counts: dict) -> str:
    parts = ", ".join(f"{n} {behaviour}" for behaviour, n in counts.items())
    return f"{steps} SFT steps on {sum(counts.values())} demonstrations ({parts})"


def _read_json(path: str, default):
    return read_json(path, expect=type(default) if default is not None else dict) if os.path.exists(path) else default


def run_experiment(
    cfg: ml_collections.ConfigDict, workdir: str, *, pool_file: str, progress: bool = True, pilot_only: bool = False
) -> dict:
    """Everything, in order; returns the results dict that `report.write_report` rendered. `pilot_only`:
    stop after the warm start's evaluation and dead-end pilot (`pilot.json`), training nothing."""
    t0 = time.perf_counter()
    exp = Experiment(cfg, workdir, pool_file=pool_file, progress=progress)
    _log(
        f"world: {len(exp.world.kind_of)} entities, {len(exp.train_qs)} train / {len(exp.test_qs)} test questions; "
        f"tokenizer {len(exp.tokenizer)} tokens; model {exp.model_config.num_params() / 1e6:.2f}M parameters"
    )
    with exp.open_retriever() as retriever:
        warm, warm_meta = exp.warm_start(retriever)
        warm_eval = _read_json(os.path.join(workdir, "warm_start_eval.json"), None)
        if warm_eval is None:
            warm_eval = exp.evaluate(warm, retriever)[0]
            write_json_atomic(os.path.join(workdir, "warm_start_eval.json"), warm_eval)
        _log(f"warm start test EM: single {warm_eval['single']:.3f}, multi {warm_eval['multi']:.3f}")
        pilot = run_pilot(exp, warm, retriever) if cfg.pilot or pilot_only else None
        if pilot_only:
            return {"warm_start": warm_eval, "pilot": pilot}
        runs = []
        for seed in cfg.seeds:  # seed-major: a study stopped early has complete pairs
            for arm in cfg.arms:
                run = exp.rl_run(arm, seed, warm, retriever, warm_eval)
                _log(
                    f"{arm} seed {seed}: test EM single {run['final']['single']:.3f}, multi "
                    f"{run['final']['multi']:.3f} ({run['time_s']:.0f} s)"
                )
                runs.append(run)
    rl = cfg.rl
    results = {
        "title": "REX-RAG vs GRPO on a synthetic multi-hop world",
        "setup": {
            "arms": ", ".join(get_arm(a).name for a in cfg.arms),
            "seeds": ", ".join(map(str, cfg.seeds)),
            "RL steps": rl.steps,
            "questions per step": rl.data.batch_size,
            "group size": rl.rollout.group_size,
            "probe probability": round(rl.rollout.probe_prob, 3),
            "initial probe keep ratio": rl.probes.keep_ratio,
            "learning rate": rl.optim.learning_rate,
            "train / test questions": f"{len(exp.train_qs)} / {len(exp.test_qs)}",
            "model parameters": f"{exp.model_config.num_params() / 1e6:.2f}M",
            "sampling temperature": rl.rollout.temperature,
            "warm start": _describe_demos(cfg.warm_start.steps, warm_meta.get("demonstrations", {})),
            "complete multi-hop demonstrations": (
                cfg.demos.multi.complete if cfg.demos.complete_share < 0 else cfg.demos.complete_share
            ),
            "probe prompts in demonstrations": bool(cfg.demos.pool_reflections),
            "wall time (s)": round(time.perf_counter() - t0),
        },
        "warm_start": warm_eval,
        "pilot": pilot,
        "runs": [{k: v for k, v in r.items() if k != "samples"} for r in runs],
        "samples": [s for r in runs if r["seed"] == cfg.seeds[0] for s in r["samples"]],
    }
    paths = write_report(exp.paths["report"], results)
    write_json_atomic(os.path.join(exp.paths["report"], "results.json"), results)
    _log(f"report: {paths['markdown']}")
    return results

"""The REX-RAG trainer: the only stateful piece of training (order of operations: docs/algorithm.md#training-step).

One step: rollout (originals + probes) -> rewards -> old log-probs -> probe budget (keep the top probes,
update rho) -> reference log-probs -> GRPO advantages -> mini-batch updates. Policy, frozen reference
and rollout share one mesh; the trainer owns the parameters and hands the current ones to every rollout
call (`RolloutEngine.rollout(params, ...)`); the `Decoder` it is given only supplies the graph and mesh
and is never modified. Checkpoints carry everything a restarted
run needs to continue exactly: parameters, optimizer state, step, seed, data-iterator state and rho.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from rexrag_jax.config import Config, as_config, training_rollout, validate
from rexrag_jax.data.pipeline import TrainBatches
from rexrag_jax.data.questions import QAExample
from rexrag_jax.distributed import allgather_objects, tree_to_host
from rexrag_jax.models.decoder import Decoder
from rexrag_jax.rl import correction as C
from rexrag_jax.rl.batch import TrainBatch, pack_trajectories
from rexrag_jax.rl.checkpoint import Checkpointer, abstract_like
from rexrag_jax.rl.losses import grpo_advantages
from rexrag_jax.rl.metrics import MetricsWriter
from rexrag_jax.rl.objective import SEGMENTS, RLObjective
from rexrag_jax.rl.update import batch_logprobs, init_optimizer, learning_rate, update
from rexrag_jax.rollout.engine import RolloutEngine, RolloutStats
from rexrag_jax.rollout.session import pow2_bucket
from rexrag_jax.scoring import exact_match, score
from rexrag_jax.sharding import batch_shards


def segment_metrics(updates: list[dict]) -> dict[str, float]:
    """Clip fraction, mean ratio and token count per loss segment (objective.SEGMENTS) over a step's updates."""
    out = {}
    for seg in SEGMENTS:
        n = sum(u[f"tokens_{seg}"] for u in updates)
        out[f"clip_fraction_{seg}"] = sum(u[f"clipped_{seg}"] for u in updates) / max(n, 1.0)
        out[f"ratio_mean_{seg}"] = sum(u[f"ratio_{seg}"] for u in updates) / max(n, 1.0)
        out[f"tokens_{seg}"] = int(n)
    return out


@dataclass
class StepOutput:
    metrics: dict
    kept: np.ndarray  # which trajectories entered the update


class Trainer:
    """Runs `cfg.steps` training steps in `workdir`, resuming from its newest readable checkpoint.

    `cfg`: the typed `Config` (a ConfigDict from configs/*.py is converted); its values are validated here,
    its data and retrieval sources are the caller's business (`examples`, `retriever`). `model`: the
    initial policy, also the frozen reference. `examples`: the training questions, a random-access source
    of `QAExample` (`data.load_split`) or a list; each host draws its share through `data.TrainBatches`.
    """

    def __init__(
        self,
        cfg: Config,
        workdir: str,
        *,
        model: Decoder,
        tokenizer,
        retriever,
        examples,
        encode_prompt: Callable[[str], list[int]],
        pool=None,
        engine: RolloutEngine | None = None,
    ):
        cfg = validate(as_config(cfg), inputs=False)
        self.cfg, self.workdir = cfg, workdir
        self.model, self.tokenizer = model, tokenizer
        self.encode_prompt, self._prompts = encode_prompt, {}
        self.mesh = model.mesh
        self.micro_rows = int(cfg.train.micro_batch_size)
        shards = batch_shards(self.mesh)
        if self.micro_rows % shards:
            raise ValueError(
                f"config train.micro_batch_size={self.micro_rows} must be a multiple of the mesh's "
                f"batch shards ({shards} = data x fsdp)"
            )
        self.objective = RLObjective(cfg.loss)
        self.engine = engine or RolloutEngine(model, tokenizer, retriever, training_rollout(cfg), pool)
        hosts = jax.process_count()
        if cfg.data.batch_size % hosts:
            raise ValueError(
                f"config data.batch_size={cfg.data.batch_size} (prompts per step, all hosts together) "
                f"must be a multiple of the process count {hosts}"
            )
        # Each host reads its own share of every batch; `_global_batch` puts the shares back together.
        self.batches = TrainBatches(examples, cfg.data.batch_size // hosts, seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.graphdef, params = nnx.split(model)
        self.ref_params = jax.tree.map(jnp.copy, params)  # frozen initial policy, same shardings
        self.opt_state = init_optimizer(cfg.optim, params)
        self.params = params
        self.step, self.rho = 0, float(cfg.probes.keep_ratio)
        self.ckpt = Checkpointer(
            cfg.checkpoint.directory or os.path.join(workdir, "checkpoints"),
            save_every=cfg.checkpoint.every,
            keep=cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_save,
        )
        self._restore()
        self.metrics = MetricsWriter(workdir, enabled=jax.process_index() == 0, resume_step=self.step)

    # ------------------------------------------------------------------ state

    def _state(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state}

    def _restore(self) -> None:
        restored = self.ckpt.restore(abstract_like(self._state()))
        if restored is None:
            return
        step, state, meta = restored
        self.params, self.opt_state = state["params"], state["opt_state"]
        self.step, self.rho = step, float(meta["rho"])
        self.batches.set_state(meta["data"])
        if meta.get("seed") != self.cfg.seed:
            raise ValueError(
                f"checkpoint {self.ckpt.directory}/{step} was written with seed {meta.get('seed')}, "
                f"the config says {self.cfg.seed}"
            )
        print(f"resumed from checkpoint step {step} in {self.ckpt.directory}", flush=True)

    def _prompt(self, example: QAExample) -> list[int]:
        if example.id not in self._prompts:
            self._prompts[example.id] = self.encode_prompt(example.question)
        return self._prompts[example.id]

    def _save(self, force: bool = False) -> None:
        meta = {"rho": self.rho, "data": self.batches.get_state(), "seed": int(self.cfg.seed)}
        self.ckpt.save(self.step, self._state(), meta, force=force)

    # ------------------------------------------------------------------ loop

    def run(self, on_step: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Train until `cfg.steps`; returns this process's metrics rows. Saves on the way and at the end.
        `on_step(step, metrics)` runs after each step (e.g. a periodic evaluation of the live model)."""
        rows = []
        bar = tqdm(
            total=self.cfg.steps,
            initial=self.step,
            desc=f"train {self.cfg.algorithm}",
            unit="step",
            disable=not self.cfg.progress or jax.process_index() != 0,
        )
        try:
            while self.step < self.cfg.steps:
                out = self.train_step()
                self.step += 1
                self.metrics.write(self.step, out.metrics)
                rows.append({"step": self.step, **out.metrics})
                self._save(force=self.step == self.cfg.steps)
                bar.update(1)
                bar.set_postfix(
                    reward=f"{out.metrics['reward']:.3f}",
                    probes=out.metrics["probes_kept"],
                    kl=f"{out.metrics['kl']:.2e}",
                )
                if on_step is not None:
                    on_step(self.step, out.metrics)
        finally:
            bar.close()
            self.ckpt.close()
            self.metrics.close()
        return rows

    def train_step(self) -> StepOutput:
        cfg, t_start = self.cfg, time.perf_counter()
        examples = self._global_batch()
        golds = [e.golden_answers for e in examples]
        trajs, rstats = self._rollout([self._prompt(e) for e in examples], golds)
        t_rollout = time.perf_counter()

        scores = [score(tr.response_text(self.tokenizer), golds[tr.prompt_index]) for tr in trajs]
        rewards = np.asarray([s.em for s in scores], np.float32)
        f1 = np.asarray([s.f1 for s in scores], np.float32)
        packed = pack_trajectories(
            trajs,
            length_multiple=cfg.train.length_multiple,
            row_multiple=self.micro_rows,
            prompt_probability=cfg.probes.prompt_probability,
        )
        old, entropy = self._logprobs(self.params, packed, with_entropy=True)
        kept, keep_num, mix = self._probe_budget(packed, old, rewards, len(examples))
        keep_idx = np.flatnonzero(kept)
        batch = packed.select(keep_idx, self.micro_rows)
        pad = np.zeros((len(batch.tokens) - len(keep_idx), old.shape[1]), np.float32)
        adv = np.zeros(len(batch.tokens), np.float32)
        baseline = ~batch.is_probe[: len(keep_idx)] if cfg.loss.advantage_baseline == "originals" else None
        adv[: len(keep_idx)] = np.asarray(
            grpo_advantages(rewards[keep_idx], batch.group_ids[: len(keep_idx)], baseline=baseline)
        )
        batch = batch.replace(
            old_logprobs=np.concatenate([old[keep_idx], pad]),
            ref_logprobs=self._logprobs(self.ref_params, batch)[0],
            advantages=adv,
        )
        t_logprobs = time.perf_counter()
        updates = self._update(batch, mix)
        t_end = time.perf_counter()

        is_probe, mask = packed.is_probe[: len(trajs)], batch.loss_mask[: len(keep_idx)]
        dead = C.dead_end_stats(rewards, packed.group_ids[: len(trajs)], is_probe, kept)
        dead = {k: float(v) for k, v in dead.items()}
        tokens = np.maximum([u["tokens"] for u in updates], 1)
        wmean = lambda key: float(np.average([u[key] for u in updates], weights=tokens))
        orig = ~is_probe
        metrics = {
            "reward": float(rewards[orig].mean()),
            "em": float(rewards[orig].mean()),
            "f1": float(f1[orig].mean()),
            "reward_probe": float(rewards[is_probe].mean()) if is_probe.any() else 0.0,
            "trajectories": len(trajs),
            "probes": int(is_probe.sum()),
            "probes_kept": int((kept & is_probe).sum()),
            "keep_num": keep_num,
            "rho": mix["rho"],
            "alpha": mix["alpha"],
            "epsilon": mix["error_rate"],
            "probe_accuracy": mix["probe_accuracy"],
            "lr": updates[0]["lr"],
            "updates": len(updates),
            "pg_loss": wmean("pg_loss"),
            "kl": wmean("kl"),
            "clip_fraction": wmean("clip_fraction"),
            "ratio_mean": wmean("ratio_mean"),
            "loss": wmean("loss"),
            **dead,
            **segment_metrics(updates),
            "entropy": float((entropy[keep_idx] * mask).sum() / max(mask.sum(), 1)),
            "grad_norm": max(u["grad_norm"] for u in updates),
            "skipped_updates": int(sum(u["skipped"] for u in updates)),
            "searches_per_traj": float(np.mean([tr.searches for tr in trajs])),
            "response_tokens": float(np.mean([len(tr.tokens) - tr.prompt_length for tr in trajs])),
            "decode_tokens": int(rstats.decode_tokens),
            "trained_tokens": int(mask.sum()),
            "tokens_per_s": float(batch.valid.sum() / max(t_end - t_logprobs, 1e-9)),
            "time_rollout": t_rollout - t_start,
            "time_retrieval_wait": rstats.time_retrieval_wait,
            "time_logprobs": t_logprobs - t_rollout,
            "time_update": t_end - t_logprobs,
            "time_step": t_end - t_start,
        }
        return StepOutput(metrics, kept)

    def _global_batch(self) -> list[QAExample]:
        """This step's prompts on every process, in the order one process would have drawn them: host h
        holds positions h, h + n, ... of the epoch's order, so the batch interleaves the hosts' shares.
        From here on every process computes the same step (rollouts, rewards, probe budget, updates)."""
        shares = allgather_objects(next(self.batches))
        return [shares[h][i] for i in range(len(shares[0])) for h in range(len(shares))]

    def _rollout(self, prompts: list[list[int]], golds: list) -> tuple[list, RolloutStats]:
        """Originals then probes of the whole batch, decoded `rollout.session_prompts` prompts at a time;
        group ids (prompt_index) and probe sources are batch-global. Seeds depend on (seed, step, session)."""
        cfg = self.cfg
        per = cfg.rollout.session_prompts or len(prompts)
        originals, probes, total = [], [], RolloutStats()
        for session, start in enumerate(range(0, len(prompts), per)):
            seed = int(np.random.default_rng([cfg.seed, self.step, session]).integers(2**31))
            judge = (
                (lambda p, answer, s=start: exact_match(answer, golds[s + p])) if cfg.algorithm == "rexrag" else None
            )
            trajs, stats = self.engine.rollout(self.params, prompts[start : start + per], reward_fn=judge, seed=seed)
            for tr in trajs:
                tr.prompt_index += start
                if tr.is_probe:
                    tr.source += start * cfg.rollout.group_size
            originals += [tr for tr in trajs if not tr.is_probe]
            probes += [tr for tr in trajs if tr.is_probe]
            for f in dataclasses.fields(RolloutStats):
                setattr(total, f.name, getattr(total, f.name) + getattr(stats, f.name))
        return originals + probes, total

    def _logprobs(self, params, batch, with_entropy: bool = False):
        return batch_logprobs(
            self.graphdef,
            params,
            batch,
            rows=self.micro_rows,
            mesh=self.mesh,
            chunk=self.cfg.train.logprob_chunk,
            temperature=self.cfg.rollout.temperature,
            with_entropy=with_entropy,
        )

    def _probe_budget(self, packed, old, rewards, num_prompts: int):
        """Keep every original and the `int(B G rho)` probes whose exploratory prompts the policy finds most
        likely (docs/algorithm.md#probe-budget), those of dead-end groups first with
        `probes.priority = "dead_end_groups"`; returns (kept mask, keep_num, mixture stats incl. the rho
        used). Updates rho."""
        cfg, n, rho = self.cfg, len(rewards), self.rho
        keep_num = C.probe_keep_count(num_prompts, cfg.rollout.group_size, rho, cfg.probes.keep_multiple)
        scores = np.array(C.mean_prompt_logprob(old[:n], packed.prompt_mask[:n]))  # a writable copy
        scores[~packed.prompt_mask[:n].any(axis=1)] = -np.inf  # a probe the context cap left without its prompt
        first = None
        if cfg.probes.priority == "dead_end_groups":
            first = np.asarray(C.dead_end_rows(rewards, packed.group_ids[:n], packed.is_probe[:n]))
        kept = np.asarray(C.select_probes(packed.is_probe[:n], scores, keep_num, first))
        mix = {k: float(v) for k, v in C.mixture_stats(rewards, packed.is_probe[:n], kept).items()}
        if cfg.algorithm == "rexrag":
            self.rho = float(C.update_keep_ratio(rho, mix["probe_accuracy"], cfg.probes.ewma_weight))
        return kept, keep_num, {**mix, "rho": rho}

    def _update(self, batch: TrainBatch, mix: dict) -> list[dict]:
        """Optimizer updates over consecutive mini-batches of `train.mini_batch_size` of the batch's real rows."""
        cfg = self.cfg
        lr = float(learning_rate(cfg.optim, self.step))
        mini, out = int(cfg.train.mini_batch_size), []
        for start in range(0, batch.num_rows, mini):
            stop = min(start + mini, batch.num_rows)
            # micro-batches per update in powers of two (a short last mini-batch reuses a compiled shape)
            micro = min(pow2_bucket(-(-(stop - start) // self.micro_rows)), mini // self.micro_rows)
            rows = np.arange(start, start + micro * self.micro_rows)
            real = rows < stop
            part = batch.take(np.where(real, rows, start))
            part = part.replace(loss_mask=part.loss_mask & real[:, None])  # padding rows carry no loss
            self.params, self.opt_state, m = update(
                self.graphdef,
                self.params,
                self.opt_state,
                part,
                micro_rows=self.micro_rows,
                alpha=mix["alpha"],
                error_rate=mix["error_rate"],
                lr=lr,
                mesh=self.mesh,
                objective=self.objective,
                optim_cfg=cfg.optim,
                chunk=cfg.train.logprob_chunk,
                temperature=cfg.rollout.temperature,
            )
            out.append(m)
        out = [{**{k: float(v) for k, v in m.items()}, "lr": lr} for m in tree_to_host(out)]
        skipped = sum(m["skipped"] for m in out)
        if skipped:
            print(
                f"WARNING: step {self.step + 1}: {skipped:.0f} of {len(out)} updates skipped (non-finite "
                "gradient norm); parameters and optimizer state were left unchanged",
                flush=True,
            )
        return out

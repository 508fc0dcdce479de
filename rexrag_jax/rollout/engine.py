"""The rollout engine: the host loop of the multi-turn search agent with REX-RAG's probes
(docs/algorithm.md#rollout-protocol, #mixed-sampling).

One `DecodeSession` holds every trajectory of a batch as a cache row. The loop: decode all active rows
for a chunk; rows whose turn ended are parsed (first action block, re-encoded as Search-R1 does); a
search sends its query to a retrieval thread and the row waits while the others keep decoding; the
returned `<information>` block, the invalid-action feedback or a probe's exploratory prompt is
appended with the prefill kernel, reusing the KV of everything before. Groups share one prefill.
With several processes (multi-host) each runs this same loop on the whole batch, reading every row's
tokens; searches then run in step, each host's retriever answering a share of the round's queries.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import numpy as np
from tqdm.auto import tqdm

from rexrag_jax import protocol as P
from rexrag_jax.config import RolloutConfig, check_section
from rexrag_jax.distributed import shared_map
from rexrag_jax.models.decoder import Decoder
from rexrag_jax.rollout.pages import PagesExhausted
from rexrag_jax.rollout.pool import ExplorationPool
from rexrag_jax.rollout.session import DecodeSession, check_prompts
from rexrag_jax.rollout.stops import build_stop_table, tokenizer_bytes
from rexrag_jax.sharding import batch_shards

RewardFn = Callable[[int, str], float]  # (prompt index, answer text) -> EM in {0, 1}


@dataclass
class Trajectory:
    """One rollout: `tokens` (prompt + response) with a segment label per token (protocol.PROMPT ...).
    `tokens` is the trajectory's own list, final once `rollout` returns."""

    prompt_index: int  # group id: one per prompt; probes share their source's
    tokens: list[int]
    segments: list[int]
    logprobs: list[float]  # sampling logprob of tokens the policy sampled as they stand; NaN elsewhere
    prompt_length: int
    is_probe: bool = False
    source: int = -1  # for a probe: index of the original trajectory it branched from
    probe_prompt_id: int = -1
    probe_start: int = -1  # token index of the first inserted exploratory-prompt token
    probe_conditionals: tuple[float, ...] = ()  # trie conditionals U (docs/algorithm.md#exploration-pool)
    turns: int = 0  # generations made
    turn_starts: list[int] = field(default_factory=list)  # context length when each generation began
    searches: int = 0
    finish: str = ""  # "answer", "final_turn" (the no-search turn ended) or "context" (length cap)
    answer: str | None = None

    @property
    def loss_mask(self) -> np.ndarray:
        return np.isin(np.asarray(self.segments), P.LOSS_SEGMENTS)

    def response_text(self, tokenizer) -> str:
        """Everything after the prompt, decoded (what the answer is read from)."""
        return tokenizer.decode(self.tokens[self.prompt_length :])


@dataclass
class RolloutStats:
    prefill_tokens: int = 0  # tokens written by the prefill kernel (prompts once per group, appends)
    decode_tokens: int = 0
    searches: int = 0
    probes: int = 0
    page_waits: int = 0  # a row paused for a decode chunk, or its turn deferred, for want of free KV pages
    time_decode: float = 0.0
    time_prefill: float = 0.0
    time_retrieval_wait: float = 0.0  # host blocked on retrieval with no row left to decode
    time_retrieval: float = 0.0  # inside retriever.search (overlaps decoding)
    time_total: float = 0.0


@dataclass
class _Row:
    traj: Trajectory
    turn: int = 0
    turn_start: int = 0
    done: bool = False
    waiting: bool = False  # for retrieval


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class RolloutEngine:
    """Runs the search agent over batches of prompts. `retriever` has `search(queries, k)`; `model` gives the
    architecture, graph and mesh (its own parameters are never read: each call passes the ones to use)."""

    def __init__(
        self,
        model: Decoder,
        tokenizer,
        retriever,
        config: RolloutConfig = RolloutConfig(),
        pool: ExplorationPool | None = None,
    ):
        check_section(config, "rollout")
        if config.probe_prob > 0 and pool is None:
            raise ValueError("probe_prob > 0 needs an exploration prompt pool")
        self.model, self.tokenizer, self.retriever, self.config, self.pool = model, tokenizer, retriever, config, pool
        eos = set(model.config.eos_token_id)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        vocab = model.config.vocab_size
        self._warm_shapes: tuple = ()
        self.stops = build_stop_table(
            vocab, [[e] for e in sorted(eos)], P.TURN_STOPS, tokenizer_bytes(tokenizer, vocab)
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def rollout(
        self,
        params,
        prompts: Sequence[Sequence[int]],
        *,
        reward_fn: RewardFn | None = None,
        seed: int = 0,
        progress: bool = False,
    ) -> tuple[list[Trajectory], RolloutStats]:
        """Decode with the policy parameters `params` (`nnx.state` of a model shaped like the engine's):
        `group_size` trajectories per prompt (row `p * G + g`), then probes in creation order. Everything
        the call needs lives in its own `_Run`; the engine keeps only its settings and compiled shapes."""
        if self.config.probe_prob > 0 and reward_fn is None:
            raise ValueError("probes need reward_fn(prompt_index, answer) to judge answers")
        if not prompts:
            return [], RolloutStats()
        check_prompts(prompts, self.model.config.vocab_size, "rollout")
        t_start = time.perf_counter()
        run = _Run(self, params, prompts, seed, reward_fn)
        run.loop(progress)
        run.stats.prefill_tokens = run.session.prefilled_tokens
        run.stats.probes = len(run.probes)
        run.stats.time_total = time.perf_counter() - t_start
        return run.originals + run.probes, run.stats

    def new_session(self, params, num_rows: int, seed: int) -> DecodeSession:
        """A session of `num_rows` cache rows decoding with `params`. With `precompile`, every bucket is
        compiled on the first call of each row count (so a rollout never stops to compile halfway)."""
        cfg = self.config
        session = DecodeSession(
            self.model,
            num_rows,
            cfg.max_context_length,
            self.stops,
            chunk=cfg.decode_chunk,
            prefill_chunk=cfg.prefill_chunk,
            prefill_rows=cfg.prefill_rows,
            seed=seed,
            params=params,
            page_size=cfg.kv_page_size or None,
            num_pages=cfg.kv_pages or None,
        )
        session.set_sampling(cfg.temperature, cfg.top_p, cfg.top_k)
        if cfg.precompile and self._warm_shapes != (num_rows,):
            session.warmup()
            self._warm_shapes = (num_rows,)
        return session


class _Run:
    """One `rollout` call: its session, rows, trajectories and statistics (docs/rollouts.md)."""

    def __init__(
        self, engine: RolloutEngine, params, prompts: Sequence[Sequence[int]], seed: int, reward_fn: RewardFn | None
    ):
        """A fresh session and rows; each prompt prefilled once, then copied into its group's rows."""
        self.config = cfg = engine.config
        self.tokenizer, self.retriever, self.pool = engine.tokenizer, engine.retriever, engine.pool
        self.encode = engine.encode
        shard = batch_shards(engine.model.mesh)
        g = cfg.group_size
        num_rows = -(-len(prompts) * g // shard) * shard
        self.session = session = engine.new_session(params, num_rows, seed)
        self.stats, self.seed, self.reward_fn = RolloutStats(), seed, reward_fn
        self.probes: list[Trajectory] = []
        self.rows: dict[int, _Row] = {}
        self.originals: list[Trajectory] = []
        self.to_commit: list[tuple[int, int]] = []  # (row, budget): turns to start (or waiting for KV pages)
        self.to_release: list[int] = []  # finished rows whose KV pages go back
        for p, prompt in enumerate(prompts):
            prompt = [int(t) for t in prompt][-min(cfg.max_start_length, cfg.max_context_length - 1) :]
            for k in range(g):
                traj = Trajectory(
                    p,
                    list(prompt),
                    [P.PROMPT] * len(prompt),
                    [math.nan] * len(prompt),
                    len(prompt),
                    turn_starts=[len(prompt)],
                )
                self.rows[p * g + k] = _Row(traj, turn_start=len(prompt))
                self.originals.append(traj)
        # The first row of each group in each row shard prefills the prompt; the group's other rows there
        # share its KV pages (pages never cross devices).
        source = {}
        for r in self.rows:
            source.setdefault((r // g, session.shard_of(r)), r)
        firsts = sorted(source.values())
        others = [r for r in self.rows if r not in firsts]
        for r in firsts:
            session.context[r] = list(self.rows[r].traj.tokens)
        self._timed_commit(firsts, [self._budget(len(session.context[r])) for r in firsts])
        session.copy_row([source[(r // g, session.shard_of(r))] for r in others], others)
        self._timed_commit(others, [self._budget(len(session.context[r])) for r in others])

    def loop(self, progress: bool) -> None:
        """Decode chunks until every row is done; searches run on a thread while other rows decode."""
        session, stats, cfg = self.session, self.stats, self.config
        bar = tqdm(total=len(self.rows), desc="rollout", unit="traj", disable=not progress, leave=False)
        executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval")
        in_flight: list[tuple[cf.Future, list[int]]] = []
        try:
            while not all(row.done for row in self.rows.values()):
                searches: list[tuple[int, str]] = []
                progress_made = bool(in_flight)
                if any(not row.done and not row.waiting for row in self.rows.values()):
                    t0 = time.perf_counter()
                    results = session.decode()
                    stats.time_decode += time.perf_counter() - t0
                    stats.page_waits += len(session.waiting)
                    progress_made |= bool(results)
                    for r, out in results.items():
                        row = self.rows[r]
                        row.traj.segments += [P.MODEL] * len(out.tokens)
                        row.traj.logprobs += out.logprobs
                        stats.decode_tokens += len(out.tokens)
                        if out.ended and (query := self._end_turn(r)) is not None:
                            searches.append((r, query))
                elif in_flight:
                    t0 = time.perf_counter()
                    cf.wait([f for f, _ in in_flight], return_when=cf.FIRST_COMPLETED)
                    stats.time_retrieval_wait += time.perf_counter() - t0
                if searches and jax.process_count() > 1:
                    # Several processes: retrieve in step (each host answers a share of the queries, all
                    # get all results), so every process takes the same decisions in the same order.
                    for (r, _), hits in zip(searches, self._search([q for _, q in searches])):
                        self._observe(r, P.information_block(hits[: cfg.topk]), P.INFORMATION)
                elif searches:
                    rows = [r for r, _ in searches]
                    in_flight.append((executor.submit(self._search, [q for _, q in searches]), rows))
                    for r in rows:
                        self.rows[r].waiting = True
                for fut, rows in [x for x in in_flight if x[0].done()]:
                    in_flight.remove((fut, rows))
                    for r, hits in zip(rows, fut.result()):
                        self.rows[r].waiting = False
                        self._observe(r, P.information_block(hits[: cfg.topk]), P.INFORMATION)
                for r in self.to_release:
                    session.release(r)
                self.to_release = []
                waiting = len(self.to_commit)
                self._flush_commits()
                if not progress_made and len(self.to_commit) == waiting:
                    self._out_of_pages()
                bar.n = sum(row.done for row in self.rows.values())
                bar.refresh()
        finally:
            executor.shutdown(wait=True)
            bar.close()

    # ------------------------------------------------------------------ turn handling

    def _row_rng(self, r: int, purpose: int) -> np.random.Generator:
        """Host randomness of row r's current turn (0: probe trigger, 1: pool prompt): a function of (seed,
        row, turn) only, so the order in which rows finish (retrieval timing) cannot change a rollout."""
        return np.random.default_rng([self.seed, r, self.rows[r].turn, purpose])

    def _budget(self, context_length: int) -> int:
        return min(self.config.max_response_length, self.config.max_context_length - context_length)

    def _search(self, queries: list[str]):
        t0 = time.perf_counter()
        k = self.config.topk
        hits = shared_map(lambda share: self.retriever.search(share, k) if share else [], queries)
        self.stats.time_retrieval += time.perf_counter() - t0
        if len(hits) != len(queries):
            raise RuntimeError(f"retriever returned {len(hits)} results for {len(queries)} queries")
        self.stats.searches += len(queries)
        return hits

    def _replace_turn(self, r: int, start: int, new_ids: list[int]) -> None:
        """Make `context[start:]` equal `new_ids`, keeping cache, labels and logprobs of the common prefix."""
        row, session = self.rows[r], self.session
        old = session.context[r][start:]
        keep = start + _lcp(old, new_ids)
        session.truncate(r, keep)
        session.context[r].extend(new_ids[keep - start :])
        del row.traj.segments[keep:], row.traj.logprobs[keep:]
        row.traj.segments += [P.MODEL] * (len(session.context[r]) - keep)
        row.traj.logprobs += [math.nan] * (len(session.context[r]) - keep)

    def _end_turn(self, r: int) -> str | None:
        """Parse the finished turn of row r; returns a search query to run, or None."""
        cfg, row, session = self.config, self.rows[r], self.session
        sampled = session.context[r][row.turn_start :]
        text = P.cut_response(self.tokenizer.decode(sampled, skip_special_tokens=True))
        self._replace_turn(r, row.turn_start, self.encode(text))
        action = P.parse_action(text)
        row.traj.turns += 1
        search_turn = row.turn < cfg.max_turns
        if action.kind == "answer":
            row.traj.answer = action.content
            self._finish(r, "answer")
            if (
                search_turn
                and not row.traj.is_probe
                and cfg.probe_prob > 0
                and self._row_rng(r, 0).random() < cfg.probe_prob
            ):
                if self.reward_fn(row.traj.prompt_index, action.content) < 1.0:
                    self._spawn_probe(r, text)
            return None
        if not search_turn:
            self._finish(r, "final_turn")
            return None
        if action.kind == "search":
            row.traj.searches += 1
            return action.content
        self._observe(r, P.INVALID_ACTION_FEEDBACK, P.FEEDBACK)
        return None

    def _observe(self, r: int, text: str, label: int) -> None:
        """Append an observation (truncated to max_obs_length tokens) and start the row's next turn."""
        ids = self.encode(text)[: self.config.max_obs_length]
        self._append(r, ids, label)
        self._next_turn(r)

    def _append(self, r: int, ids: list[int], label: int) -> None:
        row, session = self.rows[r], self.session
        room = self.config.max_context_length - len(session.context[r])
        ids = ids[: max(room, 0)]
        session.context[r].extend(ids)
        row.traj.segments += [label] * len(ids)
        row.traj.logprobs += [math.nan] * len(ids)

    def _next_turn(self, r: int) -> None:
        row, session = self.rows[r], self.session
        row.turn += 1
        row.turn_start = len(session.context[r])
        budget = self._budget(row.turn_start)
        if budget < 1:
            self._finish(r, "context")
        else:
            row.traj.turn_starts.append(row.turn_start)
            self.to_commit.append((r, budget))

    def _finish(self, r: int, reason: str) -> None:
        row = self.rows[r]
        row.done, row.traj.finish = True, reason
        row.traj.tokens = list(self.session.context[r])  # the trajectory's own copy (probes reuse rows)
        self.to_release.append(r)

    def _spawn_probe(self, r: int, turn_text: str) -> None:
        """Reuse row r for a probe of its (finished, wrong) trajectory: the state before the turn, the
        turn's text without the answer block, then an exploratory prompt (docs/algorithm.md#probe-construction)."""
        row, session = self.rows[r], self.session
        source = row.traj
        choice = int(self._row_rng(r, 1).integers(len(self.pool)))
        probe = Trajectory(
            source.prompt_index,
            list(source.tokens),
            list(source.segments),
            list(source.logprobs),
            source.prompt_length,
            is_probe=True,
            source=r,
            probe_prompt_id=choice,
            turns=source.turns,
            searches=source.searches,
            turn_starts=list(source.turn_starts),
        )
        self.rows[r] = _Row(probe, turn=row.turn, turn_start=row.turn_start)
        self.to_release.remove(r)  # the probe goes on in the row, from its cached prefix
        self._replace_turn(r, row.turn_start, self.encode(P.remove_answer_block(turn_text)))
        probe.probe_start = len(session.context[r])
        self._append(r, list(self.pool.token_ids[choice]), P.PROBE_PROMPT)
        probe.probe_conditionals = self.pool.conditionals[choice][: len(session.context[r]) - probe.probe_start]
        self.probes.append(probe)
        self._next_turn(r)

    def _out_of_pages(self) -> None:
        """No row can decode, retrieve or start its turn: every one waits for KV pages none can free."""
        session, cfg = self.session, self.config
        stuck = sorted({r for r, _ in self.to_commit} | set(session.waiting))
        table = session.pages.tables[0]
        raise PagesExhausted(
            f"rollout: rows {stuck[:8]}{'...' if len(stuck) > 8 else ''} wait for free KV pages and no row can "
            f"finish to free any: rollout.kv_pages={cfg.kv_pages} gives {table.num_pages} pages of "
            f"{table.page_size} tokens per row shard to {session.pages.rows_per_shard} rows there; raise "
            "rollout.kv_pages or decode fewer prompts at once (rollout.session_prompts)"
        )

    def _flush_commits(self) -> None:
        if self.to_commit:
            rows, budgets = zip(*self.to_commit)
            self.to_commit = []
            self._timed_commit(list(rows), list(budgets))

    def _timed_commit(self, rows: list[int], budgets: list[int]) -> None:
        """Start the rows' turns; those that find no free KV pages wait in `to_commit`."""
        t0 = time.perf_counter()
        failed = set(self.session.commit(rows, budgets, [True] * len(rows)))
        self.to_commit += [(r, b) for r, b in zip(rows, budgets) if r in failed]
        self.stats.page_waits += len(failed)
        self.stats.time_prefill += time.perf_counter() - t0

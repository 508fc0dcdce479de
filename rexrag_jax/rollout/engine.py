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

from rexrag_jax.distributed import shared_map
from rexrag_jax.models.decoder import Decoder
from rexrag_jax.rollout import protocol as P
from rexrag_jax.rollout.pool import ExplorationPool
from rexrag_jax.rollout.session import DecodeSession, check_prompts
from rexrag_jax.rollout.stops import build_stop_table, tokenizer_bytes
from rexrag_jax.sharding import batch_shards

RewardFn = Callable[[int, str], float]  # (prompt index, answer text) -> EM in {0, 1}


@dataclass(frozen=True)
class RolloutConfig:
    """Protocol and sampling settings; defaults are the authors' (docs/algorithm.md#constants)."""

    group_size: int = 5
    max_turns: int = 5  # search-enabled turns; one final no-search turn follows
    max_response_length: int = 500  # new tokens per turn
    max_obs_length: int = 500  # tokens of an observation
    max_start_length: int = 2048  # prompts keep their last this many tokens (and leave room for one)
    max_context_length: int = 4096  # per trajectory: prompt + everything after it
    topk: int = 3
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    probe_prob: float = 20 / 101  # chance that a wrong answer in a search turn spawns a probe; 0 = GRPO
    decode_chunk: int = 32  # decode steps per device call between host checks
    prefill_chunk: int = 512  # tokens per row per prefill call
    prefill_rows: int = 8  # rows per prefill call

    def __post_init__(self):
        for name in ("group_size", "max_turns", "max_response_length", "max_obs_length", "max_start_length",
                     "max_context_length", "topk", "decode_chunk", "prefill_chunk", "prefill_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "max_turns" else 1):
                raise ValueError(f"RolloutConfig.{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.probe_prob <= 1.0:
            raise ValueError(f"RolloutConfig.probe_prob must be in [0, 1], got {self.probe_prob}")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"RolloutConfig: need temperature >= 0 and 0 < top_p <= 1, got "
                             f"{self.temperature}, {self.top_p}")


@dataclass
class Trajectory:
    """One rollout: `tokens` (prompt + response) with a segment label per token (protocol.PROMPT ...)."""

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


@dataclass
class RolloutStats:
    prefill_tokens: int = 0  # tokens written by the prefill kernel (prompts once per group, appends)
    decode_tokens: int = 0
    searches: int = 0
    probes: int = 0
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
    """Runs the search agent over batches of prompts. `retriever` has `search(queries, k)`."""

    def __init__(self, model: Decoder, tokenizer, retriever, config: RolloutConfig = RolloutConfig(),
                 pool: ExplorationPool | None = None):
        if config.probe_prob > 0 and pool is None:
            raise ValueError("probe_prob > 0 needs an exploration prompt pool")
        self.model, self.tokenizer, self.retriever, self.config, self.pool = model, tokenizer, retriever, config, pool
        eos = set(model.config.eos_token_id)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        vocab = model.config.vocab_size
        self._warm_shapes: tuple = ()
        self.stops = build_stop_table(vocab, [[e] for e in sorted(eos)], P.TURN_STOPS, tokenizer_bytes(tokenizer, vocab))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def rollout(self, prompts: Sequence[Sequence[int]], *, reward_fn: RewardFn | None = None, seed: int = 0,
                progress: bool = False) -> tuple[list[Trajectory], RolloutStats]:
        """`group_size` trajectories per prompt (row `p * G + g`), then probes in creation order."""
        cfg = self.config
        if cfg.probe_prob > 0 and reward_fn is None:
            raise ValueError("probes need reward_fn(prompt_index, answer) to judge answers")
        if not prompts:
            return [], RolloutStats()
        t_start = time.perf_counter()
        self._start(prompts, seed, reward_fn)
        self._loop(progress)
        stats = self._stats
        stats.prefill_tokens = self._session.prefilled_tokens
        stats.probes = len(self._probes)
        stats.time_total = time.perf_counter() - t_start
        self._session = None
        return self._originals + self._probes, stats

    def _start(self, prompts: Sequence[Sequence[int]], seed: int, reward_fn: RewardFn | None) -> None:
        """A fresh session and rows; each prompt prefilled once, then copied into its group's rows."""
        cfg = self.config
        check_prompts(prompts, self.model.config.vocab_size, "rollout")
        shard = batch_shards(self.model.mesh)
        g = cfg.group_size
        num_rows = -(-len(prompts) * g // shard) * shard
        session = self._new_session(num_rows, seed)
        session.set_sampling(cfg.temperature, cfg.top_p, cfg.top_k)
        if self._warm_shapes != (num_rows,):  # first rollout of this batch shape: compile every bucket up front
            session.warmup()
            self._warm_shapes = (num_rows,)
        self._session, self._stats, self._seed = session, RolloutStats(), seed
        self._reward_fn, self._probes = reward_fn, []
        self._rows: dict[int, _Row] = {}
        self._originals: list[Trajectory] = []
        self._to_commit: list[tuple[int, int]] = []  # (row, budget)
        for p, prompt in enumerate(prompts):
            prompt = [int(t) for t in prompt][-min(cfg.max_start_length, cfg.max_context_length - 1):]
            for k in range(g):
                traj = Trajectory(p, list(prompt), [P.PROMPT] * len(prompt), [math.nan] * len(prompt), len(prompt),
                                  turn_starts=[len(prompt)])
                self._rows[p * g + k] = _Row(traj, turn_start=len(prompt))
                self._originals.append(traj)
            session.context[p * g] = list(prompt)
        firsts = list(range(0, len(prompts) * g, g))
        others = [r for r in self._rows if r % g]
        self._timed_commit(firsts, [self._budget(len(session.context[r])) for r in firsts])
        session.copy_row([r - r % g for r in others], others)
        self._timed_commit(others, [self._budget(len(session.context[r])) for r in others])

    def _loop(self, progress: bool) -> None:
        """Decode chunks until every row is done; searches run on a thread while other rows decode."""
        session, stats, cfg = self._session, self._stats, self.config
        bar = tqdm(total=len(self._rows), desc="rollout", unit="traj", disable=not progress, leave=False)
        executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval")
        in_flight: list[tuple[cf.Future, list[int]]] = []
        try:
            while not all(row.done for row in self._rows.values()):
                searches: list[tuple[int, str]] = []
                if any(not row.done and not row.waiting for row in self._rows.values()):
                    t0 = time.perf_counter()
                    results = session.decode()
                    stats.time_decode += time.perf_counter() - t0
                    for r, out in results.items():
                        row = self._rows[r]
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
                        self._rows[r].waiting = True
                for fut, rows in [x for x in in_flight if x[0].done()]:
                    in_flight.remove((fut, rows))
                    for r, hits in zip(rows, fut.result()):
                        self._rows[r].waiting = False
                        self._observe(r, P.information_block(hits[: cfg.topk]), P.INFORMATION)
                self._flush_commits()
                bar.n = sum(row.done for row in self._rows.values())
                bar.refresh()
        finally:
            executor.shutdown(wait=True)
            bar.close()

    def _new_session(self, num_rows: int, seed: int) -> DecodeSession:
        cfg = self.config
        return DecodeSession(self.model, num_rows, cfg.max_context_length, self.stops, chunk=cfg.decode_chunk,
                             prefill_chunk=cfg.prefill_chunk, prefill_rows=cfg.prefill_rows, seed=seed)

    # ------------------------------------------------------------------ turn handling

    def _row_rng(self, r: int, purpose: int) -> np.random.Generator:
        """Host randomness of row r's current turn (0: probe trigger, 1: pool prompt): a function of (seed,
        row, turn) only, so the order in which rows finish (retrieval timing) cannot change a rollout."""
        return np.random.default_rng([self._seed, r, self._rows[r].turn, purpose])

    def _budget(self, context_length: int) -> int:
        return min(self.config.max_response_length, self.config.max_context_length - context_length)

    def _search(self, queries: list[str]):
        t0 = time.perf_counter()
        k = self.config.topk
        hits = shared_map(lambda share: self.retriever.search(share, k) if share else [], queries)
        self._stats.time_retrieval += time.perf_counter() - t0
        if len(hits) != len(queries):
            raise RuntimeError(f"retriever returned {len(hits)} results for {len(queries)} queries")
        self._stats.searches += len(queries)
        return hits

    def _replace_turn(self, r: int, start: int, new_ids: list[int]) -> None:
        """Make `context[start:]` equal `new_ids`, keeping cache, labels and logprobs of the common prefix."""
        row, session = self._rows[r], self._session
        old = session.context[r][start:]
        keep = start + _lcp(old, new_ids)
        session.truncate(r, keep)
        session.context[r].extend(new_ids[keep - start:])
        row.traj.tokens = session.context[r]
        del row.traj.segments[keep:], row.traj.logprobs[keep:]
        row.traj.segments += [P.MODEL] * (len(session.context[r]) - keep)
        row.traj.logprobs += [math.nan] * (len(session.context[r]) - keep)

    def _end_turn(self, r: int) -> str | None:
        """Parse the finished turn of row r; returns a search query to run, or None."""
        cfg, row, session = self.config, self._rows[r], self._session
        sampled = session.context[r][row.turn_start:]
        text = P.cut_response(self.tokenizer.decode(sampled, skip_special_tokens=True))
        self._replace_turn(r, row.turn_start, self.encode(text))
        action = P.parse_action(text)
        row.traj.turns += 1
        search_turn = row.turn < cfg.max_turns
        if action.kind == "answer":
            row.traj.answer = action.content
            self._finish(r, "answer")
            if search_turn and not row.traj.is_probe and cfg.probe_prob > 0 and self._row_rng(r, 0).random() < cfg.probe_prob:
                if self._reward_fn(row.traj.prompt_index, action.content) < 1.0:
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
        row, session = self._rows[r], self._session
        room = self.config.max_context_length - len(session.context[r])
        ids = ids[:max(room, 0)]
        session.context[r].extend(ids)
        row.traj.segments += [label] * len(ids)
        row.traj.logprobs += [math.nan] * len(ids)

    def _next_turn(self, r: int) -> None:
        row, session = self._rows[r], self._session
        row.turn += 1
        row.turn_start = len(session.context[r])
        budget = self._budget(row.turn_start)
        if budget < 1:
            self._finish(r, "context")
        else:
            row.traj.turn_starts.append(row.turn_start)
            self._to_commit.append((r, budget))

    def _finish(self, r: int, reason: str) -> None:
        row = self._rows[r]
        row.done, row.traj.finish = True, reason
        row.traj.tokens = list(self._session.context[r])  # the row's context list lives on (probes reuse rows)

    def _spawn_probe(self, r: int, turn_text: str) -> None:
        """Reuse row r for a probe of its (finished, wrong) trajectory: the state before the turn, the
        turn's text without the answer block, then an exploratory prompt (docs/algorithm.md#probe-construction)."""
        row, session = self._rows[r], self._session
        source = row.traj
        choice = int(self._row_rng(r, 1).integers(len(self.pool)))
        probe = Trajectory(source.prompt_index, session.context[r], list(source.segments), list(source.logprobs),
                           source.prompt_length, is_probe=True, source=r, probe_prompt_id=choice,
                           turns=source.turns, searches=source.searches, turn_starts=list(source.turn_starts))
        self._rows[r] = _Row(probe, turn=row.turn, turn_start=row.turn_start)
        self._replace_turn(r, row.turn_start, self.encode(P.remove_answer_block(turn_text)))
        probe.probe_start = len(session.context[r])
        self._append(r, list(self.pool.token_ids[choice]), P.PROBE_PROMPT)
        probe.probe_conditionals = self.pool.conditionals[choice][: len(session.context[r]) - probe.probe_start]
        self._probes.append(probe)
        self._next_turn(r)

    def _flush_commits(self) -> None:
        if self._to_commit:
            rows, budgets = zip(*self._to_commit)
            self._to_commit = []
            self._timed_commit(list(rows), list(budgets))

    def _timed_commit(self, rows: list[int], budgets: list[int]) -> None:
        t0 = time.perf_counter()
        self._session.commit(rows, budgets, [True] * len(rows))
        self._stats.time_prefill += time.perf_counter() - t0

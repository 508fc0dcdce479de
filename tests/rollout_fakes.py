"""A scripted stand-in for `DecodeSession`: the policy is a Python function of the row's context text.

It lets the protocol tests choose exactly what the "model" says each turn, while the engine's host loop,
the stop automata (stepped here on the host with the engine's real StopTable) and the tokenizer are real.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rexrag_jax.rollout.engine import RolloutEngine
from rexrag_jax.rollout.session import ChunkResult
from rexrag_jax.rollout.stops import StopTable

EOS = "<EOS>"  # a policy text ending with this marker also emits the tokenizer's EOS token

Policy = Callable[[int, str], str]  # (row, context text so far) -> this turn's text


class ScriptedSession:
    def __init__(self, num_rows: int, max_length: int, stops: StopTable, tokenizer, policy: Policy):
        self.num_rows, self.max_length, self.stops, self.tok, self.policy = (
            num_rows,
            max_length,
            stops,
            tokenizer,
            policy,
        )
        self.context: list[list[int]] = [[] for _ in range(num_rows)]
        self.cached = np.zeros(num_rows, np.int64)
        self.active = np.zeros(num_rows, bool)
        self.budget = np.zeros(num_rows, np.int64)
        self.prefilled_tokens = 0
        self.commits: list[list[int]] = []
        self.released: list[int] = []
        self.waiting: list[int] = []

    def shard_of(self, row):
        return 0

    def release(self, row):
        self.released.append(row)
        self.cached[row] = 0

    def set_sampling(self, *args):
        pass

    def warmup(self):
        pass

    def truncate(self, row, length):
        del self.context[row][length:]
        self.cached[row] = min(self.cached[row], length)

    def copy_row(self, srcs, dsts):
        for s, d in zip(srcs, dsts):
            self.context[d] = list(self.context[s])
            self.cached[d] = self.cached[s]

    def commit(self, rows, budgets, activate):
        self.commits.append(list(rows))
        for r, b, a in zip(rows, budgets, activate):
            assert len(self.context[r]) - 1 + b <= self.max_length
            self.prefilled_tokens += len(self.context[r]) - 1 - min(int(self.cached[r]), len(self.context[r]) - 1)
            self.cached[r] = len(self.context[r]) - 1
            self.budget[r], self.active[r] = b, a
        return []

    def decode(self):
        out = {}
        for r in np.flatnonzero(self.active):
            text = self.policy(int(r), self.tok.decode(self.context[r]))
            eos = text.endswith(EOS)
            ids = self.tok(text.removesuffix(EOS), add_special_tokens=False)["input_ids"]
            ids = ids + [self.tok.convert_tokens_to_ids("<|im_end|>")] * eos
            state = np.zeros(self.stops.num_stops, np.int64)
            emitted, hit = [], -1
            for t in ids[: self.budget[r]]:
                emitted.append(t)
                state = self.stops.table[np.arange(self.stops.num_stops), state, t].astype(np.int64)
                if (state == self.stops.accept).any():
                    hit = int(np.argmax(state == self.stops.accept))
                    break
            if not emitted:
                emitted = [self.tok.convert_tokens_to_ids("<|im_end|>")]
            self.context[r].extend(emitted)
            self.cached[r] += len(emitted)
            self.active[r] = False
            out[int(r)] = ChunkResult(emitted, [-0.5] * len(emitted), True, hit)
        return out


class ScriptedEngine(RolloutEngine):
    """The real engine with the device session replaced by `ScriptedSession`."""

    def __init__(self, *args, policy: Policy, **kwargs):
        super().__init__(*args, **kwargs)
        self.policy = policy

    def new_session(self, params, num_rows, seed):
        self.params_seen = getattr(self, "params_seen", []) + [params]  # what each rollout call decoded with
        self.session = ScriptedSession(
            num_rows, self.config.max_context_length, self.stops, self.tokenizer, self.policy
        )
        return self.session


class FakeRetriever:
    """Returns `k` fixed passages per query whose text names the query; records every call."""

    def __init__(self, text: str = "body"):
        self.calls: list[tuple[list[str], int]] = []
        self.text = text

    def search(self, queries, k):
        self.calls.append((list(queries), k))
        return [
            [{"id": f"{q}-{i}", "contents": f'"Title {i} {q}"\n{self.text} {i}'} for i in range(k + 2)] for q in queries
        ]

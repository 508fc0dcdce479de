"""The training input pipeline: a grain `MapDataset` over QA examples, sharded per host, resumable.

`TrainBatches(source, batch_size, seed=...)` yields lists of `batch_size` `QAExample`s forever, epoch after
epoch. `source` is anything with `len` and `__getitem__ -> QAExample`: a split from
`tfds_builders.load_split`, or a plain list.

Order. Epoch e is a permutation of all N examples (grain's index shuffle with seed `seed + e`; the identity
with `shuffle=False`), cut to the largest multiple of the host count M = (N // n) * n; host i takes
positions i, i+n, i+2n, ... of that, so the n hosts get disjoint shares of N // n examples each and together
cover the epoch (the N - M left over are different ones each shuffled epoch). Each host batches its share
within the epoch: a batch never spans two epochs, and with `drop_remainder` (the default) a tail that does
not fill a batch is dropped, so every host yields the same number of batches per epoch.

State. The pipeline is a pure function of the batch number, so the state is that number plus what defines
the order (dataset size, seed, batch size, shuffle, host count, drop_remainder), all JSON-serialisable. It is
the same on every host (the host index is not part of it), so the primary host's copy in a checkpoint
restores every host. `set_state` refuses a state made for a different order.

grain is used in-process (no worker processes: those need absl flags parsed and the spawn start method).
"""

from __future__ import annotations

from collections.abc import Sequence

import grain

from rexrag_jax.data.questions import QAExample

_STATE_VERSION = 1
_ORDER_KEYS = ("num_examples", "seed", "batch_size", "shuffle", "process_count", "drop_remainder")


class _ListSource:
    """A list of examples as a grain random-access source (with batched reads)."""

    def __init__(self, examples: Sequence[QAExample]):
        self._examples = list(examples)

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, i: int) -> QAExample:
        return self._examples[i]

    def _getitems(self, indices: Sequence[int]) -> list[QAExample]:
        return [self._examples[i] for i in indices]


class TrainBatches:
    """Seeded, per-host, resumable batches of QA examples (see the module docstring)."""

    def __init__(
        self,
        source,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        drop_remainder: bool = True,
    ):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if isinstance(source, (list, tuple)):
            source = _ListSource(source)
        n = len(source)
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        per_host = n // process_count
        if per_host < 1:
            raise ValueError(f"{n} examples cannot be shared by {process_count} hosts")
        if batch_size < 1 or (drop_remainder and batch_size > per_host):
            raise ValueError(
                f"batch_size {batch_size} must be in [1, {per_host}] (the examples per host per epoch: "
                f"{n} examples / {process_count} host(s))"
            )
        self.source = source
        self.num_examples, self.batch_size, self.seed, self.shuffle = n, int(batch_size), int(seed), bool(shuffle)
        self.process_index, self.process_count, self.drop_remainder = process_index, process_count, drop_remainder
        self.examples_per_epoch = per_host  # per host

        ds = grain.MapDataset.source(source)
        if shuffle:
            ds = ds.shuffle(seed=self.seed)
        if per_host * process_count != n:
            ds = ds[: per_host * process_count]
        if process_count > 1:
            ds = ds[process_index::process_count]
        ds = ds.batch(self.batch_size, drop_remainder=drop_remainder, batch_fn=list)
        self.batches_per_epoch = len(ds)
        self._batches = ds.repeat(None)
        self._next = 0

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._next // self.batches_per_epoch

    @property
    def step(self) -> int:
        """How many batches have been taken."""
        return self._next

    def __iter__(self):
        return self

    def __next__(self) -> list[QAExample]:
        batch = self._batches[self._next]
        self._next += 1
        return batch

    def _order(self) -> dict:
        return {
            "num_examples": self.num_examples,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "process_count": self.process_count,
            "drop_remainder": self.drop_remainder,
        }

    def get_state(self) -> dict:
        return {"version": _STATE_VERSION, "next_batch": self._next, "epoch": self.epoch, **self._order()}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION or "next_batch" not in state:
            raise ValueError(f"not a TrainBatches state (version {_STATE_VERSION}): {state!r}"[:300])
        order = self._order()
        diff = [f"{k}: state {state.get(k)!r}, here {order[k]!r}" for k in _ORDER_KEYS if state.get(k) != order[k]]
        if diff:
            raise ValueError(
                "the data iterator state belongs to a different dataset or batching (" + "; ".join(diff) + ")"
            )
        next_batch = state["next_batch"]
        if not isinstance(next_batch, int) or isinstance(next_batch, bool) or next_batch < 0:
            raise ValueError(f"bad next_batch {next_batch!r} in the data iterator state")
        self._next = next_batch

"""TrainBatches: the grain training pipeline (seeded per-epoch shuffle, per-host sharding, resumable state)."""

from __future__ import annotations

import itertools
import json

import pytest

from rexrag_jax.data import QAExample
from rexrag_jax.data.pipeline import TrainBatches

EXAMPLES = [QAExample(f"id{i}", f"question {i}?", (f"a{i}",), "nq") for i in range(24)]


def take(it, n):
    return [[ex.id for ex in batch] for batch in itertools.islice(it, n)]


def test_deterministic_for_a_seed():
    a = take(TrainBatches(EXAMPLES, 4, seed=3, process_index=0, process_count=1), 20)
    b = take(TrainBatches(EXAMPLES, 4, seed=3, process_index=0, process_count=1), 20)
    c = take(TrainBatches(EXAMPLES, 4, seed=4, process_index=0, process_count=1), 20)
    assert a == b and a != c
    assert all(len(batch) == 4 for batch in a)


def test_every_example_once_per_epoch_and_epochs_differ():
    it = TrainBatches(EXAMPLES, 4, seed=0, process_index=0, process_count=1)
    assert it.batches_per_epoch == 6
    epochs = []
    for e in range(3):
        assert it.epoch == e
        ids = [i for batch in take(it, 6) for i in batch]
        assert sorted(ids) == sorted(ex.id for ex in EXAMPLES)
        epochs.append(ids)
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    unshuffled = TrainBatches(EXAMPLES, 4, seed=0, shuffle=False, process_index=0, process_count=1)
    assert [i for batch in take(unshuffled, 12) for i in batch] == [ex.id for ex in EXAMPLES] * 2


def test_remainder_within_an_epoch():
    it = TrainBatches(EXAMPLES[:10], 4, seed=1, process_index=0, process_count=1)  # 2 full batches, 2 dropped
    assert it.batches_per_epoch == 2 and len({i for b in take(it, 2) for i in b}) == 8
    short = TrainBatches(EXAMPLES[:10], 4, seed=1, process_index=0, process_count=1, drop_remainder=False)
    assert [len(b) for b in take(short, 6)] == [4, 4, 2, 4, 4, 2]  # a batch never spans two epochs
    with pytest.raises(ValueError, match=r"batch_size 11 must be in \[1, 10\]"):
        TrainBatches(EXAMPLES[:10], 11, seed=0, process_index=0, process_count=1)


@pytest.mark.parametrize("n", [24, 23])
def test_two_hosts_disjoint_and_covering(n):
    hosts = [TrainBatches(EXAMPLES[:n], 3, seed=7, process_index=i, process_count=2) for i in range(2)]
    per_epoch = hosts[0].batches_per_epoch
    assert per_epoch == hosts[1].batches_per_epoch == (n // 2) // 3
    for _ in range(3):
        shares = [{i for b in take(h, per_epoch) for i in b} for h in hosts]
        assert not shares[0] & shares[1]
        assert len(shares[0]) == len(shares[1]) == (n // 2) // 3 * 3
        if n == 24:
            assert shares[0] | shares[1] == {ex.id for ex in EXAMPLES}
    with pytest.raises(ValueError, match="process_index 2 must be in"):
        TrainBatches(EXAMPLES, 3, seed=0, process_index=2, process_count=2)


def test_state_round_trip_across_an_epoch_boundary():
    it = TrainBatches(EXAMPLES, 5, seed=11, process_index=1, process_count=2)  # 12 per host: 2 batches/epoch
    take(it, 3)  # into the second epoch
    state = json.loads(json.dumps(it.get_state()))
    assert state["next_batch"] == 3 and state["epoch"] == 1
    expected = take(it, 5)  # crosses into epochs 2 and 3
    restored = TrainBatches(EXAMPLES, 5, seed=11, process_index=1, process_count=2)
    restored.set_state(state)
    assert take(restored, 5) == expected
    # the state has no host index: host 0 restores from host 1's copy to its own position
    other = TrainBatches(EXAMPLES, 5, seed=11, process_index=0, process_count=2)
    other.set_state(state)
    assert other.step == 3


@pytest.mark.parametrize(
    "kwargs,examples,message",
    [
        ({"seed": 12}, EXAMPLES, "seed: state 11, here 12"),
        ({"seed": 11, "process_count": 1}, EXAMPLES, "process_count: state 2, here 1"),
        ({"seed": 11}, EXAMPLES[:20], "num_examples: state 24, here 20"),
        ({"seed": 11, "shuffle": False}, EXAMPLES, "shuffle: state True, here False"),
    ],
)
def test_mismatched_state_is_refused(kwargs, examples, message):
    state = TrainBatches(EXAMPLES, 5, seed=11, process_index=0, process_count=2).get_state()
    kwargs = {"process_index": 0, "process_count": 2, **kwargs}
    with pytest.raises(ValueError, match="belongs to a different dataset or batching.*" + message):
        TrainBatches(examples, 5, **kwargs).set_state(state)
    with pytest.raises(ValueError, match="batch_size: state 5, here 4"):
        TrainBatches(EXAMPLES, 4, seed=11, process_index=0, process_count=2).set_state(state)
    with pytest.raises(ValueError, match="not a TrainBatches state"):
        TrainBatches(EXAMPLES, 5, seed=11, process_index=0, process_count=2).set_state({"epoch": 0, "position": 0})


def test_over_a_built_split(tmp_path):
    from rexrag_jax.data.tfds_builders import TRAIN_MIX, build_dataset, load_split

    path = tmp_path / "train.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": ex.id, "question": ex.question, "golden_answers": list(ex.golden_answers)}) + "\n"
            for ex in EXAMPLES[:12]
        )
    )
    build_dataset(TRAIN_MIX, {"train": str(path)}, str(tmp_path / "tfds"))
    source = load_split(TRAIN_MIX, "train", str(tmp_path / "tfds"))
    it = TrainBatches(source, 4, seed=5)  # host defaults from jax: process 0 of 1
    from_list = TrainBatches(list(source), 4, seed=5)
    got = [b for b in itertools.islice(it, 6)]
    assert got == [b for b in itertools.islice(from_list, 6)]
    assert all(isinstance(ex, QAExample) for b in got for ex in b)
    assert sorted(ex.id for b in got[:3] for ex in b) == sorted(ex.id for ex in EXAMPLES[:12])
    assert {ex.source for b in got for ex in b} == {"train"}  # a lone JSONL file outside a dataset folder

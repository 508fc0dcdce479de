"""The arms of the embedded comparison: named RL recipes, each a set of overrides of the `rl` config.

An arm is what a study compares under a paired seed (same warm start, same questions): the baseline
GRPO, GRPO with REX-RAG's extra decode budget, REX-RAG as the authors run it, and REX-RAG with the
decoupled correction and dead-end-first probe budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Arm:
    name: str  # shown in tables and plots
    colour: str
    overrides: Mapping[str, Any] = field(default_factory=dict)  # dotted `rl` config keys

    @property
    def algorithm(self) -> str:
        return self.overrides["algorithm"]


ARMS = {
    "grpo": Arm("GRPO (G=5)", "#1f77b4", {"algorithm": "grpo"}),
    # REX-RAG decodes ~20% more trajectories than G=5 GRPO (its probes): GRPO given that budget as originals
    "grpo_g6": Arm("GRPO (G=6)", "#17becf", {"algorithm": "grpo", "rollout.group_size": 6}),
    "rexrag": Arm("REX-RAG", "#d62728", {"algorithm": "rexrag"}),
    "rexrag_dd": Arm(
        "REX-RAG decoupled + dead-end-first",
        "#ff7f0e",
        {"algorithm": "rexrag", "loss.correction": "decoupled", "probes.priority": "dead_end_groups"},
    ),
}


def get_arm(key: str) -> Arm:
    if key not in ARMS:
        raise ValueError(f"unknown arm {key!r}; expected one of {sorted(ARMS)}")
    return ARMS[key]


def apply_arm(rl_config, key: str) -> None:
    """Set the arm's overrides on a (mutable) `rl` ConfigDict."""
    for dotted, value in get_arm(key).overrides.items():
        *parents, leaf = dotted.split(".")
        node = rl_config
        for p in parents:
            node = node[p]
        node[leaf] = value

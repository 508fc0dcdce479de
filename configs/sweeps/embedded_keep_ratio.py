"""The embedded default (`make demo`) at three initial probe keep ratios (the paper's 8% in the middle).

`python launch/sweep.py configs/sweeps/embedded_keep_ratio.py`: each run is a whole `rexrag-demo` (world,
warm start, GRPO and REX-RAG for each seed; ~11 minutes on 2 CPU cores). GRPO keeps no probes, so only its
REX-RAG columns should move with the ratio.
"""


def get_sweep() -> dict:
    return {
        "config": "configs/embedded.py",
        "entry": "demo",
        "grid": {"rl.probes.keep_ratio": [0.04, 0.08, 0.2]},
        "metrics": ["warm_start.multi", "grpo.multi", "rexrag.multi", "grpo.overall", "rexrag.overall"],
    }

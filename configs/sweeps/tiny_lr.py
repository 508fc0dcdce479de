"""GRPO vs REX-RAG at two learning rates on the tiny CPU config: 4 runs of 2 steps (minutes on a laptop).

`python launch/sweep.py configs/sweeps/tiny_lr.py`. A random policy rarely answers, so this checks the
sweep machinery (one workdir, log and metrics row per run), not learning.
"""


def get_sweep() -> dict:
    return {
        "config": "configs/tiny_cpu.py",
        "entry": "train",
        "grid": {"algorithm": ["grpo", "rexrag"], "optim.learning_rate": [1e-4, 1e-3]},
        # test_train_cli's cut-down: 2 questions x 2 rollouts, one search turn, short answers
        "fixed": {
            "steps": 2,
            "data.batch_size": 2,
            "rollout.group_size": 2,
            "rollout.max_turns": 1,
            "rollout.max_response_length": 12,
            "progress": False,
        },
        "metrics": ["step", "reward", "em", "kl", "probes_kept", "lr"],
    }

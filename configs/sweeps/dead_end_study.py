"""The dead-end study: GRPO vs REX-RAG on the embedded world at three dead-end levels, 16 paired seeds.

`python launch/sweep.py configs/sweeps/dead_end_study.py --parallel 3`, then
`python -m rexrag_jax.cli.study_report --root workdir/sweeps/dead_end_study --out benchmarks/measured/dead_end_study`.

A level is a warm start: the share of complete chains among its multi-hop demonstrations (the rest stop
short, reflect or guess). The dead-end pilot of each (`rexrag-pilot`, also in every run's report) put
them at about 30%, 60% and 90% of multi-hop training groups with all G=5 samples wrong. Reflections never
use the exploratory prompts' sentences, so a probe's prompt is new to the policy, as for an LLM.
Each level runs every arm for every seed from the same warm start, seed-major, so a stopped study holds
complete pairs; rerunning resumes (finished runs are skipped; `--rerun` re-enters a level marked done,
e.g. after adding seeds: a workdir accepts more `seeds` and `arms`).
Primary metric (fixed before running): multi-hop test EM averaged over the last two evaluations (steps 15
and 20), test fraction 0.4 (223 questions, 135 multi-hop).
"""

ARMS = ("grpo", "grpo_g6", "rexrag", "rexrag_dd")


def get_sweep() -> dict:
    return {
        "config": "configs/embedded.py",
        "entry": "demo",
        "grid": {"demos.complete_share": [0.3, 0.17, 0.0]},
        "fixed": {
            "arms": ARMS,
            "seeds": tuple(range(16)),
            "world.test_fraction": 0.4,
            "demos.pool_reflections": False,
            "eval_every": 5,
        },
        "metrics": ["warm_start.multi"] + [f"{a}.multi" for a in ARMS] + ["grpo.seeds", "rexrag_dd.seeds"],
    }

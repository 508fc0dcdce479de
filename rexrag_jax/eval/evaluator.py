"""Greedy-EM evaluation of the search agent over QA datasets, resumable, in the paper's table layout.

Each dataset's trajectories go to `out_dir/trajectories/<name>.jsonl`, one line per example, appended
and flushed batch by batch; a rerun reads the finished ids back and continues with the rest, so an
interrupted evaluation loses at most one batch. Scores are recomputed from those files at the end.
With several processes (multi-host) all of them decode every batch together; process 0 alone reads and
writes the files and shares what it read (finished ids, final scores) with the others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence

from tqdm.auto import tqdm

from rexrag_jax.config import RolloutConfig
from rexrag_jax.distributed import allgather_objects
from rexrag_jax.jsonfile import write_json_atomic
from rexrag_jax.scoring import score

# (dataset, column title) in the order of the paper's results table (docs/algorithm.md#data-and-evaluation).
PAPER_COLUMNS = (
    ("nq", "NQ"),
    ("triviaqa", "TriviaQA"),
    ("popqa", "PopQA"),
    ("hotpotqa", "HotpotQA"),
    ("2wikimultihopqa", "2wiki"),
    ("musique", "Musique"),
    ("bamboogle", "Bamboogle"),
)


def _done_rows(path: str) -> list[dict]:
    """Finished rows of a trajectories file; a last line cut short by a crash is dropped (and rewritten)."""
    if not os.path.exists(path):
        return []
    rows, intact = [], True
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 2:  # damage before the last line is not a crash artefact
                raise ValueError(f"{path}:{i + 1}: not JSON; delete the file to re-run this dataset") from None
            intact = False
    if not intact:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def check_greedy(cfg: RolloutConfig) -> None:
    if cfg.group_size != 1 or cfg.probe_prob != 0 or cfg.temperature != 0:
        raise ValueError(
            "evaluation decodes greedily, one trajectory per question, without probes; got "
            f"group_size={cfg.group_size}, probe_prob={cfg.probe_prob}, temperature={cfg.temperature}"
        )


def greedy_rollouts(engine, params, prompts: Sequence[list[int]], *, batch_size: int) -> Iterator[list]:
    """The trajectories of `prompts` under `params`, `batch_size` prompts per rollout, in order. `engine`
    must decode as an evaluation does (`config.greedy_rollout`: greedy, one trajectory each, no probes)."""
    check_greedy(engine.config)
    for start in range(0, len(prompts), batch_size):
        yield engine.rollout(params, prompts[start : start + batch_size], seed=0)[0]


def evaluate(
    engine,
    params,
    tokenizer,
    datasets: dict[str, Sequence],
    out_dir: str,
    *,
    encode_prompt: Callable[[str], list[int]],
    batch_size: int = 64,
    progress: bool = True,
) -> dict:
    """Run `engine` (`greedy_rollouts`) with policy `params` on every example of every dataset.

    `datasets` maps a name to QAExamples (id, question, golden_answers). Returns and writes
    `out_dir/results.json` and `out_dir/results.md` (EM and F1 x 100 per dataset and their mean); an
    interrupted evaluation continues where its trajectories files stop.
    """
    check_greedy(engine.config)
    import jax

    writer = jax.process_index() == 0
    if writer:
        os.makedirs(os.path.join(out_dir, "trajectories"), exist_ok=True)
    for name, examples in datasets.items():
        path = os.path.join(out_dir, "trajectories", f"{name}.jsonl")
        done = allgather_objects({r["id"] for r in _done_rows(path)} if writer else None)[0]
        todo = [e for e in examples if e.id not in done]
        bar = tqdm(
            total=len(examples),
            initial=len(examples) - len(todo),
            desc=f"eval {name}",
            unit="q",
            disable=not progress or not writer,
        )
        prompts = [encode_prompt(e.question) for e in todo]
        for start, trajs in zip(
            range(0, len(todo), batch_size), greedy_rollouts(engine, params, prompts, batch_size=batch_size)
        ):
            batch = todo[start : start + batch_size]
            if not writer:
                continue
            with open(path, "a", encoding="utf-8") as f:
                for example, traj in zip(batch, trajs):
                    response = traj.response_text(tokenizer)
                    s = score(response, list(example.golden_answers))
                    f.write(
                        json.dumps(
                            {
                                "id": example.id,
                                "question": example.question,
                                "golden_answers": list(example.golden_answers),
                                "prediction": s.prediction,
                                "em": s.em,
                                "f1": s.f1,
                                "turns": traj.turns,
                                "searches": traj.searches,
                                "finish": traj.finish,
                                "response": response,
                            }
                        )
                        + "\n"
                    )
                f.flush()
                os.fsync(f.fileno())
            bar.update(len(batch))
        bar.close()
    ids = {name: [e.id for e in examples] for name, examples in datasets.items()}
    return allgather_objects(write_results(out_dir, ids) if writer else None)[0]


def write_results(out_dir: str, ids: dict[str, Sequence[str]]) -> dict:
    """Scores of the given example ids per dataset (rows of earlier, larger runs in the same folder are not
    counted), from the trajectories files, as results.json and a markdown table."""
    results = {}
    for name, wanted in ids.items():
        wanted = set(wanted)
        rows = [r for r in _done_rows(os.path.join(out_dir, "trajectories", f"{name}.jsonl")) if r["id"] in wanted]
        n = len(rows)
        results[name] = {
            "n": n,
            "em": 100 * sum(r["em"] for r in rows) / max(n, 1),
            "f1": 100 * sum(r["f1"] for r in rows) / max(n, 1),
        }
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(results_table(results))
    return results


def results_table(results: dict) -> str:
    """Markdown: the paper's columns first (those evaluated), any other datasets after, then Avg; EM and F1 rows."""
    known = [(n, t) for n, t in PAPER_COLUMNS if n in results]
    others = [(n, n) for n in results if n not in dict(PAPER_COLUMNS)]
    columns = known + others
    lines = ["| metric | " + " | ".join(t for _, t in columns) + " | Avg |", "|---" * (len(columns) + 2) + "|"]
    for metric in ("em", "f1"):
        values = [results[n][metric] for n, _ in columns]
        avg = sum(values) / max(len(values), 1)
        lines.append(f"| {metric.upper()} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {avg:.1f} |")
    lines.append("| n | " + " | ".join(str(results[n]["n"]) for n, _ in columns) + " | |")
    return "\n".join(lines) + "\n"

"""TPU slice recipes for the paper's models: mesh, micro-batch and rollout session size per (model, slice),
each checked against `planning.memory`'s per-device estimate.

`configs/qwen2p5_3b.py:v5p-16` (config_flags passes the text after ':' to `get_config`) applies the recipe
for that slice. A recipe is chosen as: every chip on FSDP if the update fits, else a tensor axis of 2, then
4; 2 rows per device per micro-batch (8192 tokens at 4096 context) unless only 1 fits; and the largest
rollout session (prompts decoded together, a divisor of the 512-prompt batch) whose KV cache fits beside
the persistent state, all within `HEADROOM` of nominal HBM (the estimate's transients are within ~15%).
A recipe with `kv_pages` sizes a paged cache from the measured trajectory lengths instead of
`rows x context` (docs/scale_out.md).
Plain Python, no jax: slices can be sized from a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rexrag_jax.planning.memory import GIB, TPU_HBM_GIB, estimate_training_memory

HEADROOM = 0.9  # fraction of nominal HBM a recipe may plan for
SLICE_CHIPS = {"v5p-8": 4, "v5p-16": 8, "v5p-32": 16, "v6e-8": 8, "v6e-16": 16}  # v5p-N counts TensorCores
CONTEXT = 4096  # rollout.max_context_length of the paper's run, also the longest update bucket


@dataclass(frozen=True)
class Recipe:
    mesh: tuple[int, int, int]  # data, fsdp, tensor
    micro_batch_size: int  # global rows per micro-batch (train.micro_batch_size)
    session_prompts: int  # rollout.session_prompts (0 = the whole batch in one session)
    kv_page_size: int = 0  # rollout.kv_page_size (0 = a contiguous rows x context cache)
    kv_pages: int = 0  # rollout.kv_pages: the paged pool of a session (0 = every row's full context)

    @property
    def mesh_dict(self) -> dict[str, int]:
        return dict(zip(("data", "fsdp", "tensor"), self.mesh))


RECIPES: dict[tuple[str, str], Recipe] = {
    # One session of all 2560 rows in 16-token pages: 75,000 pages (41.2 GiB) per chip hold the paper's
    # rollout even with every turn at its 500-token cap (40.2 GiB, 95% interval to 41.0: docs/scale_out.md).
    ("qwen2.5-3b", "v5p-8"): Recipe((1, 4, 1), 8, 0, kv_page_size=16, kv_pages=300_000),
    ("qwen2.5-3b", "v5p-16"): Recipe((1, 8, 1), 16, 0),
    ("qwen2.5-3b", "v5p-32"): Recipe((1, 16, 1), 32, 0),
    ("qwen2.5-3b", "v6e-8"): Recipe((1, 8, 1), 16, 128),
    ("qwen2.5-3b", "v6e-16"): Recipe((1, 16, 1), 32, 0),
    ("qwen2.5-7b", "v5p-8"): Recipe((1, 4, 1), 8, 128),
    ("qwen2.5-7b", "v5p-16"): Recipe((1, 8, 1), 16, 256),
    ("qwen2.5-7b", "v5p-32"): Recipe((1, 16, 1), 32, 0),
    ("qwen2.5-7b", "v6e-8"): Recipe((1, 2, 4), 2, 64),  # the tightest: 1 row per device, tensor 4
    ("qwen2.5-7b", "v6e-16"): Recipe((1, 8, 2), 16, 256),
}


def recipe(model: str, slice_name: str) -> Recipe:
    if (model, slice_name) not in RECIPES:
        known = sorted({s for m, s in RECIPES if m == model})
        raise ValueError(f"no recipe for {model} on {slice_name!r}; known slices: {known}")
    return RECIPES[(model, slice_name)]


def recipe_memory(
    model: str, slice_name: str, *, batch_prompts: int = 512, group_size: int = 5, context: int = CONTEXT
) -> dict[str, Any]:
    """GiB per device of a recipe: persistent state, update peak, rollout peak of one session, the total
    against HBM, and the rows one session decodes."""
    from rexrag_jax.config import QWEN25_ARCHS

    r = recipe(model, slice_name)
    prompts = r.session_prompts or batch_prompts
    rows = prompts * group_size
    e = estimate_training_memory(
        QWEN25_ARCHS[model],
        r.mesh_dict,
        micro_batch_rows=r.micro_batch_size,
        seq_len=context,
        rollout_rows=rows,
        rollout_context=context,
        kv_pages=r.kv_pages,
        kv_page_size=r.kv_page_size,
    )
    hbm = TPU_HBM_GIB[slice_name.split("-")[0]]
    out = {k: e[k] / GIB for k in ("persistent", "update_peak", "kv_cache", "rollout_peak", "total")}
    return {
        "model": model,
        "slice": slice_name,
        "mesh": r.mesh_dict,
        "micro_batch_size": r.micro_batch_size,
        "session_prompts": r.session_prompts,
        "session_rows": rows,
        "kv_page_size": r.kv_page_size,
        "kv_pages": r.kv_pages,
        "hbm": hbm,
        **out,
        "fits": out["total"] <= HEADROOM * hbm,
    }


def apply_recipe(c, model: str, slice_name: str):
    """Set `c.mesh`, `c.train.micro_batch_size` and the rollout's session and KV pages from the recipe."""
    r = recipe(model, slice_name)
    c.mesh.update(r.mesh_dict)
    c.train.micro_batch_size = r.micro_batch_size
    c.rollout.session_prompts = r.session_prompts
    c.rollout.kv_page_size = r.kv_page_size
    c.rollout.kv_pages = r.kv_pages
    return c


def recipes_table() -> str:
    """Markdown: every recipe with its per-device memory estimate."""
    lines = [
        "| model | slice (chips) | mesh d/f/t | micro-batch rows | session prompts (rows) | params+ref+AdamW "
        "| update peak | rollout peak | total | HBM |",
        "|" + "---|" * 10,
    ]
    for model, slice_name in RECIPES:
        m = recipe_memory(model, slice_name)
        mesh = "/".join(str(m["mesh"][a]) for a in ("data", "fsdp", "tensor"))
        session = f"{m['session_prompts'] or 'all 512'} ({m['session_rows']})"
        if m["kv_pages"]:
            session += f", {m['kv_pages']:,} pages of {m['kv_page_size']}"
        lines.append(
            f"| {model} | {slice_name} ({SLICE_CHIPS[slice_name]}) | {mesh} | {m['micro_batch_size']} | "
            f"{session} | {m['persistent']:.1f} | {m['update_peak']:.1f} | {m['rollout_peak']:.1f} | "
            f"{m['total']:.1f} | {m['hbm']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(recipes_table())

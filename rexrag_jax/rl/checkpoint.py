"""Training checkpoints with orbax: asynchronous saves, keep-K, and falling back past a bad latest step.

A checkpoint is the array state (parameters, optimizer state) plus a JSON `meta` (step, RNG seed, data
iterator state, rho, and a fingerprint of the parameters). Restoring takes an abstract target whose
shardings may differ from the saved ones (another mesh shape): orbax reshards on read. A latest step
that cannot be read, or whose parameters do not match their fingerprint, is reported and skipped.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


@jax.jit
def _leaf_sums(tree) -> jax.Array:
    return jnp.stack([jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)])


def fingerprint(tree) -> list[float]:
    """Per-leaf sums of |x|: cheap, layout independent, and changed by any gross corruption."""
    return [float(v) for v in np.asarray(_leaf_sums(tree))]


def abstract_like(tree) -> Any:
    """ShapeDtypeStructs with the shardings of `tree` (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def is_url(path: str) -> bool:
    """`gs://bucket/...` and other `scheme://` paths (orbax writes them through tensorstore / etils.epath)."""
    return "://" in str(path)


def checkpoint_directory(path: str) -> str:
    """A local directory made absolute (every process of a multi-host run must name the same place);
    a `gs://` URL as given (a shared bucket: the usual place for a TPU pod's checkpoints)."""
    return str(path) if is_url(path) else os.path.abspath(path)


class Checkpointer:
    """Saves every `save_every` steps (and when forced), keeps the newest `keep`."""

    def __init__(self, directory: str, *, save_every: int = 1, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        if save_every < 1 or keep < 1:
            raise ValueError(f"checkpoint save_every and keep must be >= 1, got {save_every}, {keep}")
        self.directory = checkpoint_directory(directory)
        self.save_every = save_every
        if read_only:
            if not is_url(self.directory) and not os.path.isdir(self.directory):
                raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                   create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Start saving (asynchronously) if `step` is due or forced; returns whether it saved."""
        if not force and step % self.save_every:
            return False
        if step in self.manager.all_steps():
            return False
        meta = dict(meta, step=step, fingerprint=fingerprint(state))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return bool(self.manager.save(step, args=args, force=True))

    def restore(self, target: Any) -> tuple[int, Any, dict] | None:
        """The newest readable checkpoint as (step, state, meta), or None if there is none. `target` is an
        abstract tree (see `abstract_like`) giving structure, dtypes and the shardings to restore onto."""
        self.manager.reload()
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
                restored = self.manager.restore(step, args=args)
                state, meta = restored["state"], dict(restored["meta"])
                expected = meta.get("fingerprint")
                got = fingerprint(state)
                if expected is not None and not np.allclose(got, expected, rtol=1e-5, atol=1e-6):
                    raise ValueError("restored arrays do not match the fingerprint saved with them")
            except Exception as e:  # noqa: BLE001 - any failure to read a step means: try the one before
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                failures.append(f"step {step}: {reason}")
                log.warning("checkpoint %s/%d is unreadable or corrupt (%s); falling back to the previous one",
                            self.directory, step, reason)
                print(f"WARNING: checkpoint {self.directory}/{step} is unreadable or corrupt ({reason}); "
                      f"falling back to the previous one", flush=True)
                continue
            self._set_aside([s for s in steps if s > step])
            return step, state, meta
        if steps:
            raise RuntimeError(f"no readable checkpoint in {self.directory}: " + "; ".join(failures))
        return None

    def restore_params(self, target: Any, step: int | None = None) -> tuple[int, Any]:
        """Only the parameters of `step` (default: the newest), onto the shardings of the abstract `target`;
        the optimizer state is not read (evaluation needs a third of a training checkpoint)."""
        self.manager.reload()
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint steps in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"checkpoint step {step} not in {self.directory} (have {steps})")
        item = {"params": target}
        args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
        return step, self.manager.restore(step, args=args)["state"]["params"]

    def _set_aside(self, bad_steps: list[int]) -> None:
        """Rename unreadable steps newer than the one restored to `<step>.unreadable-<n>`: kept for
        inspection, invisible to orbax, and out of the way of the step this run will save again."""
        if not bad_steps or jax.process_index() != 0:
            return
        from etils import epath

        for step in bad_steps:
            src = epath.Path(self.directory) / str(step)
            n = 0
            while (dst := epath.Path(f"{src}.unreadable-{n}")).exists():
                n += 1
            src.rename(dst)
            print(f"WARNING: moved the unreadable checkpoint {src} to {dst}", flush=True)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

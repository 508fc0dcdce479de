"""Training checkpoints with orbax: asynchronous saves, keep-K, and falling back past a bad latest step.

A checkpoint is the array state (parameters, optimizer state) plus a JSON `meta` (step, RNG seed, data
iterator state, rho, and a fingerprint of the parameters). Restoring takes an abstract target whose
shardings may differ from the saved ones (another mesh shape): orbax reshards on read. A latest step
that cannot be read, or whose parameters do not match their fingerprint, is skipped and reported in
one line ("checkpoint .../3 is unreadable or corrupt (reason); falling back to step 2 ...").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

try:  # private: see `_settled_failed_reads`
    from orbax.checkpoint._src import asyncio_utils as _orbax_asyncio
except ImportError:  # another orbax layout: restores run as that orbax runs them
    _orbax_asyncio = None


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


def committed_steps(directory: str) -> list[int]:
    """The step folders in `directory` (local or URL), listed without starting orbax; [] if there is none.
    Orbax writes a step under a temporary name and renames it when complete, so these are finished saves."""
    from etils import epath

    path = epath.Path(checkpoint_directory(directory))
    if not path.is_dir():
        return []
    return sorted(int(child.name) for child in path.iterdir() if child.name.isdigit())


def failure_reason(error: BaseException) -> str:
    """The root cause of a failed read in one short line: orbax wraps tensorstore's error (which names the
    array and the damage) in one whose message is a multi-line dump of the TensorStore spec."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:300]}"


@contextlib.contextmanager
def _settled_failed_reads() -> Iterator[None]:
    """Orbax (0.12) runs each restore on a fresh event loop and closes it when the first array read fails,
    leaving that restore's other reads pending: tensorstore then calls back into the closed loop ("Event
    loop is closed", one traceback per array) and the abandoned coroutines complain when collected. While
    this is active a failed restore cancels and awaits its pending reads before the loop closes (what
    `asyncio.run` does), so a corrupt step costs one warning line, not thousands of lines of tracebacks.
    The swap is process-wide while active: restores run when no save is in flight (start of a run, eval)."""
    original = getattr(_orbax_asyncio, "_run_sync_via_new_loop", None)
    if original is None:  # another orbax version: nothing to adjust
        yield
        return

    def run_sync_via_new_loop(coro):
        loop = asyncio.new_event_loop()
        try:
            asyncio.set_event_loop(loop)
            return loop.run_until_complete(coro)
        except BaseException:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            raise
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    _orbax_asyncio._run_sync_via_new_loop = run_sync_via_new_loop
    try:
        yield
    finally:
        _orbax_asyncio._run_sync_via_new_loop = original


class Checkpointer:
    """Saves every `save_every` steps (and when forced), keeps the newest `keep`."""

    def __init__(
        self, directory: str, *, save_every: int = 1, keep: int = 3, async_save: bool = True, read_only: bool = False
    ):
        if save_every < 1 or keep < 1:
            raise ValueError(f"checkpoint save_every and keep must be >= 1, got {save_every}, {keep}")
        self.directory = checkpoint_directory(directory)
        self.save_every = save_every
        if read_only:
            if not is_url(self.directory) and not os.path.isdir(self.directory):
                raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
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
        abstract tree (see `abstract_like`) giving structure, dtypes and the shardings to restore onto.
        Unreadable newer steps are set aside, each reported in one line."""
        self.manager.reload()
        steps = self.steps()
        failures: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                state, meta = self._read(step, target)
            except Exception as e:
                failures.append((step, failure_reason(e)))
                continue
            moved = self._set_aside([bad for bad, _ in failures])
            for bad, reason in failures:
                print(
                    f"WARNING: checkpoint {self.directory}/{bad} is unreadable or corrupt ({reason}); falling back "
                    f"to step {step}" + (f" (set aside as {moved[bad]})" if bad in moved else ""),
                    flush=True,
                )
            return step, state, meta
        if steps:
            raise RuntimeError(
                f"no readable checkpoint in {self.directory}: "
                + "; ".join(f"step {bad}: {reason}" for bad, reason in failures)
            )
        return None

    def _read(self, step: int, target: Any) -> tuple[Any, dict]:
        """(state, meta) of `step`, checked against the fingerprint saved with it."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        with _settled_failed_reads():
            restored = self.manager.restore(step, args=args)
        state, meta = restored["state"], dict(restored["meta"])
        expected = meta.get("fingerprint")
        if expected is not None and not np.allclose(fingerprint(state), expected, rtol=1e-5, atol=1e-6):
            raise ValueError("restored arrays do not match the fingerprint saved with them")
        return state, meta

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
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
            )
        )
        with _settled_failed_reads():
            return step, self.manager.restore(step, args=args)["state"]["params"]

    def _set_aside(self, bad_steps: list[int]) -> dict[int, str]:
        """Rename unreadable steps newer than the one restored to `<step>.unreadable-<n>`: kept for
        inspection, invisible to orbax, and out of the way of the step this run will save again.
        Returns {step: new name} (process 0 renames; the others return {})."""
        if not bad_steps or jax.process_index() != 0:
            return {}
        from etils import epath

        moved = {}
        for step in bad_steps:
            src = epath.Path(self.directory) / str(step)
            n = 0
            while (dst := epath.Path(f"{src}.unreadable-{n}")).exists():
                n += 1
            src.rename(dst)
            moved[step] = dst.name
        self.manager.reload()
        return moved

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

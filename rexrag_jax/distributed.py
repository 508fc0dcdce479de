"""Multi-host JAX without Pathways: starting `jax.distributed`, and moving host data between processes.

Every process runs the same program (SPMD, one controller per host). Arrays live on a global mesh; what
the host loops read back (sampled tokens, log-probs, metrics) is gathered to every process, and what
one process knows alone (its share of the training questions, its share of the retrieval queries) is
exchanged, so that all processes take the same decisions and issue the same jitted calls in the same
order. With one process every helper here is the identity.

Starting: on a Cloud TPU VM slice `jax.distributed.initialize()` needs no arguments (it finds the other
workers from the TPU metadata); on CPU or GPU hosts pass a coordinator `host:port`, the process count
and this process's id (config keys `distributed.*`, or the `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID` environment variables that jax reads itself).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from rexrag_jax.config import choices

T = TypeVar("T")
R = TypeVar("R")
MODES = choices("distributed.mode")


def on_tpu_vm() -> bool:
    """A Cloud TPU VM: libtpu is installed and TPU chips are attached (checked without starting jax)."""
    has_chips = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    return has_chips and importlib.util.find_spec("libtpu") is not None


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1, mode: str = "auto") -> bool:
    """Start `jax.distributed` if this is (or may be) one of several processes; returns whether it did.

    Call before anything touches a jax backend. `mode="off"` never starts it. With a `coordinator`
    (or jax's environment variables) the explicit form is used (CPU/GPU hosts); on a TPU VM the
    automatic one; otherwise this is a single-process run and nothing happens."""
    import jax

    if mode not in MODES:
        raise ValueError(f"config distributed.mode={mode!r}; expected one of {MODES}")
    if mode == "off" or jax.distributed.is_initialized():
        return False
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if coordinator:
        if num_processes < 1 and "JAX_NUM_PROCESSES" not in os.environ:
            raise ValueError(f"distributed.coordinator={coordinator!r} needs distributed.num_processes >= 1")
        if process_id < 0 and "JAX_PROCESS_ID" not in os.environ:
            raise ValueError(f"distributed.coordinator={coordinator!r} needs distributed.process_id >= 0")
        if num_processes >= 1 and process_id >= num_processes:
            raise ValueError(f"distributed.process_id={process_id} must be < num_processes={num_processes}")
        jax.distributed.initialize(
            coordinator,
            num_processes=num_processes if num_processes >= 1 else None,
            process_id=process_id if process_id >= 0 else None,
        )
        return True
    if on_tpu_vm():
        jax.distributed.initialize()
        return True
    return False


def initialize_from_config(cfg) -> bool:
    """`initialize` with the config's `distributed` block (absent in older configs: automatic)."""
    d = cfg.get("distributed") if hasattr(cfg, "get") else None
    if d is None:
        return initialize()
    return initialize(d.coordinator, int(d.num_processes), int(d.process_id), d.mode)


def to_host(x) -> np.ndarray:
    """A (possibly multi-host) array as one numpy array on every process."""
    import jax

    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_to_host(tree: Any) -> Any:
    """`to_host` over a pytree: one batched `device_get` when every leaf is local (one process), else a
    gather per leaf that needs one."""
    import jax

    leaves = jax.tree.leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return jax.device_get(tree)
    return jax.tree.map(to_host, tree)


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in process order, on every process."""
    import jax

    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [pickle.loads(gathered[i, : int(n)].tobytes()) for i, n in enumerate(sizes)]


def shared_map(fn: Callable[[Sequence[T]], Sequence[R]], items: Sequence[T]) -> list[R]:
    """`fn(items)` computed as one contiguous share per process, the results shared with all processes
    (e.g. each host's retrieval replica answers its share of a batch of queries). `fn` takes and returns
    a list; it is called on every process, possibly with an empty share."""
    import jax

    n, count, index = len(items), jax.process_count(), jax.process_index()
    if count == 1:
        return list(fn(items))
    bounds = [n * i // count for i in range(count + 1)]
    mine = list(fn(items[bounds[index] : bounds[index + 1]]))
    if len(mine) != bounds[index + 1] - bounds[index]:
        raise ValueError(f"shared_map: fn returned {len(mine)} results for {bounds[index + 1] - bounds[index]} items")
    return [r for part in allgather_objects(mine) for r in part]


def sync(name: str) -> None:
    """A barrier across processes (no-op on one)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

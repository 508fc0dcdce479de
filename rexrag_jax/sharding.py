"""Device mesh and logical-axis sharding rules.

Every parameter and key activation is annotated with *logical* axis names ("vocab", "embed", "batch",
...). One table maps them to the three mesh axes ("data", "fsdp", "tensor"). Helpers take the mesh
explicitly; nothing here reads global state, so the same model runs sharded or on one device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

# Logical name -> mesh axes. Parameters are FSDP-sharded on their model dimension and tensor-parallel on
# heads / MLP / vocab; activations are batch-sharded over (data, fsdp) and head-sharded over tensor.
LOGICAL_RULES: Mapping[str, MeshAxes] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "cache_length": None,
}


def make_mesh(
    shape: Sequence[int] | Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axes (classic GSPMD propagation).

    `shape` is a 3-tuple or a mapping with the axis names; one entry may be -1 to absorb the remaining
    devices. The default puts every device on "fsdp".
    """
    devices = list(devices if devices is not None else jax.devices())
    if shape is None:
        shape = (1, -1, 1)
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh shape has unknown axes {sorted(unknown)}; expected {MESH_AXES}")
        shape = tuple(int(shape.get(a, 1)) for a in MESH_AXES)
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if known <= 0 or len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape = tuple(len(devices) // known if s == -1 else s for s in shape)
    if any(s < 1 for s in shape) or int(np.prod(shape)) != len(devices):
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, have {len(devices)}"
        )
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Mapping[str, MeshAxes] = LOGICAL_RULES,
) -> PartitionSpec:
    """Resolve logical axis names to a PartitionSpec.

    With `shape` and `mesh`, mesh axes that do not divide a dimension are dropped (that dimension is
    replicated over them): e.g. Qwen2.5-3B's 2 KV heads on a tensor axis of 4. Each mesh axis is used once.
    """
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for i, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        target = rules[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept: list[str] = []
        for axis in axes:
            if axis in used:
                continue
            if mesh is not None and shape is not None:
                size = mesh.shape[axis] * int(np.prod([mesh.shape[a] for a in kept]))
                if shape[i] % size:
                    continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while spec and spec[-1] is None:  # canonical form, as jit reports output shardings (equal jit cache keys)
        spec.pop()
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    """NamedSharding for an array of `shape` annotated with `logical_axes`."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def put(x, logical_axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """A host array on device, laid out by logical axis names on `mesh` (one default device without one)."""
    return jnp.asarray(x) if mesh is None else jax.device_put(x, named_sharding(mesh, logical_axes, x.shape))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical_axes, x.shape))


def batch_shards(mesh: Mesh | None) -> int:
    """How many ways the logical "batch" axis is split on `mesh` (row counts must be multiples of it)."""
    if mesh is None:
        return 1
    target = LOGICAL_RULES["batch"]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return int(np.prod([mesh.shape[a] for a in axes]))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """Shardings for an nnx State (or any pytree of Variables carrying `logical_axes` metadata)."""
    from flax import nnx

    def one(v):
        axes = v.get_metadata().get("logical_axes")
        if axes is None:
            return v.replace(NamedSharding(mesh, PartitionSpec()))
        return v.replace(named_sharding(mesh, axes, v.get_value().shape))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

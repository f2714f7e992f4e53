"""Device mesh, logical-axis rules and sharding helpers.

The mesh always has the three axes ``('data', 'seq', 'model')`` (size 1 where unused):

- ``data``: data parallel (outermost, typically across slices / hosts),
- ``seq``: sequence parallel: the token dimension is split for ring attention,
- ``model``: tensor parallel over attention heads, MLP and vocabulary.

Parameters are FSDP-sharded over ``data x seq`` on their embed dimension and tensor-parallel over ``model``.
Model code only names *logical* axes (``'embed'``, ``'heads'``, ``'act_seq'``, ...); :data:`LOGICAL_RULES` maps
them to mesh axes. Mesh axis names appear here and in the ring attention, nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "seq", "model")

# logical axis name -> mesh axes (None = replicated). One table for params and activations.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "embed": ("data", "seq"),  # FSDP
    "vocab": "model",
    "heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    "head_dim": None,
    "norm": None,
    "layers": None,
    "patch": None,  # conv patch dims, CLIP class token, position table rows
    # activations
    "act_batch": "data",
    "act_tiles": (
        "data",
        "seq",
    ),  # vision batch (image tiles / video frames): spread over every data-like axis
    "act_seq": "seq",
    "act_embed": None,  # the model dim where a layer computes (gathered)
    "act_resid": "model",  # the residual stream between layers (and the saved layer inputs): split over model
    "act_heads": "model",
    "act_kv_heads": "model",
    "act_mlp": "model",
    "act_vocab": "model",
}


# Head axes fall back to replication on mesh axes that do not divide them (e.g. Qwen2-7B's 4 kv heads or 28 query
# heads on model=8) instead of failing; the ring attention then pads / repeats heads (ops.ring_attention.shard_heads).
REPLICATE_IF_UNEVEN = frozenset({"heads", "kv_heads", "act_heads", "act_kv_heads"})


def make_mesh(
    data: int = 1,
    seq: int = -1,
    model: int = 1,
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """Build a ``('data', 'seq', 'model')`` mesh; one size may be -1 (= all remaining devices).

    ``devices`` defaults to ``jax.devices()``; pass ``topology.devices`` from
    ``jax.experimental.topologies.get_topology_desc`` to build a mesh for an abstract TPU topology.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": data, "seq": seq, "model": model}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh size may be -1, got {sizes}")
    for k, v in sizes.items():
        if v != -1 and v < 1:
            raise ValueError(f"mesh size {k}={v} must be >= 1 or -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n % fixed:
            raise ValueError(
                f"{n} devices cannot be split into a mesh with {sizes}: the fixed sizes multiply to {fixed}, "
                f"which does not divide {n}"
            )
        sizes[free[0]] = n // fixed
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != n:
        raise ValueError(
            f"mesh data={shape[0]} x seq={shape[1]} x model={shape[2]} = {math.prod(shape)} devices, "
            f"but {n} are available; set one size to -1 to use the rest"
        )
    try:  # physical-topology-aware order on TPU; plain reshape elsewhere
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - CPU / fake devices have no topology to respect
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None] | None, shape=None, mesh_shape=None) -> PartitionSpec:
    """Map logical axis names (one per array dimension) to a mesh ``PartitionSpec``.

    With ``shape`` and ``mesh_shape`` (axis name -> size), a :data:`REPLICATE_IF_UNEVEN` dimension that its mesh
    axes do not divide is replicated instead.
    """
    if names is None:
        return PartitionSpec()
    out = []
    for dim, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(LOGICAL_RULES)}")
        axes = LOGICAL_RULES[name]
        if shape is not None and name in REPLICATE_IF_UNEVEN and shape[dim] % _axis_size(mesh_shape, axes):
            axes = None
        out.append(axes)
    return PartitionSpec(*out)


def _axis_size(mesh_shape, axes: str | tuple[str, ...] | None) -> int:
    """Product of the sizes of ``axes`` in ``mesh_shape`` (a mapping or a mesh); 1 for None or absent axes."""
    if axes is None:
        return 1
    sizes = getattr(mesh_shape, "shape", mesh_shape)
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(sizes.get(a, 1) for a in axes)


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, what: str) -> None:
    """Raise a clear error when a dimension does not divide by the mesh axes it is sharded over."""
    for dim, (size, axes) in enumerate(
        zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True)
    ):
        k = _axis_size(mesh, axes)
        if size % k:
            raise ValueError(
                f"{what}: dimension {dim} of shape {tuple(shape)} has size {size}, which does not divide by "
                f"mesh axes {axes} of total size {k} (mesh {dict(mesh.shape)}); pick mesh sizes that divide it"
            )


def named_sharding(mesh: Mesh, names: Sequence[str | None] | None, shape=None, what: str = "array"):
    spec = logical_to_spec(names, shape, mesh.shape)
    if shape is not None:
        check_divisible(shape, spec, mesh, what)
    return NamedSharding(mesh, spec)


def state_shardings(abstract_state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for every variable of an (abstract) nnx.State, from its ``out_sharding`` metadata."""

    def one(path, var):
        names = var.get_metadata("out_sharding", None) if isinstance(var, nnx.Variable) else None
        shape = var.shape if hasattr(var, "shape") else var[...].shape
        where = "/".join(str(p) for p in path)
        if names is not None and len(names) != len(shape):
            raise ValueError(f"param {where}: logical axes {names} do not match its shape {tuple(shape)}")
        return named_sharding(mesh, names, shape, what=f"param {where}")

    return jax.tree.map_with_path(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside a mesh context (e.g. one-device eager)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, dict(mesh.shape)))


def gather_weight(w: jax.Array, names: Sequence[str | None], dtype) -> jax.Array:
    """A weight as a layer uses it: cast to the compute ``dtype`` on its shards, then all-gathered over its FSDP
    dims (``'embed'`` → unsharded, tensor-parallel dims kept).

    The order matters for the backward (each constraint's transpose is the same constraint on the cotangent):
    the gradient is reduce-scattered onto the shards in the compute dtype, and only then converted to the
    param's fp32, so no device holds the whole fp32 partial gradient of the weight. In a loop (the blockwise
    MLP, the chunked loss) the loop then accumulates the gradient on its shards."""
    w = constrain(w.astype(dtype), names)
    return constrain(w, [None if n == "embed" else n for n in names])


def mesh_axis_size(name: str) -> int:
    """Size of a mesh axis in the current (abstract) mesh context, 1 outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or name not in mesh.axis_names:
        return 1
    return mesh.shape[name]

"""Small building blocks shared by the decoder and the vision tower.

Params are fp32 by default (``param_dtype``) and computed in ``dtype`` (bf16 by default). Every param carries its
logical axis names in the ``out_sharding`` metadata; :mod:`lct_jax.sharding` turns them into mesh shardings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]

REMAT_POLICIES = {
    # save nothing inside a layer: only the layer inputs are kept (lowest memory)
    "full": jax.checkpoint_policies.nothing_saveable,
    # keep matmul outputs that have no batch dims (projections), recompute the rest
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # no rematerialization
    "none": jax.checkpoint_policies.everything_saveable,
}


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; expected one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


def param(
    rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None], dtype
) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    # Logical names, not mesh axes: lct_jax.sharding maps them (eval_shape -> shardings -> jit(init)), so
    # Flax's eager sharding, which would read them as mesh axes, stays off.
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=False)


class Dense(nnx.Module):
    """``y = einsum(x, kernel) + bias`` with a multi-dimensional kernel, e.g. [D, N, H] for a q projection.

    ``in_shape``/``out_shape`` are the contracted and produced feature dims; kernel is [*in_shape, *out_shape]
    (Flax layout; PyTorch's Linear weight is its transpose after flattening).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        in_axes: Sequence[str | None],
        out_axes: Sequence[str | None],
        *,
        use_bias: bool,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
    ):
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.kernel = param(
            rngs,
            nnx.initializers.normal(init_std),
            (*in_shape, *out_shape),
            (*in_axes, *out_axes),
            param_dtype,
        )
        self.bias = (
            param(rngs, nnx.initializers.zeros_init(), out_shape, out_axes, param_dtype) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        y = jax.lax.dot_general(
            x.astype(self.dtype),
            kernel,
            ((tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))), ((), ())),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: normalize in fp32, cast back to the compute dtype, then scale (HF order)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm computed in fp32 (CLIP)."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ("norm",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros_init(), (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """Create ``num_layers`` copies of a layer with params stacked on a leading ``'layers'`` axis."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(
        in_axes=(0,), out_axes=0, axis_size=num_layers, transform_metadata={nnx.PARTITION_NAME: "layers"}
    )
    def make(r):
        return make_layer(r)

    return make(rngs)


def scan_layers(stacked: nnx.Module, carry, *args, policy: str = "full"):
    """Apply stacked layers in a ``lax.scan`` (compile time independent of depth), rematerialized per layer.

    ``stacked(carry, *args) -> carry`` is called once per layer with that layer's params.
    """
    graphdef, state = nnx.split(stacked)

    def body(c, layer_state):
        layer = nnx.merge(graphdef, layer_state)
        return layer(c, *args), None

    body = jax.checkpoint(body, policy=remat_policy(policy), prevent_cse=False)
    carry, _ = jax.lax.scan(body, carry, state)
    return carry

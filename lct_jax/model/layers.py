"""Small building blocks shared by the decoder and the vision tower.

Params are fp32 by default (``param_dtype``) and computed in ``dtype`` (bf16 by default). Every param carries its
logical axis names in the ``out_sharding`` metadata; :mod:`lct_jax.sharding` turns them into mesh shardings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lct_jax.sharding import constrain, gather_weight, mesh_axis_size

Initializer = Callable[..., jax.Array]

LAYER_INPUT = (
    "layer_input"  # checkpoint name of each scanned layer's input (the residual stream it starts from)
)

REMAT_POLICIES = {
    # save nothing inside a layer: only the layer inputs are kept (lowest memory)
    "full": jax.checkpoint_policies.nothing_saveable,
    # as 'full', but the saved layer inputs live in pinned host memory: copied out in the forward, back per layer
    # in the backward (device memory no longer grows with 28 x D per token; host memory does)
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[LAYER_INPUT],
        offload_src="device",
        offload_dst="pinned_host",
    ),
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
        self.axes = (*in_axes, *out_axes)
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
        kernel = gather_weight(self.kernel[...], self.axes, self.dtype)
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
        c = checkpoint_name(c, LAYER_INPUT)  # what the 'offload' policy moves to host memory
        return layer(c, *args), None

    body = jax.checkpoint(body, policy=remat_policy(policy), prevent_cse=False)
    carry, _ = jax.lax.scan(body, carry, state)
    return carry


def divisors(n: int) -> list[int]:
    """Sorted divisors of ``n`` (O(sqrt n))."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def pick_num_chunks(length: int, chunk_size: int, multiple_of: int = 1) -> int:
    """Number of strided chunks C for a sequence of ``length`` tokens: the smallest C with ``C * chunk_size >=
    length`` that divides ``length`` and leaves ``length // C`` a multiple of ``multiple_of`` (the seq mesh size);
    if none does, the largest C that fits (chunks bigger than asked)."""
    if chunk_size < 1:
        raise ValueError(f"{chunk_size=} must be >= 1")
    start = max(1, -(-length // chunk_size))
    fits = [c for c in divisors(length) if (length // c) % multiple_of == 0]
    above = [c for c in fits if c >= start]
    if above:
        return above[0]
    if fits:  # chunks must stay a multiple of the seq shards: take bigger chunks than asked
        return fits[-1]
    raise ValueError(f"no chunk count fits {length=} with {chunk_size=} and {multiple_of=}")


def token_chunks(fn: Callable[[jax.Array], jax.Array], x: jax.Array, chunk: int, names) -> jax.Array:
    """``fn`` (per token: [B, T', D] → [B, T', E]) over chunks of about ``chunk`` tokens *of each seq shard*,
    rematerialized per chunk, so its intermediates never exist for more than one chunk of the local tokens (the
    blockwise feed-forward of the RingAttention paper).

    Layout: the seq-sharded [B, T, D] is viewed as [B, W, C, T/(W C), D] (W = seq shards, C chunks of each shard's
    contiguous tokens); chunk c is [B, W, T/(W C), D] → [B, T/C, D], still sequence-sharded, so every device works
    on its own tokens in every step. ``names`` are the logical axes of ``x`` (``fn`` sees the same layout).
    Example: T = 8, W = 2, C = 2 (tokens 0-3 on shard 0): chunk 0 = tokens [0 1 | 4 5], chunk 1 = [2 3 | 6 7].
    """
    b, t = x.shape[:2]
    w = mesh_axis_size("seq")
    c = pick_num_chunks(t // w, chunk) if chunk > 0 else 1
    if c == 1:
        return fn(x)
    tc = t // w // c
    xr = jnp.moveaxis(x.reshape(b, w, c, tc, *x.shape[2:]), 2, 0).reshape(c, b, w * tc, *x.shape[2:])

    @jax.checkpoint
    def one(xc):
        return fn(constrain(xc, names))

    ys = jax.lax.map(one, xr)  # [C, B, T/C, E]
    ys = jnp.moveaxis(ys.reshape(c, b, w, tc, *ys.shape[3:]), 0, 2)
    return constrain(ys.reshape(b, t, *ys.shape[4:]), names)

"""LongVA's vision→language projector (``mlp2x_gelu``) and the 2x2 average pooling that follows it.

Axis alphabet: B tiles/frames, P patches, E vision width, D language model width.

Order matters (spec §3): project every patch first, then pool. ``Linear(E→D) → GELU (exact erf) → Linear(D→D)``,
both with bias; then per tile reshape [P, D] to [g, g, D], average 2x2 windows with stride 2 → [(g/2)², D]
row-major (576 → 144 tokens at 336 px). Pool-then-project differs because the GELU sits between.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lct_jax.model.layers import Dense
from lct_jax.sharding import constrain


class Projector(nnx.Module):
    """``mlp2x_gelu``: [..., E] → [..., D]."""

    def __init__(
        self, vision_width: int, text_width: int, *, dtype, param_dtype, rngs: nnx.Rngs, init_std=0.02
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=init_std)
        # Column- then row-parallel over the 'mlp' (model) axis, like an MLP; the hidden width is D.
        self.fc1 = Dense((vision_width,), (text_width,), ("embed",), ("mlp",), use_bias=True, **kw)
        self.fc2 = Dense((text_width,), (text_width,), ("mlp",), ("embed",), use_bias=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.fc1(x), approximate=False)  # [B, P, D]
        h = constrain(h, ("act_tiles", None, "act_mlp"))
        return self.fc2(h)  # [B, P, D]


def pool2x2(x: jax.Array, stride: int = 2) -> jax.Array:
    """Average pool a square patch grid: [B, g², D] → [B, (g/stride)², D], row-major, mean in fp32.

    Equals ``avg_pool2d(kernel=stride, stride=stride)`` on the [B, D, g, g] layout (LLaVA's ``get_2dPool``).
    """
    b, p, d = x.shape
    g = int(round(p**0.5))
    if g * g != p or g % stride:
        raise ValueError(
            f"pool2x2 needs a square patch grid divisible by {stride=}; got {p} patches (grid side {p**0.5:.3f})"
        )
    h = g // stride
    y = x.astype(jnp.float32).reshape(b, h, stride, h, stride, d)  # [B, g/s, s, g/s, s, D]
    y = jnp.mean(y, axis=(2, 4))  # [B, g/s, g/s, D]
    return y.reshape(b, h * h, d).astype(x.dtype)

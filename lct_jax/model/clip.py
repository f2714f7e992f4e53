"""CLIP ViT vision tower (Flax NNX), numerically equal to transformers' ``CLIPVisionModel`` features.

Axis alphabet: B images (tiles / frames), P patches (+1 for the class token), E vision width, N heads, H head dim,
F MLP dim. The image batch uses the logical axis ``act_tiles`` (data x seq): under sequence parallelism every
device encodes a different share of the tiles instead of all seq devices repeating the same ones.

LongVA uses CLIP ViT-L/14 at 336 px (spec §2):

- patch embedding: a 14x14 stride-14 convolution **without bias**, written here as a Dense over each patch's
  [14, 14, 3] pixels (kernel [14, 14, 3, E] = the PyTorch OIHW weight transposed to HWIO);
- a learned class token and 577 learned position embeddings; ``pre_layrnorm`` on the embeddings;
- 24 pre-LN blocks (LayerNorm eps 1e-5, non-causal attention with q/k/v/out biases, quick-GELU MLP);
- features = the hidden state after block 23 of 24 (HF ``hidden_states[-2]``), CLS dropped: [B, 576, E].

The last block and ``post_layernorm`` are kept as parameters (they are in every checkpoint and count towards the
released 7,935,646,208 parameters) but are never run: the scan runs only the first ``feature_layer`` blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lct_jax.model.layers import Dense, LayerNorm, param, scan_layers, stack_layers
from lct_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024  # E
    num_layers: int = 24
    num_heads: int = 16  # N
    intermediate_size: int = 4096  # F
    layer_norm_eps: float = 1e-5
    select_layer: int = -2  # HF hidden_states index: -2 = output of block num_layers - 1
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "full"
    init_std: float = 0.02

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} does not divide by num_heads={self.num_heads}")
        if not 0 <= self.feature_layer <= self.num_layers:
            raise ValueError(
                f"select_layer={self.select_layer} is outside hidden_states[-{self.num_layers + 1}..{self.num_layers}]"
            )

    @property
    def grid(self) -> int:
        """Patches per side (24 at 336/14)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def feature_layer(self) -> int:
        """Number of blocks run: HF ``hidden_states[select_layer]`` is the output of this many blocks."""
        return self.select_layer % (self.num_layers + 1)

    def replace(self, **kw) -> CLIPConfig:
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, CLIPConfig] = {
    "clip_vit_l14_336": CLIPConfig(),
    # 56 px / 14 = 4x4 patches: after LongVA's 2x2 pooling, 4 tokens per tile (pool order stays testable).
    "tiny": CLIPConfig(
        image_size=56, patch_size=14, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64
    ),
}


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


class Attention(nnx.Module):
    """Bidirectional multi-head attention with q/k/v/out biases, softmax in fp32."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        e, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        kw = dict(
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs,
            init_std=cfg.init_std,
        )
        self.q = Dense((e,), (n, h), ("embed",), ("heads", "head_dim"), use_bias=True, **kw)
        self.k = Dense((e,), (n, h), ("embed",), ("heads", "head_dim"), use_bias=True, **kw)
        self.v = Dense((e,), (n, h), ("embed",), ("heads", "head_dim"), use_bias=True, **kw)
        self.o = Dense((n, h), (e,), ("heads", "head_dim"), ("embed",), use_bias=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.q.kernel.shape[-1]
        q = constrain(self.q(x), ("act_tiles", None, "act_heads", None))  # [B, P, N, H]
        k = constrain(self.k(x), ("act_tiles", None, "act_heads", None))  # [B, P, N, H]
        v = constrain(self.v(x), ("act_tiles", None, "act_heads", None))  # [B, P, N, H]
        s = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) * h**-0.5  # [B, N, P, P]
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        o = jnp.einsum("bnqk,bknh->bqnh", p, v)  # [B, P, N, H]
        return self.o(o)  # [B, P, E]


class MLP(nnx.Module):
    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        e, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs,
            init_std=cfg.init_std,
        )
        self.fc1 = Dense((e,), (f,), ("embed",), ("mlp",), use_bias=True, **kw)
        self.fc2 = Dense((f,), (e,), ("mlp",), ("embed",), use_bias=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(quick_gelu(self.fc1(x)), ("act_tiles", None, "act_mlp"))  # [B, P, F]
        return self.fc2(h)


class EncoderLayer(nnx.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        kw = dict(
            eps=cfg.layer_norm_eps,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs,
        )
        self.ln1 = LayerNorm(cfg.hidden_size, **kw)
        self.attn = Attention(cfg, rngs=rngs)
        self.ln2 = LayerNorm(cfg.hidden_size, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return constrain(x, ("act_tiles", None, "act_embed"))


class CLIPVisionTower(nnx.Module):
    """``tower(pixels)``: float32[B, S, S, 3] CLIP-normalized NHWC → features [B, grid², E] (CLS dropped).

    ``tower.hidden_states(pixels, num_layers)`` gives the full sequence [B, 1 + grid², E] after that many blocks
    (0 = the ``pre_layrnorm`` output), for tests and debugging.
    """

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        e, p = cfg.hidden_size, cfg.patch_size
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.patch_embed = Dense(
            (p, p, 3), (e,), ("patch", "patch", None), ("embed",), use_bias=False,
            dtype=dt, param_dtype=pdt, rngs=rngs, init_std=cfg.init_std,
        )  # fmt: skip
        self.class_embed = param(rngs, nnx.initializers.normal(cfg.init_std), (e,), ("embed",), pdt)
        self.pos_embed = param(
            rngs, nnx.initializers.normal(cfg.init_std), (cfg.num_patches + 1, e), ("patch", "embed"), pdt
        )
        ln = dict(eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.pre_norm = LayerNorm(e, **ln)
        self.layers = stack_layers(lambda r: EncoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
        self.post_norm = LayerNorm(e, **ln)  # in checkpoints, unused by LongVA's features

    def embed(self, pixels: jax.Array) -> jax.Array:
        """float32[B, S, S, 3] → [B, 1 + grid², E] (class token, patches, positions, pre_layrnorm)."""
        cfg = self.cfg
        b, s, s2, c = pixels.shape
        if (s, s2, c) != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(
                f"pixels shape {tuple(pixels.shape)} does not fit this tower: expected [B, {cfg.image_size}, "
                f"{cfg.image_size}, 3] (NHWC, CLIP-normalized)"
            )
        g, p = cfg.grid, cfg.patch_size
        x = pixels.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)  # [B, g, g, p, p, 3]
        x = self.patch_embed(x.reshape(b, g * g, p, p, 3))  # [B, P-1, E]
        cls = jnp.broadcast_to(self.class_embed[...].astype(x.dtype), (b, 1, x.shape[-1]))  # [B, 1, E]
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)  # [B, P, E]
        x = constrain(x, ("act_tiles", None, "act_embed"))
        return self.pre_norm(x)

    def hidden_states(self, pixels: jax.Array, num_layers: int) -> jax.Array:
        """[B, 1 + grid², E] after the first ``num_layers`` blocks (HF ``hidden_states[num_layers]``)."""
        if not 0 <= num_layers <= self.cfg.num_layers:
            raise ValueError(f"{num_layers=} must be in [0, {self.cfg.num_layers}]")
        x = self.embed(pixels)
        if num_layers == 0:
            return x
        graphdef, state = nnx.split(self.layers)
        # Run a prefix of the stacked blocks: slice every stacked param along its leading 'layers' axis.
        first = nnx.merge(graphdef, jax.tree.map(lambda a: a[:num_layers], state))
        return scan_layers(first, x, policy=self.cfg.remat)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """float32[B, S, S, 3] → [B, grid², E]: features after ``feature_layer`` blocks, class token dropped."""
        return self.hidden_states(pixels, self.cfg.feature_layer)[:, 1:]

"""LongVA (llava_qwen): CLIP tower → mlp2x_gelu projector → 2x2 pool, spliced into a Qwen2 decoder.

Axis alphabet: B batch, T tokens, M tiles/frames per row, S tile side, P patches, E vision width, D model dim,
V visual tokens per row (M · tokens_per_tile).

Batch fields (the cross-team schema; every shape static under jit):

- ``inputs`` int32[B, T]: token ids; visual slots hold ``IMAGE_TOKEN`` (-200), never embedded.
- ``pixels`` uint8[B, M, S, S, 3]: RGB tiles (UniRes crops) and video frames of each row, NHWC, as the loaders
  ship them; CLIP normalization happens here, on device (:func:`normalize_pixels`). Float pixels are taken as
  already normalized (e.g. from :func:`lct_jax.data.unires.preprocess_image`).
- ``pixel_mask`` bool[B, M]: real tiles. Unused tiles are encoded (static shapes) but their pixels are zeroed
  first (no NaN can leak from padding) and their tokens are zeroed after.
- ``visual_index`` int32[B, T]: for each token, its index into the row's flattened visual tokens
  [M · tokens_per_tile] (tile-major, 144 row-major tokens per tile), -1 for text. The splice is a gather,
  ``x = where(visual_index >= 0, visual[b, visual_index], embed(inputs))``, so it is correct under any token
  permutation (zigzag) as long as ``visual_index`` travels with the tokens.
- ``positions`` / ``segment_ids`` int32[B, T] go to the decoder unchanged (default positions 0..T-1).

No newline/separator embeddings exist in this variant (spec §3). Loss masking of visual slots is the loader's job
(their ``loss_mask`` is 0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lct_jax.clip_constants import CLIP_MEAN, CLIP_STD
from lct_jax.model import clip as clip_lib
from lct_jax.model import qwen2 as qwen2_lib
from lct_jax.model.clip import CLIPConfig, CLIPVisionTower
from lct_jax.model.projector import Projector, pool2x2
from lct_jax.model.qwen2 import Qwen2, Qwen2Config
from lct_jax.sharding import constrain, mesh_axis_size

IMAGE_TOKEN = -200


@dataclasses.dataclass(frozen=True)
class LongVAConfig:
    text: Qwen2Config
    vision: CLIPConfig
    pool_stride: int = 2  # mm_spatial_pool_stride, average pooling after the projector
    # optional overrides applied to both towers (None = keep each sub-config's value); they let
    # ``dataclasses.replace(cfg, dtype='float32')`` work like it does on a Qwen2Config
    dtype: str | None = None
    param_dtype: str | None = None
    remat: str | None = None

    def __post_init__(self):
        if isinstance(self.text, dict):
            object.__setattr__(self, "text", Qwen2Config(**self.text))
        if isinstance(self.vision, dict):
            object.__setattr__(self, "vision", CLIPConfig(**self.vision))
        over = {
            k: getattr(self, k) for k in ("dtype", "param_dtype", "remat") if getattr(self, k) is not None
        }
        if over:
            object.__setattr__(self, "text", self.text.replace(**over))
            object.__setattr__(self, "vision", self.vision.replace(**over))
        if self.vision.grid % self.pool_stride:
            raise ValueError(
                f"pool_stride={self.pool_stride} must divide the patch grid {self.vision.grid} "
                f"(image_size={self.vision.image_size} / patch_size={self.vision.patch_size})"
            )

    @property
    def tile(self) -> int:
        """Tile / frame side in pixels (336 at full size)."""
        return self.vision.image_size

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens per tile or frame after pooling (144 at full size)."""
        return (self.vision.grid // self.pool_stride) ** 2

    def replace(self, **kw) -> LongVAConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> LongVAConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown LongVAConfig fields {sorted(unknown)}; expected {sorted(names)}")
        return cls(**d)


PRESETS: dict[str, LongVAConfig] = {
    # LongVA-7B: Qwen2-7B-Instruct after text context extension (theta 1e9) + CLIP ViT-L/14-336.
    "longva_7b": LongVAConfig(
        text=qwen2_lib.PRESETS["qwen2_7b"].replace(rope_theta=1e9),
        vision=clip_lib.PRESETS["clip_vit_l14_336"],
    ),
    # tile 56, 4 tokens per tile, D=64: for tests and CPU demos
    "tiny": LongVAConfig(text=qwen2_lib.PRESETS["tiny"], vision=clip_lib.PRESETS["tiny"]),
}


def normalize_pixels(pixels: jax.Array) -> jax.Array:
    """uint8[..., 3] RGB → float32 CLIP-normalized, ``(x / 255 − mean) / std``: the same fp32 formula as the host's
    :func:`lct_jax.data.unires.normalize`, evaluated on device so loaders move bytes, not floats."""
    x = pixels.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


class LongVA(nnx.Module):
    """``model(inputs, pixels=..., pixel_mask=..., visual_index=...) -> (logits float32[B, T, V], intermediates)``.

    ``model.encode(...)`` returns the final normed hidden states [B, T, D] (for a chunked loss, as
    ``Qwen2.encode``); ``model.head_weight()`` / ``model.logits(hidden)`` apply the LM head. Precomputed visual
    tokens (V-NIAH haystacks) can be passed as ``visual_tokens`` [B, V, D] instead of ``pixels``.
    Params: ``vision`` (CLIP tower), ``projector``, ``lm`` (Qwen2).
    """

    def __init__(self, cfg: LongVAConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = CLIPVisionTower(cfg.vision, rngs=rngs)
        self.projector = Projector(
            cfg.vision.hidden_size,
            cfg.text.hidden_size,
            dtype=jnp.dtype(cfg.text.dtype),
            param_dtype=jnp.dtype(cfg.text.param_dtype),
            rngs=rngs,
            init_std=cfg.text.init_std,
        )
        self.lm = Qwen2(cfg.text, rngs=rngs)

    # ---------------------------------------------------------------------------------------------- vision
    def encode_images(self, pixels: jax.Array) -> jax.Array:
        """float32[N, S, S, 3] tiles/frames → [N, tokens_per_tile, D]: tower, projector, then 2x2 pool."""
        feats = self.vision(pixels)  # [N, P, E]
        tokens = pool2x2(self.projector(feats), self.cfg.pool_stride)  # [N, P/4, D]
        return constrain(tokens, ("act_tiles", None, "act_embed"))

    def visual_tokens(self, pixels: jax.Array, pixel_mask: jax.Array | None = None) -> jax.Array:
        """uint8 or normalized float32 [B, M, S, S, 3] (+ bool[B, M]) → [B, M · tokens_per_tile, D], zeros for
        unused tiles."""
        if pixels.ndim != 5:
            raise ValueError(f"pixels must be [B, M, S, S, 3], got shape {tuple(pixels.shape)}")
        if pixels.dtype == jnp.uint8:
            pixels = normalize_pixels(pixels)
        b, m = pixels.shape[:2]
        if pixel_mask is not None:
            if tuple(pixel_mask.shape) != (b, m):
                raise ValueError(f"pixel_mask shape {tuple(pixel_mask.shape)} must be [B, M] = {(b, m)}")
            pixels = jnp.where(pixel_mask[:, :, None, None, None], pixels, 0.0)
        flat = pixels.reshape(b * m, *pixels.shape[2:])
        # the tile batch is spread over data x seq: pad it to a multiple (zero tiles, dropped after), so any tile
        # count works on any mesh; each device still encodes ceil(B*M / devices) tiles
        pad = -(b * m) % (mesh_axis_size("data") * mesh_axis_size("seq"))
        if pad:
            flat = jnp.pad(flat, ((0, pad),) + ((0, 0),) * (flat.ndim - 1))
        tokens = self.encode_images(flat)[: b * m]  # [B*M, P/4, D]
        tpt, d = tokens.shape[1:]
        tokens = tokens.reshape(b, m, tpt, d)
        if pixel_mask is not None:
            tokens = jnp.where(pixel_mask[:, :, None, None], tokens, jnp.zeros((), tokens.dtype))
        return tokens.reshape(b, m * tpt, d)  # [B, V, D]

    # ---------------------------------------------------------------------------------------------- splice
    def embed(
        self, inputs, *, pixels=None, pixel_mask=None, visual_index=None, visual_tokens=None
    ) -> tuple[jax.Array, jax.Array | None]:
        """(inputs_embeds [B, T, D], visual tokens [B, V, D] or None)."""
        text = self.lm.embed_tokens(jnp.maximum(inputs, 0))  # [B, T, D]; visual slots overwritten below
        if visual_index is None:
            if pixels is not None or visual_tokens is not None:
                raise ValueError(
                    "pixels/visual_tokens given without visual_index: cannot place visual tokens"
                )
            return text, None
        if tuple(visual_index.shape) != tuple(inputs.shape):
            raise ValueError(
                f"visual_index shape {tuple(visual_index.shape)} must equal inputs shape {tuple(inputs.shape)}"
            )
        if (pixels is None) == (visual_tokens is None):
            raise ValueError("with visual_index, pass exactly one of pixels or visual_tokens")
        visual = self.visual_tokens(pixels, pixel_mask) if visual_tokens is None else visual_tokens
        visual = visual.astype(text.dtype)
        idx = jnp.clip(visual_index, 0, visual.shape[1] - 1)  # [B, T]
        gathered = jnp.take_along_axis(visual, idx[:, :, None], axis=1)  # [B, T, D]
        x = jnp.where((visual_index >= 0)[:, :, None], gathered, text)
        return constrain(x, ("act_batch", "act_seq", "act_embed")), visual

    def encode(
        self,
        inputs,
        *,
        pixels=None,
        pixel_mask=None,
        visual_index=None,
        visual_tokens=None,
        positions=None,
        segment_ids=None,
    ) -> jax.Array:
        """Final normed hidden states [B, T, D]."""
        x, _ = self.embed(
            inputs,
            pixels=pixels,
            pixel_mask=pixel_mask,
            visual_index=visual_index,
            visual_tokens=visual_tokens,
        )
        return self.lm.encode(inputs_embeds=x, positions=positions, segment_ids=segment_ids)

    def head_weight(self) -> jax.Array:
        return self.lm.head_weight()

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.lm.logits(hidden)

    def __call__(
        self,
        inputs,
        *,
        pixels=None,
        pixel_mask=None,
        visual_index=None,
        visual_tokens=None,
        positions=None,
        segment_ids=None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(logits float32[B, T, V], {'visual_tokens': [B, V, D], 'inputs_embeds': [B, T, D],
        'hidden': [B, T, D]}); 'visual_tokens' is absent for text-only calls."""
        x, visual = self.embed(
            inputs,
            pixels=pixels,
            pixel_mask=pixel_mask,
            visual_index=visual_index,
            visual_tokens=visual_tokens,
        )
        hidden = self.lm.encode(inputs_embeds=x, positions=positions, segment_ids=segment_ids)
        inter = {"inputs_embeds": x, "hidden": hidden}
        if visual is not None:
            inter["visual_tokens"] = visual
        return self.lm.logits(hidden), inter

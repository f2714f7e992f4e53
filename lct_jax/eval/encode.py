"""Frames and needle images → visual tokens, as V-NIAH encodes them (spec §9).

Axis alphabet: N frames, S tile side (336 at full size), P visual tokens per frame (144), D model dim.

Per frame: letterbox to a square with the CLIP mean colour (LLaVA's ``expand2square``), then the CLIP geometry
(shortest edge → S bicubic, center crop: a plain resize for a square), then on device the tower, the projector and
the 2x2 pool (:meth:`lct_jax.model.longva.LongVA.encode_images`). Training's video path center-crops instead; the
evaluation letterboxes so that nothing at a frame's edge is cut away.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from lct_jax.clip_constants import CLIP_MEAN
from lct_jax.data.unires import resize_center_crop, to_rgb
from lct_jax.model.longva import LongVA, normalize_pixels
from lct_jax.sharding import logical_to_spec

# expand2square's fill: tuple(int(x * 255) for x in image_mean) = (122, 116, 104)
LETTERBOX_COLOR = tuple(int(x * 255) for x in CLIP_MEAN.tolist())


def letterbox(img: Image.Image, tile: int) -> np.ndarray:
    """Any image → uint8[tile, tile, 3]: pad the short side to a square (centered, CLIP mean colour), resize."""
    img = to_rgb(img)
    w, h = img.size
    if w != h:
        side = max(w, h)
        square = Image.new("RGB", (side, side), LETTERBOX_COLOR)
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img = square
    return np.asarray(resize_center_crop(img, tile))


class FrameEncoder:
    """``encoder(frames uint8[N, S, S, 3]) -> [N, P, D]`` (numpy, the model's compute dtype), in batches of a fixed
    size so the tower compiles once; the last batch is padded and trimmed. With a ``mesh``, the frames of a batch
    are spread over its ``data`` x ``seq`` devices (``batch_size`` must divide by them).

    Only the tower and the projector go to the devices, once (replicated over the mesh, or on the first local
    device): the language model's params stay where the model was loaded (for LongVA-7B, load it on the host CPU
    with ``jax.default_device``) and are never transferred, so a 15 GB LM does not have to fit next to the tower.
    """

    def __init__(self, model: LongVA, *, batch_size: int, mesh: Mesh | None = None):
        if batch_size < 1:
            raise ValueError(f"{batch_size=} must be >= 1")
        self.batch_size = batch_size
        self.tile = model.cfg.tile
        self._mesh = mesh
        towers = nnx.Any(nnx.PathContains("vision"), nnx.PathContains("projector"))
        graphdef, state, rest = nnx.split(model, towers, ...)
        rest = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), rest)  # shapes only, never used
        self._sharding = None
        if mesh is not None:
            spec = logical_to_spec(("act_tiles", None, None, None))
            self._sharding = NamedSharding(mesh, spec)
            ways = mesh.shape["data"] * mesh.shape["seq"]
            if batch_size % ways:
                raise ValueError(f"{batch_size=} must divide by the mesh's data x seq = {ways} devices")
            self._state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        else:
            self._state = jax.device_put(state, jax.local_devices()[0])

        def encode(state, pixels):  # uint8[B, S, S, 3] -> [B, P, D]
            return nnx.merge(graphdef, state, rest).encode_images(normalize_pixels(pixels))

        self._fn = jax.jit(encode)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        n, b = len(frames), self.batch_size
        if frames.ndim != 4 or frames.shape[1:] != (self.tile, self.tile, 3) or frames.dtype != np.uint8:
            raise ValueError(
                f"frames must be uint8[N, {self.tile}, {self.tile}, 3], got {frames.dtype}{list(frames.shape)}"
            )
        pad = -n % b
        if pad:
            frames = np.concatenate([frames, np.zeros((pad, *frames.shape[1:]), np.uint8)])
        out = []
        with jax.set_mesh(self._mesh) if self._mesh is not None else contextlib.nullcontext():
            for i in range(0, len(frames), b):
                batch = frames[i : i + b]
                if self._sharding is not None:
                    batch = jax.device_put(batch, self._sharding)
                out.append(np.asarray(jax.device_get(self._fn(self._state, batch))))
        return np.concatenate(out)[:n]

"""UniRes image and video preprocessing for LongVA (spec §4–§5), with pillow and numpy only.

Images (UniRes):
  1. pick a canvas from the 200 candidates (tile·a, tile·b), a, b ≥ 1, a·b ≤ 49, (1, 1) excluded, by
     max effective resolution, then min wasted area, then candidate order (:data:`CANVAS_GRID`, a then b);
  2. resize aspect-preserving (bicubic) and paste centered on a black canvas;
  3. cut into tile×tile crops in raster order (rows top→bottom, left→right), CLIP-normalize.
  No thumbnail (the released code encodes one and drops it). Tokens per image = tiles · 144 at 336 px.
Video: uniform frame sampling (a count, or a rate given the video's fps); each frame shortest edge → tile
(bicubic), center crop, CLIP-normalize.

All outputs are float32 NHWC: ``[n, tile, tile, 3]``. Geometry follows the released Python (LLaVA-NeXT helpers
``select_best_resolution`` / ``resize_and_pad_image``) including its float arithmetic, so tile counts match.

Bad inputs never reach the model: :func:`load_image` returns a loaded RGB ``PIL.Image`` or raises
:class:`BadImageError` naming the file (corrupt / truncated / empty / oversized); odd modes (grayscale, palette,
RGBA/LA, CMYK, 16-bit) are converted to 8-bit RGB correctly (alpha composited over white, 16-bit scaled by 1/257).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from lct_jax.clip_constants import CLIP_MEAN, CLIP_STD
from lct_jax.errors import UserError

TILE = 336
TOKENS_PER_TILE = 144  # (336 / 14 / 2)²
MAX_TILES = 49
# Images above this many pixels are refused before decoding (PIL's own warning threshold; 9459² ≈ 89.5M).
MAX_PIXELS = 89_478_485

# The 200 candidate grids (a, b) = (tiles across, tiles down), listed by a then b. The order only matters for
# exact ties (same effective and wasted area, e.g. a square image between 1x2 and 2x1): the first wins, so a
# square image gets the tall 1x2 canvas (W=336, H=672), as in the spec's 300x300 example.
CANVAS_GRID: tuple[tuple[int, int], ...] = tuple(
    (a, b) for a in range(1, MAX_TILES + 1) for b in range(1, MAX_TILES // a + 1) if (a, b) != (1, 1)
)
assert len(CANVAS_GRID) == 200


class BadImageError(UserError, ValueError):
    """An image that cannot be turned into RGB pixels; the message names the file."""


def canvases(tile: int = TILE) -> list[tuple[int, int]]:
    """The 200 candidate (W, H) canvases in pixels, in tie-break order (``image_grid_pinpoints``)."""
    return [(tile * a, tile * b) for a, b in CANVAS_GRID]


def _check_size(w: int, h: int, tile: int) -> None:
    if w < 1 or h < 1:
        raise BadImageError(f"image size {w}x{h} is empty; need at least 1x1 pixels")
    if tile < 1:
        raise ValueError(f"{tile=} must be >= 1")


def select_canvas(w: int, h: int, tile: int = TILE) -> tuple[int, int]:
    """Best canvas (W, H) for an image of width ``w`` and height ``h`` (spec §4)."""
    _check_size(w, h, tile)
    best, best_eff, best_waste = None, -1, math.inf
    for cw, ch in canvases(tile):
        scale = min(cw / w, ch / h)
        dw, dh = int(w * scale), int(h * scale)
        effective = min(dw * dh, w * h)
        wasted = cw * ch - effective
        if effective > best_eff or (effective == best_eff and wasted < best_waste):
            best, best_eff, best_waste = (cw, ch), effective, wasted
    return best


def resize_geometry(w: int, h: int, canvas: tuple[int, int]) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top): the resized image's size and its centered offset on ``canvas``."""
    cw, ch = canvas
    sw, sh = cw / w, ch / h
    if sw < sh:
        new_w, new_h = cw, min(math.ceil(h * sw), ch)
    else:
        new_w, new_h = min(math.ceil(w * sh), cw), ch
    return new_w, new_h, (cw - new_w) // 2, (ch - new_h) // 2


def num_tiles(w: int, h: int, tile: int = TILE) -> int:
    cw, ch = select_canvas(w, h, tile)
    return (cw // tile) * (ch // tile)


def num_visual_tokens(w: int, h: int, tile: int = TILE, tokens_per_tile: int = TOKENS_PER_TILE) -> int:
    """Visual tokens of a ``w``x``h`` image after UniRes: tiles · tokens_per_tile (288 … 7056 at 336 px)."""
    return num_tiles(w, h, tile) * tokens_per_tile


# (v / 255 − mean_c) / std_c for every byte value v and channel c, flattened as [v * 3 + c].
_NORMALIZED = (
    ((np.arange(256, dtype=np.float32)[:, None] / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32).ravel()
)


def normalize(pixels_uint8: np.ndarray) -> np.ndarray:
    """uint8[..., 3] → float32 CLIP-normalized: (x / 255 − mean) / std.

    A table lookup (one gather over [v * 3 + c]) gives the formula's exact fp32 values at about half the cost of
    evaluating it; this is on the stage-2 loader's hot path (12 tiles ≈ 4M values per 1024x768 image).
    """
    pixels_uint8 = np.asarray(pixels_uint8)
    if pixels_uint8.dtype != np.uint8 or pixels_uint8.shape[-1:] != (3,):
        raise ValueError(
            f"normalize expects uint8[..., 3], got {pixels_uint8.dtype}{list(pixels_uint8.shape)}"
        )
    idx = np.multiply(pixels_uint8, 3, dtype=np.uint16)
    idx += np.array([0, 1, 2], np.uint16)
    return _NORMALIZED.take(idx)


def unires_canvas(img: Image.Image, tile: int = TILE) -> Image.Image:
    """The padded RGB canvas of an image (before tiling): bicubic resize, centered on black."""
    img = to_rgb(img)
    w, h = img.size
    canvas_size = select_canvas(w, h, tile)
    new_w, new_h, left, top = resize_geometry(w, h, canvas_size)
    canvas = Image.new("RGB", canvas_size, (0, 0, 0))
    canvas.paste(img.resize((new_w, new_h), Image.Resampling.BICUBIC), (left, top))
    return canvas


def image_tiles(img: Image.Image, tile: int = TILE) -> np.ndarray:
    """UniRes: PIL image → uint8[n_tiles, tile, tile, 3] RGB tiles in raster order (not yet normalized).

    The loaders ship these bytes and the model normalizes on device (:func:`lct_jax.model.longva.normalize_pixels`):
    a quarter of the host memory, worker IPC and host→device traffic of float32 tiles.
    """
    canvas = np.asarray(unires_canvas(img, tile))  # uint8[H, W, 3]
    ch, cw = canvas.shape[:2]
    tiles = canvas.reshape(ch // tile, tile, cw // tile, tile, 3).transpose(0, 2, 1, 3, 4)  # [b, a, t, t, 3]
    return np.ascontiguousarray(tiles.reshape(-1, tile, tile, 3))


def preprocess_image(img: Image.Image, tile: int = TILE) -> np.ndarray:
    """UniRes: PIL image → float32[n_tiles, tile, tile, 3], CLIP-normalized, tiles in raster order."""
    return normalize(image_tiles(img, tile))


# ----------------------------------------------------------------------------------------------------------- video


def sample_frame_indices(
    num_frames_total: int,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    video_fps: float | None = None,
    frame_times: np.ndarray | None = None,
    tolerance: float = 1e-9,
) -> np.ndarray:
    """Indices of the frames to encode, int64[F], non-decreasing.

    - ``num_frames=N``: N indices spread uniformly over the whole video, first and last frame included
      (``linspace(0, total − 1, N)`` truncated, as LongVA's inference code); repeats when N > total.
    - ``fps=r, video_fps=v``: r frames per second of video time (V-NIAH uses r = 1): sample k is the frame on
      screen at time k / r, for every such time inside the video. Frame i starts at ``frame_times[i]`` seconds
      (presentation times, first frame at 0; default ``i / v``, which gives index ``floor(k · v / r)``) and the
      last frame lasts 1 / v. Follows real time for 29.97 fps and for variable-frame-rate files alike.
      ``tolerance`` (seconds) absorbs timestamp rounding, e.g. half the container's time base.

    Worked example, 29.97 fps (v = 30000/1001), r = 1, 100 frames (3.34 s): times 0, 1, 2, 3 s → frames
    0, 29, 59, 89 (every ~29.97th frame, never drifting to 30, 60, 90).
    """
    if num_frames_total < 1:
        raise ValueError(f"{num_frames_total=}: the video has no frames")
    if (num_frames is None) == (fps is None):
        raise ValueError(f"pass exactly one of num_frames or fps (got {num_frames=}, {fps=})")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"{num_frames=} must be >= 1")
        return np.linspace(0, num_frames_total - 1, num_frames).astype(np.int64)
    if video_fps is None or not video_fps > 0 or not fps > 0:
        raise ValueError(
            f"sampling by rate needs fps > 0 and the video's video_fps > 0; got {fps=}, {video_fps=}"
        )
    if frame_times is None:
        frame_times = np.arange(num_frames_total) / video_fps
    frame_times = np.asarray(frame_times, np.float64)
    if frame_times.shape != (num_frames_total,) or (np.diff(frame_times) < 0).any():
        raise ValueError(
            f"frame_times must be {num_frames_total} non-decreasing times, got {frame_times.shape}"
        )
    end = frame_times[-1] + 1 / video_fps  # the last frame is on screen until then
    count = max(1, math.ceil(end * fps - 1e-9))
    on_screen = np.searchsorted(frame_times, np.arange(count) / fps + tolerance, side="right") - 1
    return np.maximum(on_screen, 0).astype(np.int64)


def resize_center_crop(img: Image.Image, size: int = TILE) -> Image.Image:
    """CLIPImageProcessor geometry: shortest edge → ``size`` (bicubic, long edge int-truncated), center crop."""
    img = to_rgb(img)
    w, h = img.size
    _check_size(w, h, size)
    if w <= h:
        new_w, new_h = size, max(size, int(size * h / w))
    else:
        new_w, new_h = max(size, int(size * w / h)), size
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def frame_tiles(frames: Sequence[Image.Image] | np.ndarray, tile: int = TILE) -> np.ndarray:
    """Video frames (PIL images, or uint8[F, H, W, 3]) → uint8[F, tile, tile, 3]: shortest edge resize + center
    crop (not yet normalized; see :func:`image_tiles`)."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"frames array must be uint8[F, H, W, 3], got {frames.dtype}{list(frames.shape)}"
            )
        frames = [Image.fromarray(f) for f in frames]
    if len(frames) == 0:
        raise ValueError("no frames to preprocess")
    return np.stack([np.asarray(resize_center_crop(f, tile)) for f in frames])


def preprocess_frames(frames: Sequence[Image.Image] | np.ndarray, tile: int = TILE) -> np.ndarray:
    """Video frames (PIL images, or uint8[F, H, W, 3]) → float32[F, tile, tile, 3], CLIP-normalized."""
    return normalize(frame_tiles(frames, tile))


# ----------------------------------------------------------------------------------------------- safe image loading


def to_rgb(img: Image.Image, name: str = "<image>") -> Image.Image:
    """Any PIL mode → 8-bit RGB: alpha over white, 16/32-bit integer gray scaled by 1/257, CMYK/YCbCr/LAB/P/1/L
    via pillow's converters."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img).astype(np.float64)  # 16-bit PNGs decode to 0..65535
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise BadImageError(f"{name}: {img.mode} image values outside 0..65535; cannot map to 8-bit")
        return Image.fromarray(np.round(a / 257.0).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        a = np.nan_to_num(np.asarray(img, np.float64), nan=0.0)
        a = a * 255.0 if a.size and a.max() <= 1.0 else a  # float images are either 0..1 or 0..255
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImageError(f"{name}: cannot convert image mode {img.mode!r} to RGB ({e})") from e


def load_image(
    source: str | os.PathLike | bytes | io.IOBase, max_pixels: int = MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Decode an image file (path, encoded bytes, or binary file object) into a fully loaded RGB image.

    EXIF orientation is applied (the image as viewers show it). Raises :class:`BadImageError` naming the file
    (``name`` or the path) for unreadable, corrupt, truncated or empty images and for more than ``max_pixels``
    pixels (checked from the header, before decoding: decompression bombs never allocate).
    """
    if name is None:
        name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{name}: image too large, refused before decoding ({e})") from e
    except FileNotFoundError as e:
        raise BadImageError(f"{name}: no such file") from e
    except Exception as e:  # noqa: BLE001 - pillow raises many types (UnidentifiedImageError, SyntaxError, ...)
        raise BadImageError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e
    try:
        with img:
            w, h = img.size
            if w < 1 or h < 1:
                raise BadImageError(f"{name}: image size {w}x{h} is empty")
            if w * h > max_pixels:
                raise BadImageError(
                    f"{name}: {w}x{h} = {w * h} pixels exceeds {max_pixels=}; refusing to decode "
                    "(raise max_pixels if this image is legitimate)"
                )
            img.load()  # decode now: truncated / corrupt data fails here, not later in a worker
            oriented = ImageOps.exif_transpose(img)  # an in-memory copy, valid after the file closes
        return to_rgb(oriented, name)
    except BadImageError:
        raise
    except Exception as e:  # noqa: BLE001 - OSError('image file is truncated'), SyntaxError, struct.error, ...
        raise BadImageError(f"{name}: corrupt or truncated image data ({type(e).__name__}: {e})") from e

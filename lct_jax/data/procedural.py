"""A procedural haystack: a seeded "movie" of any length with moving content, frame k computed from (seed, k) alone.

LongVA's V-NIAH haystack movie was never released; this stands in for it so that every evaluation can be rebuilt
from the command line (``procedural:seed=0,frames=3000`` as a video, or ``python -m lct_jax.eval make-video``).

The movie is a sequence of scenes of :data:`SCENE_FRAMES` frames. A scene draws from ``numpy`` PCG64 seeded with
``(seed, scene)``: a two-colour vertical gradient crossed by a drifting diagonal wave, and 3 to 6 shapes (ellipses,
boxes, triangles) of their own colours that move in straight lines and bounce off the frame's edges. Positions are
closed-form in the frame number (a triangle wave), so any frame is drawn without its predecessors: random access,
resumable, and independent of how the frames are batched.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SCENE_FRAMES = 30  # a new scene (palette, shapes) every 30 frames: 30 s at the V-NIAH rate of 1 fps
DEFAULT_SIZE = (640, 360)  # (W, H): 16:9, so the evaluation's letterbox pads it


def _bounce(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Reflect ``x`` into [lo, hi] (a point moving at constant speed between two walls)."""
    span = np.maximum(hi - lo, 1e-6)
    y = np.mod(x - lo, 2 * span)
    return lo + np.where(y > span, 2 * span - y, y)


def procedural_frame(seed: int, k: int, size: tuple[int, int] = DEFAULT_SIZE) -> Image.Image:
    """Frame ``k`` (0-based) of the procedural movie ``seed`` as an RGB image of ``size`` = (W, H)."""
    w, h = size
    if w < 2 or h < 2 or k < 0:
        raise ValueError(f"procedural frame {k} of size {w}x{h}: need k >= 0 and at least 2x2 pixels")
    scene, t = divmod(k, SCENE_FRAMES)
    rng = np.random.default_rng([seed, scene])
    top, bottom = rng.integers(20, 236, (2, 3))
    period, wavelength = rng.uniform(8, 24), rng.uniform(0.15, 0.5) * w
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]  # [H, 1]
    x = np.arange(w, dtype=np.float32)[None, :]  # [1, W]
    wave = np.sin(np.float32(2 * np.pi) * ((x + y * h) / np.float32(wavelength) - np.float32(t / period)))
    shade = np.float32(0.875) + np.float32(0.125) * wave  # [H, W] in [0.75, 1]
    gradient = (1 - y[:, :, None]) * top.astype(np.float32) + y[:, :, None] * bottom.astype(
        np.float32
    )  # [H, 1, 3]
    pixels = gradient * shade[:, :, None]  # [H, W, 3]
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    n = int(rng.integers(3, 7))
    kinds = rng.integers(0, 3, n)
    colors = rng.integers(0, 256, (n, 3))
    radius = rng.uniform(0.06, 0.18, n) * min(w, h)
    start = rng.uniform(0, 1, (n, 2)) * (w, h)
    velocity = rng.uniform(-0.03, 0.03, (n, 2)) * w  # pixels per frame
    lo, hi = radius[:, None], np.array([w, h]) - radius[:, None]
    centers = _bounce(start + velocity * t, lo, hi)
    for kind, color, r, (cx, cy) in zip(kinds, colors, radius, centers, strict=True):
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = tuple(int(c) for c in color)
        if kind == 0:
            draw.ellipse(box, fill=fill)
        elif kind == 1:
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return img

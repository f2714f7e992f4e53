"""UniRes / video preprocessing: spec examples, extremes, properties, a natural photo, bad files."""

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lct_jax.data import unires
from lct_jax.data.unires import (
    CANVAS_GRID,
    CLIP_MEAN,
    CLIP_STD,
    BadImageError,
    canvases,
    load_image,
    num_visual_tokens,
    preprocess_frames,
    preprocess_image,
    resize_geometry,
    sample_frame_indices,
    select_canvas,
)

BLACK = (0.0 - CLIP_MEAN) / CLIP_STD  # a padded pixel after normalization


# ------------------------------------------------------------------------------------------------- canvas choice


def test_candidate_canvases():
    c = canvases()
    assert len(c) == 200 == len(set(c))
    assert (336, 336) not in c
    assert all(w % 336 == 0 and h % 336 == 0 and (w // 336) * (h // 336) <= 49 for w, h in c)
    assert c[:3] == [(336, 672), (336, 1008), (336, 1344)] and c[-1] == (49 * 336, 336)
    assert CANVAS_GRID == tuple(sorted(CANVAS_GRID))  # documented order: a (across) then b (down)


@pytest.mark.parametrize(
    "size, canvas, tokens",
    [
        ((1024, 768), (1344, 1008), 1728),  # spec: 4x3 tiles
        ((300, 300), (336, 672), 288),  # spec: 2 tiles, the tie goes to the first candidate (1x2)
        ((1, 49), (336, 672), 288),  # tiny strips upscale into the smallest canvas
        ((49, 1), (336, 672), 288),  # every canvas holds it fully; equal areas tie → first (1x2) wins
        ((1, 1), (336, 672), 288),
        ((10000, 10), (30 * 336, 336), 30 * 144),  # 30x1 tiles: the narrowest canvas that holds 10000 px
        ((10, 10000), (336, 30 * 336), 30 * 144),
        ((20000, 300), (49 * 336, 336), 49 * 144),  # 49x1 strip (downscaled)
        ((300, 20000), (336, 49 * 336), 49 * 144),  # 1x49 strip
        ((4000, 4000), (7 * 336, 7 * 336), 7056),  # the most tokens an image can get
    ],
)
def test_worked_examples_and_extremes(size, canvas, tokens):
    assert select_canvas(*size) == canvas
    assert num_visual_tokens(*size) == tokens


def test_extreme_geometry_centered():
    # 10000x10 on 10080x336: scaled by 1.008 to 10080x11 (ceil), centered vertically
    assert resize_geometry(10000, 10, (10080, 336)) == (10080, 11, 0, (336 - 11) // 2)
    assert resize_geometry(1, 1, (336, 672)) == (336, 336, 0, 168)
    # 1x1 px image → one white square in the middle of the 1x2 canvas, tiles raster order (top tile first)
    tiles = preprocess_image(Image.new("RGB", (1, 1), (255, 255, 255)))
    assert tiles.shape == (2, 336, 336, 3)
    white = (1.0 - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(tiles[0, 167], np.broadcast_to(BLACK, (336, 3)), atol=1e-6)
    np.testing.assert_allclose(tiles[0, 168:], np.broadcast_to(white, (168, 336, 3)), atol=1e-6)
    np.testing.assert_allclose(tiles[1, :168], np.broadcast_to(white, (168, 336, 3)), atol=1e-6)
    np.testing.assert_allclose(tiles[1, 168], np.broadcast_to(BLACK, (336, 3)), atol=1e-6)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 30000), st.integers(1, 30000))
def test_canvas_properties(w, h):
    cw, ch = select_canvas(w, h)
    a, b = cw // 336, ch // 336
    assert (cw, ch) in canvases() and 2 <= a * b <= 49
    # optimality, vectorized over all candidates: no canvas resolves more of the image, or wastes less for as much
    c = np.array(canvases(), np.int64)
    scale = np.minimum(c[:, 0] / w, c[:, 1] / h)
    eff = np.minimum((w * scale).astype(np.int64) * (h * scale).astype(np.int64), w * h)
    waste = c[:, 0] * c[:, 1] - eff
    i = canvases().index((cw, ch))
    assert eff[i] == eff.max() and waste[i] == waste[eff == eff.max()].min()
    assert i == np.flatnonzero((eff == eff[i]) & (waste == waste[i]))[0]  # first in order on exact ties
    # the resized image fits the canvas, touches it on one axis, keeps the aspect ratio, sits centered
    nw, nh, left, top = resize_geometry(w, h, (cw, ch))
    assert 1 <= nw <= cw and 1 <= nh <= ch and (nw == cw or nh == ch)
    s = min(cw / w, ch / h)  # aspect kept: the other side is the exact scaled size rounded up (or clamped)
    assert 0 <= nw - w * s < 1 + 1e-9 or nw == cw and w * s >= cw - 1e-9
    assert 0 <= nh - h * s < 1 + 1e-9 or nh == ch and h * s >= ch - 1e-9
    assert left == (cw - nw) // 2 and top == (ch - nh) // 2
    assert 0 <= (cw - nw - left) - left <= 1 and 0 <= (ch - nh - top) - top <= 1


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 90), st.integers(1, 90))
def test_canvas_pixels_small_tile(w, h):
    """Pixel check with 8 px tiles: the image region is exactly the predicted centered box, the rest is black."""
    tile = 8
    canvas = np.asarray(unires.unires_canvas(Image.new("RGB", (w, h), (200, 150, 100)), tile))
    ch, cw = canvas.shape[:2]
    assert (cw, ch) == select_canvas(w, h, tile)
    nw, nh, left, top = resize_geometry(w, h, (cw, ch))
    inside = np.zeros((ch, cw), bool)
    inside[top : top + nh, left : left + nw] = True
    assert (canvas[inside] == (200, 150, 100)).all()  # bicubic keeps a flat color exact
    assert (canvas[~inside] == 0).all()
    tiles = preprocess_image(Image.new("RGB", (w, h), (200, 150, 100)), tile)
    assert tiles.shape == ((cw // tile) * (ch // tile), tile, tile, 3) and tiles.shape[0] <= 49


# ---------------------------------------------------------------------------------------------------- real photo


def natural_photo(w=640, h=427, seed=0) -> Image.Image:
    """A procedural 'photo': sky gradient, 1/f (pink) noise texture, a sun and a hill; saved as JPEG."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    amp = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(w, h))
    noise = np.stack(
        [np.real(np.fft.ifft2(amp * np.exp(2j * np.pi * rng.random((h, w))))) for _ in range(3)], -1
    )
    noise = (noise - noise.mean()) / noise.std()
    y, x = np.mgrid[0:h, 0:w]
    sky = np.stack([90 + 80 * y / h, 140 + 60 * y / h, 230 - 30 * y / h], -1)
    ground = np.stack([70 + 0 * y, 120 + 0 * y, 50 + 0 * y], -1)
    hill = y > h * (0.6 + 0.1 * np.sin(x / w * 6.0))
    img = np.where(hill[..., None], ground + 25 * noise, sky + 8 * noise)
    sun = (x - 0.75 * w) ** 2 + (y - 0.2 * h) ** 2 < (0.06 * w) ** 2
    img[sun] = (255, 240, 200)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_real_photo_unires(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(natural_photo())
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (640, 427)
    tiles = preprocess_image(img)
    cw, ch = select_canvas(640, 427)
    assert (cw, ch) == (672, 672)  # 640 wide → 2 across; 427 tall → 2 down (square canvas: no 1x1 fits)
    assert tiles.shape == (4, 336, 336, 3) and tiles.dtype == np.float32
    lo, hi = (0 - CLIP_MEAN) / CLIP_STD, (1 - CLIP_MEAN) / CLIP_STD
    assert (tiles >= lo - 1e-6).all() and (tiles <= hi + 1e-6).all()
    # raster order and tiling, against PIL crops of the canvas
    canvas = unires.unires_canvas(img)
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        crop = np.asarray(canvas.crop((c * 336, r * 336, c * 336 + 336, r * 336 + 336)), np.float32)
        np.testing.assert_allclose(tiles[k], (crop / 255 - CLIP_MEAN) / CLIP_STD, atol=1e-5)
    # 640x427 → 672x448 (ceil(427·1.05)), top padding (672−449)//2 rows of black
    nw, nh, left, top = resize_geometry(640, 427, (672, 672))
    assert (nw, nh, left, top) == (672, 449, 0, 111)
    np.testing.assert_allclose(tiles[0, :top], np.broadcast_to(BLACK, (top, 336, 3)), atol=1e-6)
    content = tiles[0, top:]
    assert content.std() > 0.2 and np.isfinite(content).all()


def test_video_frames_match_clip_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    frames = np.stack(
        [np.asarray(Image.open(io.BytesIO(natural_photo(400, 250, seed=s)))) for s in range(2)]
        + [rng.integers(0, 256, (250, 400, 3), dtype=np.uint8)]
    )
    ours = preprocess_frames(frames, tile=336)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))  # fmt: skip
    ref = np.asarray(
        proc([Image.fromarray(f) for f in frames], return_tensors="np")["pixel_values"]
    ).transpose(0, 2, 3, 1)
    assert ours.shape == ref.shape == (3, 336, 336, 3)
    err = np.abs(ours - ref).max()
    assert err <= 1e-5, err
    # portrait frames crop the middle, too
    tall = preprocess_frames([Image.fromarray(frames[0].transpose(1, 0, 2))], tile=28)
    assert tall.shape == (1, 28, 28, 3)


def test_sample_frame_indices():
    np.testing.assert_array_equal(sample_frame_indices(100, num_frames=5), [0, 24, 49, 74, 99])
    np.testing.assert_array_equal(sample_frame_indices(3, num_frames=5), [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(sample_frame_indices(300, fps=1, video_fps=30), np.arange(0, 300, 30))
    np.testing.assert_array_equal(sample_frame_indices(301, fps=1, video_fps=30), np.arange(0, 301, 30))
    # 29.97 fps, 100 s: one frame per second of real time, not every 30th frame (which drifts)
    idx = sample_frame_indices(2997, fps=1, video_fps=29.97)
    assert len(idx) == 100 and idx[-1] == 2967 and (np.diff(idx) >= 29).all()
    assert len(sample_frame_indices(10, fps=1, video_fps=30)) == 1
    with pytest.raises(ValueError, match="exactly one"):
        sample_frame_indices(10, num_frames=2, fps=1, video_fps=30)
    with pytest.raises(ValueError, match="video_fps"):
        sample_frame_indices(10, fps=1)
    with pytest.raises(ValueError, match="no frames"):
        sample_frame_indices(0, num_frames=1)


# ------------------------------------------------------------------------------------------------------ bad input


def png_bytes(w, h, bit_depth, color_type, raw_rows: bytes | None, truncate_idat: bool = False) -> bytes:
    """A PNG written by hand (for cases pillow will not write: 48-bit RGB, 0x0, a bomb header)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(raw_rows or b"")
    if truncate_idat:
        idat = idat[: len(idat) // 2]
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def save(tmp_path, name, img: Image.Image, fmt, **kw):
    path = tmp_path / name
    img.save(path, fmt, **kw)
    return path


def test_corrupt_file_names_the_file(tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(BadImageError, match="garbage.jpg.*not a readable image"):
        load_image(path)
    with pytest.raises(BadImageError, match="missing.png: no such file"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    good = save(tmp_path, "good", Image.open(io.BytesIO(natural_photo(200, 150))), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BadImageError, match=f"cut.{fmt.lower()}"):
        load_image(path)
    with pytest.raises(BadImageError, match="sample-17"):  # encoded bytes get the caller's name
        load_image(path.read_bytes(), name="sample-17")


def test_empty_image(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(png_bytes(0, 0, 8, 2, b""))
    with pytest.raises(BadImageError, match="empty.png"):
        load_image(path)
    with pytest.raises(BadImageError, match="0x0"):
        preprocess_image(Image.new("RGB", (0, 0)))
    with pytest.raises(BadImageError, match="0x5"):
        preprocess_frames([Image.new("RGB", (0, 5))])


def test_grayscale_and_palette(tmp_path):
    gray = np.arange(60 * 40, dtype=np.uint8).reshape(40, 60)
    img = load_image(save(tmp_path, "g.png", Image.fromarray(gray, "L"), "PNG"))
    assert img.mode == "RGB" and (np.asarray(img) == gray[..., None]).all()
    onebit = load_image(save(tmp_path, "b.png", Image.fromarray(gray > 100), "PNG"))
    assert set(np.unique(np.asarray(onebit))) <= {0, 255}
    pal = Image.fromarray(np.stack([gray] * 3, -1)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    p = load_image(save(tmp_path, "p.png", pal, "PNG", transparency=0))
    assert p.mode == "RGB" and p.size == (60, 40)
    assert (np.asarray(p)[np.asarray(pal) == 0] == 255).all()  # transparent palette entry → white


def test_rgba_composited_over_white(tmp_path):
    a = np.zeros((10, 10, 4), np.uint8)
    a[..., 0] = 255  # red
    a[:, :5, 3] = 255  # left half opaque
    a[:, 5:, 3] = 0  # right half transparent (hidden red must not show)
    a[0, 0] = (0, 0, 255, 128)  # half-transparent blue
    img = load_image(save(tmp_path, "rgba.png", Image.fromarray(a, "RGBA"), "PNG"))
    out = np.asarray(img).astype(int)
    assert img.mode == "RGB"
    assert (out[1:, :5] == (255, 0, 0)).all() and (out[:, 5:] == (255, 255, 255)).all()
    np.testing.assert_allclose(out[0, 0], (127, 127, 255), atol=1)
    la = load_image(save(tmp_path, "la.png", Image.fromarray(a[..., [0, 3]], "LA"), "PNG"))
    assert (np.asarray(la)[:, 5:] == 255).all()


def test_cmyk_jpeg(tmp_path):
    c = np.zeros((16, 16, 4), np.uint8)
    c[:8] = (0, 255, 255, 0)  # red
    c[8:] = (255, 0, 255, 0)  # green
    img = load_image(save(tmp_path, "cmyk.jpg", Image.fromarray(c, "CMYK"), "JPEG", quality=100))
    out = np.asarray(img).astype(int)
    assert img.mode == "RGB"
    np.testing.assert_allclose(out[2:6, 2:14].mean((0, 1)), (255, 0, 0), atol=8)
    np.testing.assert_allclose(out[10:14, 2:14].mean((0, 1)), (0, 255, 0), atol=8)


def test_16bit_png(tmp_path):
    v = (np.arange(12 * 8, dtype=np.uint32).reshape(8, 12) * 690).astype(np.uint16)  # 0 .. 65550-ish
    gray = load_image(save(tmp_path, "g16.png", Image.fromarray(v), "PNG"))
    np.testing.assert_array_equal(np.asarray(gray)[..., 1], np.round(v / 257.0).astype(np.uint8))
    # 48-bit RGB (pillow cannot write it; handwritten PNG, big-endian samples)
    rgb16 = np.stack([v, 65535 - v, np.full_like(v, 32896)], -1)  # 32896 = 128·257
    rows = b"".join(b"\x00" + rgb16[r].astype(">u2").tobytes() for r in range(8))
    path = tmp_path / "rgb48.png"
    path.write_bytes(png_bytes(12, 8, 16, 2, rows))
    out = np.asarray(load_image(path)).astype(int)
    np.testing.assert_allclose(out, np.round(rgb16 / 257.0), atol=1)


def test_decompression_bomb(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(100_000, 100_000, 8, 2, b"\x00" * 1000, truncate_idat=True))
    with pytest.raises(BadImageError, match="bomb.png.*too large"):
        load_image(path)
    ok = save(tmp_path, "big.png", Image.new("RGB", (200, 100)), "PNG")
    with pytest.raises(BadImageError, match=r"big.png: 200x100 = 20000 pixels exceeds max_pixels=10000"):
        load_image(ok, max_pixels=10_000)
    assert load_image(ok).size == (200, 100)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 200, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display
    path = save(tmp_path, "rot.jpg", img, "JPEG", exif=exif.tobytes())
    assert load_image(path).size == (20, 40)


def test_normalize_table_equals_formula_for_every_byte():
    from lct_jax.data.unires import CLIP_MEAN, CLIP_STD, normalize

    pixels = np.stack(np.meshgrid(np.arange(256), np.arange(256), np.arange(256), indexing="ij"), -1)[
        ::3, ::5
    ]
    pixels = pixels.astype(np.uint8)  # every value in every channel
    want = ((pixels.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)
    got = normalize(pixels)
    assert got.dtype == np.float32 and got.shape == pixels.shape
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="uint8"):
        normalize(pixels.astype(np.float32))


@pytest.mark.parametrize(
    "name,size,canvas,tiles,geometry",
    [
        # worked by hand from spec §4: the smallest-waste canvas that shows the whole image at full resolution,
        # then (new_w, new_h, left, top): fit the tighter side, ceil the other, center
        ("astronaut", (512, 512), (672, 672), 4, (672, 672, 0, 0)),  # 336x672 would shrink it to 336x336
        # 672x336 would shrink coffee to 504x336. Height: the released code computes ceil(400 * (672 / 600)) in
        # floats = ceil(448.00000000000006) = 449, not the exact 448; lct_jax reproduces the release.
        ("coffee", (600, 400), (672, 672), 4, (672, 449, 0, 111)),
        ("chelsea", (451, 300), (672, 336), 2, (506, 336, 83, 0)),  # ceil(451·336/300) = 506 wide
    ],
)
def test_real_photos_from_scikit_image(tmp_path, name, size, canvas, tiles, geometry):
    """Real photographs (scikit-image's bundled samples), through a JPEG file on disk like the loaders read."""
    import skimage.data as skimage_data  # a declared test dependency: fail loudly if missing

    path = tmp_path / f"{name}.jpg"
    Image.fromarray(getattr(skimage_data, name)()).save(path, quality=95)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == size
    assert select_canvas(*size) == canvas
    assert unires.num_visual_tokens(*size) == 144 * tiles
    raw = unires.image_tiles(img)
    assert raw.shape == (tiles, 336, 336, 3) and raw.dtype == np.uint8
    out = preprocess_image(img)
    assert out.shape == (tiles, 336, 336, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, unires.normalize(raw))
    lo, hi = (0 - CLIP_MEAN) / CLIP_STD, (1 - CLIP_MEAN) / CLIP_STD
    assert (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all()
    nw, nh, left, top = resize_geometry(*size, canvas)
    assert (nw, nh, left, top) == geometry
    full = np.concatenate(list(raw.reshape(canvas[1] // 336, canvas[0] // 336, 336, 336, 3)), axis=1)  # rows
    full = np.concatenate(list(full), axis=1)  # [H, W, 3] canvas rebuilt from raster-order tiles
    assert full.shape == (canvas[1], canvas[0], 3)
    assert (full[:top] == 0).all() and (full[top + nh :] == 0).all()  # centered black padding
    assert (full[:, :left] == 0).all() and (full[:, left + nw :] == 0).all()
    photo = full[top : top + nh, left : left + nw].astype(np.float32)
    assert photo.std() > 20  # a real, textured photo fills the box
    # the box holds the photo: its mean colour matches the source's within JPEG + resampling error
    np.testing.assert_allclose(photo.mean((0, 1)), np.asarray(img, np.float32).mean((0, 1)), atol=3.0)

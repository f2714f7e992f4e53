"""Real video files written here with PyAV decode to the frames sampling says, in every container; frame directories
and procedural movies behave the same; bad files give one clear error, and counted skips in the stage-2 loader.

Frame k of a test video shows k in binary as 10 columns of 16 px, dark (bit 0) or light (bit 1): big flat blocks
that survive lossy H.264 / VP9 / MPEG-4 exactly. Lossless files (FFV1 in mkv) are also compared pixel for pixel.
"""

import fractions
import json

import av
import jax
import numpy as np
import pytest
from PIL import Image

from lct_jax.data import unires
from lct_jax.data.procedural import procedural_frame
from lct_jax.data.video import BadVideoError, probe, write_video
from lct_jax.sharding import make_mesh
from lct_jax.train.run import build_data, build_model, load_config

W, H, BITS = 160, 32, 10
LO, HI = 25, 230


def marker(k: int, noise_seed: int | None = None) -> np.ndarray:
    """uint8[H, W, 3]: k in binary, most significant bit left; optional noise for the lossless checks."""
    bits = [(k >> (BITS - 1 - b)) & 1 for b in range(BITS)]
    row = np.repeat(np.where(bits, HI, LO).astype(np.uint8), W // BITS)  # [W]
    img = np.broadcast_to(row[None, :, None], (H, W, 3)).copy()
    if noise_seed is not None:
        img ^= np.random.default_rng([noise_seed, k]).integers(0, 8, img.shape, dtype=np.uint8)
    return img


def read_marker(img) -> int:
    a = np.asarray(img, np.float32)
    cols = (
        a[H // 4 : 3 * H // 4].reshape(H // 2, BITS, W // BITS, 3)[:, :, 4:-4].mean(axis=(0, 2, 3))
    )  # [BITS]
    return int("".join("1" if c > (LO + HI) / 2 else "0" for c in cols), 2)


def markers(video, idx) -> list[int]:
    return [read_marker(img) for _, img in video.frames(idx)]


CONTAINERS = [  # (extension, codec, pixel format, lossless)
    ("mp4", None, None, False),  # H.264, yuv420p
    ("mkv", "ffv1", "bgr0", True),
    ("webm", None, None, False),  # VP9; webm declares no frame count
    ("avi", None, None, False),  # MPEG-4 Part 2
]


@pytest.mark.parametrize("ext,codec,pix_fmt,lossless", CONTAINERS, ids=[c[0] for c in CONTAINERS])
def test_each_container_decodes_at_1fps_to_the_right_frames(tmp_path, ext, codec, pix_fmt, lossless):
    frames = [marker(k, noise_seed=0 if lossless else None) for k in range(95)]  # 3.17 s at 30 fps
    path = write_video(tmp_path / f"v.{ext}", frames, fps=30, codec=codec, pix_fmt=pix_fmt)
    v = probe(path)
    assert (v.num_frames, v.fps, v.size) == (95, 30.0, (W, H))
    idx = v.sample(fps=1)
    np.testing.assert_array_equal(idx, [0, 30, 60, 90])  # 0, 1, 2, 3 s
    assert markers(v, idx) == [0, 30, 60, 90]
    if lossless:
        for i, img in v.frames(idx):
            np.testing.assert_array_equal(np.asarray(img), frames[i])
    assert markers(v, None) == list(range(95))  # every frame, in order
    assert v.sample(fps=1, max_frames=2).tolist() == [0, 30]
    uniform = v.sample(num_frames=5)  # from the demuxed count, also where the container declares none (webm)
    np.testing.assert_array_equal(uniform, [0, 23, 47, 70, 94])
    assert markers(v, uniform) == [0, 23, 47, 70, 94]


def test_the_main_video_stream_is_read_not_a_cover_picture(tmp_path):
    path = str(tmp_path / "cover.mkv")
    with av.open(path, "w") as c:
        cover = c.add_stream("mjpeg", rate=1)  # a one-frame still stored first, as taggers add album art
        cover.width, cover.height, cover.pix_fmt = 64, 64, "yuvj420p"
        movie = c.add_stream("libx264", rate=30)
        movie.width, movie.height, movie.pix_fmt = W, H, "yuv420p"
        still = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
        frames = [av.VideoFrame.from_ndarray(marker(k), format="rgb24") for k in range(40)]
        for p in [*cover.encode(still), *cover.encode()] + [
            q for f in [*frames, None] for q in movie.encode(f)
        ]:
            c.mux(p)
    v = probe(path)
    assert (v.num_frames, v.size) == (40, (W, H)) and markers(v, v.sample(fps=1)) == [0, 30]


def test_29_97_fps_follows_real_time(tmp_path):
    rate = fractions.Fraction(30000, 1001)
    v = probe(write_video(tmp_path / "ntsc.mp4", [marker(k) for k in range(100)], fps=rate))  # 3.34 s
    assert v.fps == pytest.approx(29.97, abs=1e-3)
    idx = v.sample(fps=1)
    assert idx.tolist() == [0, 29, 59, 89]  # frame on screen at 0, 1, 2, 3 s (every 30th would drift: 90)
    assert markers(v, idx) == [0, 29, 59, 89]
    np.testing.assert_array_equal(idx, unires.sample_frame_indices(100, fps=1, video_fps=float(rate)))


def test_variable_frame_rate_is_sampled_by_presentation_time(tmp_path):
    times = [0.0, 0.1, 0.5, 1.7, 1.9, 2.1, 3.6, 4.0]  # seconds; frame k shows k
    path = str(tmp_path / "vfr.mkv")
    with av.open(path, "w") as c:
        s = c.add_stream("ffv1", rate=10)
        s.width, s.height, s.pix_fmt = W, H, "bgr0"
        for k, t in enumerate(times):
            f = av.VideoFrame.from_ndarray(marker(k), format="rgb24")
            f.pts = round(t * 10)  # in the encoder's 1/10 s time base
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    v = probe(path)
    assert v.num_frames == 8
    # on screen at 0, 1, 2, 3, 4 s: the frames that started at 0, 0.5, 1.9, 2.1, 4.0 (the last lasts 0.1 s)
    assert v.sample(fps=1).tolist() == [0, 2, 4, 5, 7]
    assert markers(v, [0, 2, 4, 5, 7]) == [0, 2, 4, 5, 7]


def test_directory_of_frames(tmp_path):
    d = tmp_path / "frames"
    d.mkdir()
    for k in range(12):
        Image.fromarray(marker(k)).save(d / f"f{k + 1}.png")  # f1 .. f12: numbers sort as numbers
    (d / "._f3.png").write_bytes(b"resource fork")  # hidden files are not frames
    (d / "notes.txt").write_text("not a frame")
    v = probe(d)
    assert (v.num_frames, v.fps, v.size) == (12, None, (W, H))
    assert markers(v, None) == list(range(12))
    assert markers(v, v.sample(num_frames=4)) == [0, 3, 7, 11]
    with pytest.raises(BadVideoError, match="no frame rate"):
        v.sample(fps=1)
    (d / "f5.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(BadVideoError, match=r"frame 4: .*f5.png"):
        list(probe(d).frames())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadVideoError, match="no frame images"):
        probe(empty)


def test_procedural_video_is_seeded_moving_and_random_access():
    v = probe("procedural:seed=3,frames=70,fps=2,size=64x36")
    assert (v.num_frames, v.fps, v.size) == (70, 2.0, (64, 36))
    assert v.sample(fps=1).tolist() == list(range(0, 70, 2))
    got = {i: np.asarray(img) for i, img in v.frames([5, 5, 31, 69])}
    for i in (5, 31, 69):
        np.testing.assert_array_equal(got[i], np.asarray(procedural_frame(3, i, (64, 36))))  # random access
    a, b = (np.asarray(procedural_frame(3, k, (64, 36)), np.float32) for k in (10, 11))
    assert np.abs(a - b).mean() > 1  # consecutive frames differ: things move
    assert not np.array_equal(np.asarray(procedural_frame(4, 10, (64, 36))), a)  # another seed, another movie
    assert probe("procedural:frames=3").size == (640, 360)
    for bad in (
        "procedural:seed=0",
        "procedural:frames=0",
        "procedural:frames=2,colour=red",
        "procedural:frames=x",
    ):
        with pytest.raises(BadVideoError, match="expected procedural:seed=S,frames=N"):
            probe(bad)


def _truncated(tmp_path, ext, keep=0.5):
    full = write_video(tmp_path / f"full.{ext}", [marker(k) for k in range(95)], fps=30)
    path = tmp_path / f"cut.{ext}"
    data = full.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _zero_frame_video(path):
    """A file with a video stream but no video packets (only audio)."""
    with av.open(str(path), "w") as c:
        v = c.add_stream("ffv1", rate=30)
        v.width, v.height, v.pix_fmt = W, H, "bgr0"
        a = c.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in [*a.encode(frame), *a.encode()]:
            c.mux(p)
    return path


def test_bad_files_raise_one_clear_error_naming_the_file(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    cases = {
        _truncated(tmp_path, "mp4"): "not a readable video file, or truncated",  # the index (moov) is cut off
        _truncated(tmp_path, "mkv"): r"truncated: the file holds \d+ frames .* but declares 3.17 s",
        _truncated(tmp_path, "avi", keep=0.7): "truncated: the file holds .* but declares 95 frames",
        text: "not a readable video file",
        _zero_frame_video(tmp_path / "zero.mkv"): "has no frames",
        tmp_path / "missing.mp4": "no such video file",
    }
    for path, why in cases.items():
        with pytest.raises(BadVideoError, match=why) as e:
            probe(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_write_video_is_atomic(tmp_path):
    frames = [marker(0), marker(1), np.zeros((H, W + 2, 3), np.uint8)]  # the third has another size
    with pytest.raises(ValueError, match="differs"):
        write_video(tmp_path / "x.mp4", frames, fps=30)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_stage2_loader_takes_video_files(tmp_path):
    """The real stage-2 pipeline (configs/align_finetune.py, tiny): `video` may be a file; frames per video from
    config.data.num_frames; a truncated file and a non-video file are counted `bad_video` skips."""
    lossless = [marker(k, noise_seed=1) for k in range(40)]
    write_video(tmp_path / "a.mkv", lossless, fps=25, codec="ffv1", pix_fmt="bgr0")
    write_video(tmp_path / "b.mp4", [marker(k) for k in range(50)], fps=30)
    (tmp_path / "dir").mkdir()
    for k in range(7):
        Image.fromarray(lossless[k]).save(tmp_path / "dir" / f"{k:03d}.png")
    _truncated(tmp_path, "mkv")
    (tmp_path / "fake.webm").write_text("not a video")
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "ok"}]
    recs = [{"video": v, "conversations": conv} for v in ("a.mkv", "cut.mkv", "b.mp4", "fake.webm", "dir")]
    (tmp_path / "ann.json").write_text(json.dumps(recs))
    config = load_config("configs/align_finetune.py:size=tiny")
    config.data.annotations = str(tmp_path / "ann.json")
    config.data.image_root = str(tmp_path)
    config.data.num_frames = 4
    config.data.batch_size = 3
    config.data.shuffle = False
    _, model_cfg, _ = build_model(config)
    it = build_data(config, make_mesh(1, 1, 1, devices=jax.devices()[:1]), model_cfg)
    batch = next(it)
    tile = model_cfg.tile
    want = [
        unires.frame_tiles(
            np.stack([lossless[i] for i in unires.sample_frame_indices(40, num_frames=4)]), tile
        ),
        None,  # b.mp4: lossy, compared with a tolerance below
        unires.frame_tiles(np.stack([lossless[i] for i in (0, 2, 4, 6)]), tile),  # dir: 7 frames, 4 uniformly
    ]
    assert batch["pixels"].shape == (3, 4, tile, tile, 3) and batch["pixel_mask"].all()
    for row, w in enumerate(want):
        if w is not None:
            np.testing.assert_array_equal(batch["pixels"][row], w)
    ref = unires.frame_tiles(
        np.stack([marker(i) for i in unires.sample_frame_indices(50, num_frames=4)]), tile
    )
    assert np.abs(batch["pixels"][1].astype(np.float32) - ref).mean() < 2  # H.264 at CRF 18: nearly exact
    assert (batch["inputs"] == -200).sum(axis=1).tolist() == [4 * model_cfg.tokens_per_tile] * 3
    counts = it.counts()
    assert counts["skipped/bad_video"] == 2 and counts["rows"] == 3

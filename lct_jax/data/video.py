"""Videos as streams of frames: a video file, a directory of frame images or a procedural movie, one API for all.

    video = probe("movie.mp4")                   # a file is demuxed once (no decoding): exact count and times
    idx = video.sample(fps=1, max_frames=3000)   # source frame indices, int64[F]; or num_frames=N; or every frame
    for i, img in video.frames(idx):             # (index, PIL RGB image), one at a time, in order
        ...

A *video spec* is a string, accepted wherever a video is (``python -m lct_jax.eval haystack --video``, the stage-2
loader's ``"video"`` key):

- **a file** FFmpeg reads (mp4, mkv, webm, avi, mov, ...), decoded with PyAV. Frame i is the i-th frame in
  presentation order, starting at its timestamp (relative to the first frame). The count and the times come from
  the packets, not the header: mkv/webm declare no count, AVI headers can be wrong, a variable-frame-rate file has
  no single rate. Sampling at r fps takes, for each time k / r inside the video, the frame on screen at that time
  (:func:`lct_jax.data.unires.sample_frame_indices` with the frame times).
- **a directory of frame images** (.jpg .png ...; hidden files ignored), frame i = the i-th file by name, numbers
  compared as numbers (``f2.png`` before ``f10.png``). It has no frame rate: sample it by count, or take every
  frame (e.g. frames already extracted at 1 fps).
- ``procedural:seed=S,frames=N[,fps=R][,size=WxH]``: the seeded movie of :mod:`lct_jax.data.procedural` (fps 1
  and 640x360 unless given), the same frames ``python -m lct_jax.eval make-video`` encodes into a file.

Nothing holds a whole movie: frames stream (one decoded frame alive at a time, plus the decoder's few reference
frames), and frames that are not sampled are decoded but never converted to RGB.

Bad input raises :class:`BadVideoError` naming the video and what to do: no such path, not a video (or no video
stream), no frames, undecodable data, or truncated (the packets end well before the frame count or duration the
container declares, or decoding stops short of the packets). :func:`write_video` encodes frames into a file.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image

from lct_jax.data.procedural import DEFAULT_SIZE, procedural_frame
from lct_jax.data.unires import BadImageError, load_image, sample_frame_indices
from lct_jax.errors import UserError

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
PROCEDURAL = "procedural:"
# what write_video uses for a file extension when no codec is given: (codec, pixel format, encoder options)
WRITE_CODECS = {
    ".mp4": ("libx264", "yuv420p", {"preset": "veryfast", "crf": "18"}),
    ".mov": ("libx264", "yuv420p", {"preset": "veryfast", "crf": "18"}),
    ".mkv": ("libx264", "yuv420p", {"preset": "veryfast", "crf": "18"}),
    ".webm": ("libvpx-vp9", "yuv420p", {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}),
    ".avi": ("mpeg4", "yuv420p", {"qscale": "2"}),
}
# more than this fraction (plus 2 frames) missing from what the container declares = truncated
TRUNCATION_SLACK = 0.01


class BadVideoError(UserError, ValueError):
    """A video that cannot be read as frames; the message names it and says what to do."""


def _natural_key(name: str):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


# ------------------------------------------------------------------------------------------------------ the API


@dataclasses.dataclass(frozen=True)
class Video:
    """A probed video (see :func:`probe`). ``fps`` is the nominal rate (None for a directory of frames); ``size``
    is (W, H) of the first frame."""

    source: str
    num_frames: int
    fps: float | None
    size: tuple[int, int]

    def _times(self) -> tuple[np.ndarray | None, float]:
        """(presentation time of each frame in seconds or None for k / fps, timestamp tolerance)."""
        return None, 1e-9

    def sample(
        self, *, num_frames: int | None = None, fps: float | None = None, max_frames: int | None = None
    ) -> np.ndarray:
        """Source frame indices (int64, non-decreasing): ``num_frames`` spread uniformly, or ``fps`` frames per
        second of video time, or (neither) every frame; then at most the first ``max_frames`` of them."""
        if num_frames is not None and fps is not None:
            raise ValueError(f"pass at most one of num_frames or fps (got {num_frames=}, {fps=})")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"{max_frames=} must be >= 1")
        if fps is not None and self.fps is None:
            raise BadVideoError(
                f"{self.source}: a directory of frames has no frame rate to sample {fps} fps from; "
                "sample it by count (num_frames) or take every frame"
            )
        if num_frames is None and fps is None:
            idx = np.arange(self.num_frames, dtype=np.int64)
        else:
            times, tol = self._times()
            idx = sample_frame_indices(
                self.num_frames,
                num_frames=num_frames,
                fps=fps,
                video_fps=self.fps,
                frame_times=times,
                tolerance=tol,
            )
        return idx[:max_frames] if max_frames is not None else idx

    def frames(self, indices: Sequence[int] | np.ndarray | None = None) -> Iterator[tuple[int, Image.Image]]:
        """``(index, RGB image)`` for each of ``indices`` (non-decreasing; repeats allowed; default every frame),
        streamed in order. Raises :class:`BadVideoError` if the data turns out corrupt or shorter than probed."""
        idx = np.arange(self.num_frames) if indices is None else np.asarray(indices, np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_frames or (np.diff(idx) < 0).any()):
            raise ValueError(
                f"frame indices must be non-decreasing within [0, {self.num_frames}) for {self.source}"
            )
        return self._decode(idx.tolist())

    def _decode(self, indices: list[int]) -> Iterator[tuple[int, Image.Image]]:
        raise NotImplementedError


def probe(source: str | os.PathLike) -> Video:
    """Open a video spec (a file, a directory of frames or ``procedural:...``) and read what sampling needs."""
    spec = os.fspath(source)
    if spec.startswith(PROCEDURAL):
        return _Procedural.parse(spec)
    if os.path.isdir(spec):
        return _FrameDir.open(spec)
    if not os.path.exists(spec):
        raise BadVideoError(f"{spec}: no such video file or directory of frames")
    return _File.open(spec)


# ----------------------------------------------------------------------------------------------- video files


def _declared_duration(container, stream) -> float | None:
    """The video stream's duration in seconds as the container declares it, if it does."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")  # mkv / webm muxers
    m = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", tag or "")
    if m:
        return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
    if container.duration and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


@dataclasses.dataclass(frozen=True)
class _File(Video):
    times: np.ndarray = None  # float64[F] presentation times, first frame at 0
    tolerance: float = 1e-9
    stream_index: int = 0

    def _times(self):
        return self.times, self.tolerance

    @classmethod
    def open(cls, path: str) -> _File:
        try:
            container = av.open(path)
        except av.FFmpegError as e:
            raise BadVideoError(
                f"{path}: not a readable video file, or truncated ({e}); "
                "check the file (ffprobe) or re-encode it, e.g. to mp4/h264"
            ) from e
        with container:
            # FFmpeg's choice of video stream: skips cover pictures, prefers the largest
            stream = container.streams.best("video")
            if stream is None:
                kinds = [s.type for s in container.streams]
                raise BadVideoError(f"{path}: no video stream in this file (streams: {kinds})")
            tb = float(stream.time_base) if stream.time_base else 0.0
            stamps = []
            try:
                for packet in container.demux(stream):
                    if (
                        packet.size == 0 or packet.is_discard
                    ):  # the end-of-stream flush packet; edit-list drops
                        continue
                    stamps.append(packet.pts if packet.pts is not None else packet.dts)
            except av.FFmpegError as e:
                raise BadVideoError(
                    f"{path}: corrupt or truncated video data after {len(stamps)} frames ({e}); "
                    "re-download or re-encode the file"
                ) from e
            n = len(stamps)
            if n == 0:
                raise BadVideoError(f"{path}: the video stream has no frames")
            if None in stamps or not tb:
                times = None  # no timestamps: frames at the nominal rate
            else:
                times = (np.sort(np.asarray(stamps, np.float64)) - min(stamps)) * tb
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if rate:
                fps = float(rate)
            elif times is not None and times[-1] > 0:
                fps = (n - 1) / times[-1]  # the mean rate of the timestamps
            else:
                raise BadVideoError(f"{path}: neither timestamps nor a frame rate; re-encode the file")
            times = np.arange(n) / fps if times is None else times
            declared_n, declared_s = stream.frames, _declared_duration(container, stream)
            end = times[-1] + 1 / fps
            if declared_n > n * (1 + TRUNCATION_SLACK) + 2 or (
                declared_s is not None and declared_s > end * (1 + TRUNCATION_SLACK) + 2 / fps
            ):
                have = f"{n} frames ({end:.2f} s)"
                want = " / ".join(
                    ([f"{declared_n} frames"] if declared_n else [])
                    + ([f"{declared_s:.2f} s"] if declared_s is not None else [])
                )
                raise BadVideoError(
                    f"{path}: truncated: the file holds {have} but declares {want}; "
                    "re-download or re-encode the file"
                )
            size = (stream.codec_context.width, stream.codec_context.height)
            return cls(path, n, fps, size, times=times, tolerance=tb / 2 + 1e-9, stream_index=stream.index)

    def _decode(self, indices):
        want = iter(indices)
        nxt = next(want, None)
        k = -1
        try:
            with av.open(self.source) as container:
                stream = container.streams[self.stream_index]
                stream.thread_type = "AUTO"
                for frame in container.decode(stream):
                    if nxt is None:
                        break
                    k += 1
                    if k < nxt:
                        continue  # decoded (the codec needs it) but never converted
                    img = frame.to_image()  # RGB, PIL
                    while nxt == k:
                        yield k, img
                        nxt = next(want, None)
        except av.FFmpegError as e:
            raise BadVideoError(
                f"{self.source}: corrupt or truncated video data after frame {k} ({e}); "
                "re-download or re-encode the file"
            ) from e
        if nxt is not None:
            raise BadVideoError(
                f"{self.source}: truncated: decoding stopped after {k + 1} of its {self.num_frames} frames; "
                "re-download or re-encode the file"
            )


# ------------------------------------------------------------------------------------- directories of frames


@dataclasses.dataclass(frozen=True)
class _FrameDir(Video):
    files: tuple[str, ...] = ()

    @classmethod
    def open(cls, path: str) -> _FrameDir:
        names = sorted(
            (f for f in os.listdir(path) if f.lower().endswith(FRAME_EXTENSIONS) and not f.startswith(".")),
            key=_natural_key,
        )
        if not names:
            raise BadVideoError(
                f"{path}: a directory with no frame images ({', '.join(FRAME_EXTENSIONS)}); "
                "put the frames there or pass a video file"
            )
        files = tuple(os.path.join(path, f) for f in names)
        try:
            with Image.open(files[0]) as first:  # the header only
                size = first.size
        except Exception as e:  # noqa: BLE001 - pillow raises many types for unreadable files
            raise BadVideoError(f"{path}: frame 0 ({files[0]}) is not a readable image ({e})") from e
        return cls(path, len(files), None, size, files=files)

    def _decode(self, indices):
        for i in indices:
            try:
                img = load_image(self.files[i])
            except BadImageError as e:
                raise BadVideoError(f"{self.source}: frame {i}: {e}") from e
            yield i, img


# ---------------------------------------------------------------------------------------- procedural movies


@dataclasses.dataclass(frozen=True)
class _Procedural(Video):
    seed: int = 0

    @classmethod
    def parse(cls, spec: str) -> _Procedural:
        usage = "expected procedural:seed=S,frames=N[,fps=R][,size=WxH], e.g. procedural:seed=0,frames=3000"
        fields = {}
        for part in filter(None, spec[len(PROCEDURAL) :].split(",")):
            key, eq, value = part.partition("=")
            if not eq or key in fields:
                raise BadVideoError(f"{spec}: bad or repeated field {part!r}; {usage}")
            fields[key.strip()] = value.strip()
        unknown = set(fields) - {"seed", "frames", "fps", "size"}
        if unknown or "frames" not in fields:
            raise BadVideoError(f"{spec}: unknown fields {sorted(unknown)} or no frames=N; {usage}")
        try:
            seed, n = int(fields.get("seed", 0)), int(fields["frames"])
            fps = float(fractions.Fraction(fields.get("fps", "1")))
            w, h = (int(x) for x in fields["size"].lower().split("x")) if "size" in fields else DEFAULT_SIZE
        except ValueError as e:
            raise BadVideoError(f"{spec}: {e}; {usage}") from e
        if n < 1 or not fps > 0 or min(w, h) < 2 or not math.isfinite(fps):
            raise BadVideoError(f"{spec}: need frames >= 1, fps > 0 and a size of at least 2x2; {usage}")
        return cls(spec, n, fps, (w, h), seed=seed)

    def _decode(self, indices):
        last, img = None, None
        for i in indices:
            if i != last:
                img, last = procedural_frame(self.seed, i, self.size), i
            yield i, img


# ----------------------------------------------------------------------------------------------- writing


def write_video(
    path: str | os.PathLike,
    frames: Iterable[Image.Image | np.ndarray],
    *,
    fps: float | fractions.Fraction,
    codec: str | None = None,
    pix_fmt: str | None = None,
    options: dict[str, str] | None = None,
) -> Path:
    """Encode RGB frames (PIL images or uint8[H, W, 3], all one size) into a video file, atomically (a hidden
    sibling renamed into place at the end). The container comes from the extension; codec, pixel format and
    options default per extension (:data:`WRITE_CODECS`). ``fps`` may be a Fraction (e.g. 30000/1001)."""
    path = Path(path)
    ext = path.suffix.lower()
    if codec is None:
        if ext not in WRITE_CODECS:
            raise ValueError(f"{path}: pick one of {sorted(WRITE_CODECS)} or pass a codec")
        codec, default_fmt, default_opts = WRITE_CODECS[ext]
        pix_fmt, options = pix_fmt or default_fmt, default_opts if options is None else options
    rate = fractions.Fraction(fps).limit_denominator(1_000_000)
    if rate <= 0:
        raise ValueError(f"{fps=} must be > 0")
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    count = 0
    try:
        with av.open(str(tmp), "w") as container:
            stream = container.add_stream(codec, rate=rate)
            for img in frames:
                a = np.asarray(img)
                if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                    raise ValueError(
                        f"frame {count}: expected RGB uint8[H, W, 3], got {a.dtype}{list(a.shape)}"
                    )
                if count == 0:
                    h, w = a.shape[:2]
                    if (pix_fmt or "").startswith(("yuv420", "yuv422")) and (w % 2 or h % 2):
                        raise ValueError(f"{path}: {w}x{h} frames need even sides for {codec} ({pix_fmt})")
                    stream.width, stream.height = w, h
                    stream.pix_fmt = pix_fmt or stream.pix_fmt
                    stream.options = dict(options or {})
                elif a.shape[:2] != (h, w):
                    raise ValueError(f"frame {count}: size {a.shape[1]}x{a.shape[0]} differs from {w}x{h}")
                for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                    container.mux(packet)
                count += 1
            if count == 0:
                raise ValueError(f"{path}: no frames to write")
            for packet in stream.encode():
                container.mux(packet)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

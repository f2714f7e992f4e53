"""``make-video``: the procedural haystack movie encoded into a real video file, so a file-based run is reproducible.

    python -m lct_jax.eval make-video --out movie.mp4 --frames 3000 --fps 1 --seed 0 [--size 640x360]

Frame k of the file is frame k of ``--video procedural:seed=S,frames=N,fps=R,size=WxH`` (up to compression:
mp4/mov/mkv get H.264 at CRF 18, webm VP9, avi MPEG-4 Part 2). ``--fps`` also takes fractions (``30000/1001``).
The file is written atomically: on any error nothing is left at ``--out``.
"""

from __future__ import annotations

import argparse
import fractions
import os
from pathlib import Path

from tqdm import tqdm

from lct_jax.data.procedural import DEFAULT_SIZE
from lct_jax.data.video import WRITE_CODECS, probe, write_video
from lct_jax.eval.cli import EvalError


def procedural_spec(seed: int, frames: int, fps, size: tuple[int, int]) -> str:
    """The video spec whose frames ``make-video`` writes."""
    return f"procedural:seed={seed},frames={frames},fps={fps},size={size[0]}x{size[1]}"


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WxH, e.g. 640x360") from None
    if w < 2 or h < 2 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(
            f"{text}: sides must be even and >= 2 (the codecs subsample colour 2x2)"
        )
    return w, h


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", required=True, help=f"video file; container from the extension: {sorted(WRITE_CODECS)}"
    )
    p.add_argument("--frames", type=int, required=True, help="number of frames")
    p.add_argument(
        "--fps",
        type=fractions.Fraction,
        default=fractions.Fraction(1),
        help="frame rate (1, 29.97, 30000/1001)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_size, default=DEFAULT_SIZE, help="WxH, default %(default)s")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args) -> int:
    out = Path(args.out)
    if out.suffix.lower() not in WRITE_CODECS:
        raise EvalError(f"--out {out}: the extension picks the container; use one of {sorted(WRITE_CODECS)}")
    if args.frames < 1 or args.fps <= 0:
        raise EvalError(f"--frames {args.frames} and --fps {args.fps} must be positive")
    if out.exists() and not args.overwrite:
        raise EvalError(f"--out {out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise EvalError(f"--out {out}: directory {out.parent} does not exist; create it first")
    spec = procedural_spec(args.seed, args.frames, args.fps, args.size)
    frames = (
        img for _, img in tqdm(probe(spec).frames(), total=args.frames, unit="frame", desc="make-video")
    )
    write_video(out, frames, fps=args.fps)
    print(f"wrote {out} ({os.path.getsize(out)} bytes): the frames of --video {spec}")
    return 0

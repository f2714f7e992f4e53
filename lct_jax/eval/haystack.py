"""``haystack``: a video's frames as V-NIAH visual tokens in an on-disk store, in batches, resumable.

    python -m lct_jax.eval haystack --ckpt STAGE2_CKPT --video movie.mp4 --fps 1 --max-frames 3000 --out DIR
    python -m lct_jax.eval haystack --ckpt STAGE2_CKPT --video procedural:seed=0,frames=3000 --out DIR

Frames: :func:`lct_jax.data.video.probe` → ``sample`` (``--fps R`` frames per second of video time, or
``--num-frames N`` spread uniformly, or every frame; then at most ``--max-frames``) → :func:`letterbox` (square,
CLIP mean colour) → :class:`FrameEncoder` (tower → projector → 2x2 pool) → :class:`EmbeddingStore` ``[N, P, D]``
in the model's compute dtype. Frames stream: host memory is one step of ``--batch-size`` frames (rounded up to
whole store chunks), whatever the length of the video.

Each step is written and recorded before the next is decoded; rerunning the same command after a kill resumes at
the first frame not durably written (it prints where) and ends with the same bytes as an uninterrupted run (the
same batches). A finished store is left alone; a store built from other inputs is an error naming the difference.

Store meta (what V-NIAH reads): ``checkpoint`` (absolute path), ``source`` (the ``--video`` spec as given),
``fps`` (float or null), ``num_frames`` (int or null), ``max_frames`` (int or null), ``frame_indices`` (source
frame of each row), ``tile``, ``tokens_per_frame``, ``letterbox`` (true).

Multi-host: every host runs the same command; process 0 decodes, encodes on its own devices and writes, the other
processes wait for it at a barrier. On a pod, put ``--out`` on storage every host reads (``gs://...``).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from lct_jax.convert.checkpoint import load_model, read_model_config
from lct_jax.data.video import BadVideoError, probe
from lct_jax.eval.cli import EvalError, add_distributed_arguments, start_distributed
from lct_jax.eval.encode import FrameEncoder, letterbox
from lct_jax.eval.store import EmbeddingStore
from lct_jax.sharding import make_mesh


def _host_cpu():
    """The host's CPU device, where the model is loaded (only its tower and projector go to the accelerator)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS excludes cpu: load on the default device
        return None


def build_haystack(
    ckpt: str,
    video: str,
    out: str,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    max_frames: int | None = None,
    batch_size: int = 32,
    chunk_frames: int = 16,
    progress: bool = True,
    log=print,
) -> EmbeddingStore:
    """Encode ``video``'s sampled frames with the LongVA checkpoint ``ckpt`` into the store at ``out`` (created,
    or resumed when it holds the same inputs); returns the complete store. Runs on this process's devices."""
    kind, cfg = read_model_config(ckpt)
    if kind != "longva":
        raise EvalError(
            f"--ckpt {ckpt} is a {kind!r} checkpoint; haystack needs a LongVA (stage-1/2) checkpoint, "
            "e.g. WORKDIR/checkpoints/<step> of an align_finetune run"
        )
    for name, value in (("batch-size", batch_size), ("chunk-frames", chunk_frames)):
        if value < 1:
            raise EvalError(f"--{name} {value} must be >= 1")
    devices = jax.local_devices()
    if batch_size % len(devices):
        raise EvalError(f"--batch-size {batch_size} must divide by this host's {len(devices)} devices")
    v = probe(video)
    try:
        idx = v.sample(num_frames=num_frames, fps=fps, max_frames=max_frames)
    except BadVideoError:
        raise
    except ValueError as e:  # a flag value sampling cannot use
        raise EvalError(f"--video {video}: {e}") from e
    n, s, p, d = len(idx), cfg.tile, cfg.tokens_per_tile, cfg.text.hidden_size
    meta = {
        "checkpoint": str(Path(ckpt).absolute()),
        "source": str(video),
        "fps": None if fps is None else float(fps),
        "num_frames": num_frames,
        "max_frames": max_frames,
        "frame_indices": idx.tolist(),
        "tile": s,
        "tokens_per_frame": p,
        "letterbox": True,
    }
    store = EmbeddingStore.create(
        out, shape=(n, p, d), dtype=cfg.text.dtype, chunk_frames=chunk_frames, meta=meta
    )
    start = store.frames_done
    if store.complete:
        log(f"{out} already holds all {n} frames; nothing to do")
        return store
    if start:
        log(f"resuming at frame {start} of {n} ({out} holds frames [0, {start}))")
    host = _host_cpu()
    with jax.default_device(host) if host is not None else contextlib.nullcontext():
        model = load_model(ckpt)
    mesh = make_mesh(len(devices), 1, 1, devices=devices) if len(devices) > 1 else None
    encoder = FrameEncoder(model, batch_size=batch_size, mesh=mesh)
    step = -(-batch_size // chunk_frames) * chunk_frames  # frames per write: whole chunks, at least one batch
    buf = np.empty([step, s, s, 3], np.uint8)
    bar = tqdm(total=n, initial=start, unit="frame", desc="haystack", disable=not progress)
    with contextlib.closing(v.frames(idx[start:])) as frames, bar:
        for pos in range(start, n, step):
            m = min(step, n - pos)
            for j in range(m):
                buf[j] = letterbox(next(frames)[1], s)
            store.write(pos, encoder(buf[:m]))
            bar.update(m)
    return store


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt", required=True, help="LongVA checkpoint: a stage-2 step dir or a converted model dir"
    )
    p.add_argument(
        "--video", required=True, help="video file, directory of frames, or procedural:seed=S,frames=N"
    )
    p.add_argument("--out", required=True, help="store directory (local or gs://); rerun to resume")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument(
        "--fps", type=float, help="frames per second of video time (V-NIAH: 1); default: every frame"
    )
    rate.add_argument("--num-frames", type=int, help="this many frames spread uniformly over the video")
    p.add_argument("--max-frames", type=int, help="keep at most the first this many sampled frames")
    p.add_argument(
        "--batch-size", type=int, default=32, help="frames per encoder call (divides by the devices)"
    )
    p.add_argument("--chunk-frames", type=int, default=16, help="frames per store chunk (fixed for a store)")
    add_distributed_arguments(p)


def run(args) -> int:
    for name in ("fps", "num_frames", "max_frames"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise EvalError(f"--{name.replace('_', '-')} {value} must be > 0")
    start_distributed(args)
    if jax.process_index() != 0:  # see the module docstring: process 0 does the work
        print(f"process {jax.process_index()}: process 0 builds {args.out}; waiting for it")
        multihost_utils.sync_global_devices("lct_jax.eval.haystack")
        return 0
    store = build_haystack(
        args.ckpt,
        args.video,
        args.out,
        fps=args.fps,
        num_frames=args.num_frames,
        max_frames=args.max_frames,
        batch_size=args.batch_size,
        chunk_frames=args.chunk_frames,
    )
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lct_jax.eval.haystack")
    n, p, d = store.shape
    print(f"{args.out}: {n} frames x {p} tokens x {d} ({store.meta['dtype']}) of {args.video}, complete")
    return 0

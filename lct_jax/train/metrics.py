"""Training and evaluation metrics: one console line format and one TensorBoard event writer.

Event files are written by tensorboardX (TensorFlow-free, maintained), read by ``tensorboard --logdir WORKDIR``:
scalars per step (training losses, evaluation scores) and images (evaluation heatmaps).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np


class EventWriter:
    """Scalars and images to ``logdir/events.out.tfevents.*``; every call is flushed to disk at once, so a killed
    run keeps what it logged.

    ``purge_step``: the first step this run logs. The new file opens with a ``SessionLog.START`` event at that step,
    on which TensorBoard drops every event of earlier files at this step or later: after a kill -9 and a resume
    from an older checkpoint, the replayed steps show once (as the resumed run logged them), not twice.
    """

    def __init__(self, logdir: str | os.PathLike, purge_step: int | None = None):
        # tensorboardX takes ~2 s to import (protobuf + its summary ops): only processes that write events pay it
        from tensorboardX import SummaryWriter  # noqa: PLC0415

        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        # the pid keeps two launches in the same second (a kill -9, then the resume) from sharing a file name
        self._w = SummaryWriter(
            str(self.logdir), flush_secs=1, filename_suffix=f".{os.getpid()}", purge_step=purge_step
        )

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, v in values.items():
            self._w.add_scalar(tag, float(v), int(step))
        self._w.flush()

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """``{tag: uint8[H, W, 3]}`` (e.g. a rendered heatmap PNG decoded to RGB)."""
        for tag, img in images.items():
            img = np.asarray(img)
            if img.ndim != 3 or img.shape[-1] not in (3, 4) or img.dtype != np.uint8:
                raise ValueError(f"image {tag!r} must be uint8[H, W, 3|4], got {img.dtype}{list(img.shape)}")
            self._w.add_image(tag, img, int(step), dataformats="HWC")
        self._w.flush()

    def close(self) -> None:
        self._w.close()


def format_metrics(step: int, values: Mapping[str, float]) -> str:
    """One console line: ``step 12 | loss 3.2100 | grad_norm 0.81 | ...``."""
    parts = [f"step {step}"]
    for k, v in values.items():
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)

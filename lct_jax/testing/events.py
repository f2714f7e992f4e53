"""Read TensorBoard event files with TensorBoard's own reader (an independent check that TensorBoard can read
what :class:`lct_jax.train.metrics.EventWriter` writes). Tests only: ``tensorboard`` is in the ``test`` extra."""

from __future__ import annotations

import os
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def event_files(logdir: str | os.PathLike) -> list[Path]:
    """The event files of ``logdir``, oldest first (by modification time)."""
    return sorted(Path(logdir).glob("events.out.tfevents.*"), key=os.path.getmtime)


def _load(path: str | os.PathLike) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})  # 0 = keep every event
    acc.Reload()
    return acc


def read_scalars(path: str | os.PathLike) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of one event file or of every file in a directory (later files win)."""
    acc = _load(path)
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def scalar_steps(path: str | os.PathLike, tag: str) -> list[int]:
    """Every step ``tag`` is shown at, in order, repeats included (what TensorBoard plots; :func:`read_scalars`
    keeps one value per step)."""
    return [e.step for e in _load(path).Scalars(tag)]


def read_images(path: str | os.PathLike) -> dict[str, dict[int, bytes]]:
    """``{tag: {step: encoded PNG bytes}}``."""
    acc = _load(path)
    return {tag: {e.step: e.encoded_image_string for e in acc.Images(tag)} for tag in acc.Tags()["images"]}

"""Bad records: one exception type with a short reason, turned into counted skips by the pipelines.

A pipeline stage raises :class:`BadRecord` for input it cannot use (missing image, empty document, ...). In the
default (lenient) mode the stage logs a warning naming the record and the reason, drops the record and counts it
under ``'skipped/<reason>'``; in strict mode the error propagates and stops the run. Counts travel with the data
(a ``_skips`` field on each row, see :mod:`lct_jax.data.loader`) so they survive worker processes and checkpoints.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("lct_jax.data")

# Fixed order: the per-row ``_skips`` vector indexes this tuple.
SKIP_REASONS = (
    "empty_document",
    "missing_image",
    "bad_image",
    "no_assistant_turn",
    "bad_conversation",
    "placeholder_mismatch",
    "too_long",
    "too_many_tiles",
    "bad_record",
    "bad_video",  # a video file or frame directory that cannot be read (not a video, no frames, truncated)
)


class BadRecord(ValueError):
    """Input that cannot be trained on; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip {reason=}; known: {SKIP_REASONS}")
        super().__init__(f"[{reason}] {message}")
        self.reason = reason


class Skipped:
    """Marker element standing for a dropped record inside a pipeline (consumed by the packers)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def skip_or_raise(err: BadRecord, where: str, strict: bool) -> Skipped:
    if strict:
        raise err
    log.warning("skipping %s: %s", where, err)
    return Skipped(err.reason)


def zero_skips() -> np.ndarray:
    return np.zeros([len(SKIP_REASONS)], np.int32)


def add_skip(counts: np.ndarray, reason: str) -> None:
    counts[SKIP_REASONS.index(reason)] += 1


def skips_to_dict(counts) -> dict[str, int]:
    return {f"skipped/{r}": int(c) for r, c in zip(SKIP_REASONS, np.asarray(counts).tolist(), strict=True)}


def next_record(parent, pending: np.ndarray):
    """``(record, parent_state_before_it)`` for the next record of ``parent`` that is not :class:`Skipped`
    (skips are counted into ``pending``), or ``None`` at the end. The packers keep that state so a restore can
    re-fetch a record that was read but not yet fully placed in a row."""
    while True:
        state = parent.get_state()
        try:
            x = next(parent)
        except StopIteration:
            return None
        if isinstance(x, Skipped):
            add_skip(pending, x.reason)
            continue
        return x, state

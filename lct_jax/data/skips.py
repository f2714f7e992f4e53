"""Bad records: counted skips that name their source, and a bound on how many a run may skip.

Every pipeline reads its records through one :class:`RecordReader`: source index -> prepared sample, or a
:class:`Skipped` marker when the preparation raises :class:`BadRecord` (missing image, empty document, a field of
the wrong type, a record over ``max_record_bytes``, ...). The marker carries the reason, the message, where the
record came from (``docs.jsonl:17``, ``train.array_record record 3``, ``tfds c4/en:train[5]``: the source record,
not the shuffled stream position) and a hint naming the config field that likely causes it.

The packers take records with :func:`next_record`, which hands every marker to a :class:`SkipGuard` at the moment
the record is *consumed* (grain's read-ahead may prepare records that are never used; they are neither logged nor
counted). The guard

- counts the skip under ``'skipped/<reason>'`` (the counts travel with the rows, see :mod:`lct_jax.data.loader`),
- logs the first ``log_first`` skips one by one, then one summary line every ``log_every_s`` seconds,
- raises the skip as an error in strict mode,
- stops the run with a :class:`lct_jax.errors.DataError` naming the likely cause when the data yields nothing
  usable: an epoch's worth of records skipped in a row (every record of this shard is bad), or more than
  ``max_fraction`` of the last ``window`` records skipped (a wrong ``--config.data.field``/``image_root``, a file
  that is not what it should be). Without it, a repeating loader skips forever and the run hangs.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import time

import numpy as np

from lct_jax.errors import ConfigError, DataError, UserError

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


class BadRecord(UserError, ValueError):
    """Input that cannot be trained on; ``reason`` is one of :data:`SKIP_REASONS`, ``hint`` the config field or
    file that likely causes it (e.g. ``"config.data.image_root='/data/coco'"``)."""

    def __init__(self, reason: str, message: str, hint: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip {reason=}; known: {SKIP_REASONS}")
        super().__init__(f"[{reason}] {message}" + (f" (check {hint})" if hint else ""))
        self.reason, self.detail, self.hint = reason, message, hint

    def __reduce__(self):  # pickles back from grain worker processes
        return BadRecord, (self.reason, self.detail, self.hint)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Marker element standing for a dropped record inside a pipeline (consumed by the packers)."""

    reason: str
    message: str
    where: str  # the source record: 'docs.jsonl:17', 'a.array_record record 3', ...
    hint: str = ""


def parse_json(rec: bytes | str, hint: str = "") -> object:
    """A JSON record, or :class:`BadRecord` for bytes that are not UTF-8 JSON (also: nesting too deep, integers
    with more digits than Python converts)."""
    try:
        return json.loads(rec)  # bytes: UTF-8 (or -16/-32) detected by json itself
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise BadRecord("bad_record", f"not JSON: {str(e)[:200]}", hint) from None


def record_size(rec) -> int:
    """Bytes a record holds: its length (bytes/str) or the summed lengths of a feature dict's text fields."""
    if isinstance(rec, bytes | str):
        return len(rec)
    if isinstance(rec, dict):
        return sum(len(v) if isinstance(v, bytes | str) else getattr(v, "nbytes", 0) for v in rec.values())
    return getattr(rec, "nbytes", 0)


class RecordReader:
    """The map step of every pipeline: source index -> ``prepare(record)``, or a :class:`Skipped` marker naming
    the source record when ``prepare`` raises :class:`BadRecord` (never raises for bad input).

    ``reasons`` are the skips this pipeline can produce (a different one is a bug); records over ``max_bytes``
    are skipped as ``too_long`` before ``prepare`` sees them. The source may define ``where(index) -> str``.
    """

    def __init__(self, source, prepare, reasons: tuple[str, ...], max_bytes: int):
        self.source, self.prepare, self.reasons, self.max_bytes = source, prepare, reasons, max_bytes

    def where(self, index: int) -> str:
        where = getattr(self.source, "where", None)
        return where(index) if where is not None else f"record {index}"

    def __call__(self, index: int):
        rec = self.source[index]
        try:
            size = record_size(rec)
            if size > self.max_bytes:
                raise BadRecord(
                    "too_long",
                    f"record of {size:,} bytes > max_record_bytes={self.max_bytes:,}",
                    "config.data.max_record_bytes (or split the document)",
                )
            return self.prepare(rec)
        except BadRecord as e:
            if e.reason not in self.reasons:
                raise ValueError(f"this pipeline only skips {self.reasons}, not {e.reason!r}") from e
            return Skipped(e.reason, e.detail, self.where(int(index)), e.hint)


@dataclasses.dataclass(frozen=True)
class SkipPolicy:
    """How a pipeline treats skips (see the module docstring); ``epoch_records`` is set by the loader."""

    strict: bool = False
    max_fraction: float = 0.5
    window: int = 1000
    epoch_records: int | None = None  # records per epoch of this shard
    log_first: int = 10
    log_every_s: float = 60.0

    def __post_init__(self):
        if not 0.0 < self.max_fraction <= 1.0 or self.window < 1:
            raise ConfigError(
                f"max_skip_fraction={self.max_fraction} must be in (0, 1] and skip_window={self.window} >= 1"
            )


class SkipGuard:
    """Counts, logs (rate-limited), raises (strict) and bounds the skips of one pipeline iterator."""

    def __init__(self, policy: SkipPolicy, clock=time.monotonic):
        self.policy, self._clock = policy, clock
        # the last `window` outcomes (a skip reason, None = used) and the skip reasons among them
        self._recent: collections.deque[str | None] = collections.deque()
        self._window = collections.Counter()
        self._in_row = collections.Counter()  # skip reasons since the last usable record
        self._latest: dict[str, Skipped] = {}
        self._logged = 0
        self._unlogged = collections.Counter()
        self._last_log = 0.0

    def used(self) -> None:
        self._push(None)
        self._in_row.clear()

    def skipped(self, s: Skipped) -> None:
        if self.policy.strict:
            raise BadRecord(s.reason, f"{s.where}: {s.message}", s.hint)
        self._push(s.reason)
        self._in_row[s.reason] += 1
        self._latest[s.reason] = s
        self._log(s)
        p = self.policy
        n_row = sum(self._in_row.values())
        if p.epoch_records and n_row >= p.epoch_records:
            raise DataError(
                self._explain(f"all {n_row} records of an epoch in a row were skipped", self._in_row)
            )
        n_window = sum(self._window.values())
        if len(self._recent) == p.window and n_window > p.max_fraction * p.window:
            raise DataError(
                self._explain(
                    f"{n_window} of the last {p.window} records were skipped (limit: max_skip_fraction="
                    f"{p.max_fraction} of skip_window={p.window}, config.data.max_skip_fraction/skip_window)",
                    self._window,
                )
            )

    def _push(self, reason: str | None) -> None:
        self._recent.append(reason)
        if reason is not None:
            self._window[reason] += 1
        if len(self._recent) > self.policy.window:
            old = self._recent.popleft()
            if old is not None:
                self._window[old] -= 1
                if not self._window[old]:
                    del self._window[old]

    def _explain(self, what: str, reasons: collections.Counter) -> str:
        top = reasons.most_common(1)[0][0]
        s = self._latest[top]
        hint = f"; likely cause: {s.hint}" if s.hint else ""
        counts = ", ".join(f"{r} {n}" for r, n in reasons.most_common())
        return f"no usable data: {what} ({counts}); e.g. {s.where}: {s.message}{hint}"

    def _log(self, s: Skipped) -> None:
        p = self.policy
        if self._logged < p.log_first:
            self._logged += 1
            log.warning("skipping %s [%s]: %s", s.where, s.reason, s.message)
            if self._logged == p.log_first:
                log.warning(
                    "further skipped records are summarized every %g s (each one is counted in skipped/<reason>)",
                    p.log_every_s,
                )
                self._last_log = self._clock()
            return
        self._unlogged[s.reason] += 1
        now = self._clock()
        if now - self._last_log >= p.log_every_s:
            counts = ", ".join(f"{r} {n}" for r, n in self._unlogged.most_common())
            log.warning(
                "skipped %d more records in the last %.0f s (%s); latest: %s [%s]: %s",
                sum(self._unlogged.values()), now - self._last_log, counts, s.where, s.reason, s.message,
            )  # fmt: skip
            self._unlogged.clear()
            self._last_log = now


def zero_skips() -> np.ndarray:
    return np.zeros([len(SKIP_REASONS)], np.int32)


def add_skip(counts: np.ndarray, reason: str) -> None:
    counts[SKIP_REASONS.index(reason)] += 1


def skips_to_dict(counts, reasons: tuple[str, ...] = SKIP_REASONS) -> dict[str, int]:
    """``{'skipped/<reason>': n}`` for the ``reasons`` a pipeline can produce."""
    c = np.asarray(counts).tolist()
    return {f"skipped/{r}": int(c[SKIP_REASONS.index(r)]) for r in reasons}


def next_record(parent, pending: np.ndarray, guard: SkipGuard):
    """``(record, parent_state_before_it)`` for the next record of ``parent`` that is not :class:`Skipped`, or
    ``None`` at the end. Skips are counted into ``pending`` and handed to ``guard`` as they are consumed. The
    packers keep the state so a restore can re-fetch a record that was read but not yet fully placed in a row."""
    while True:
        state = parent.get_state()
        try:
            x = next(parent)
        except StopIteration:
            return None
        if isinstance(x, Skipped):
            add_skip(pending, x.reason)
            guard.skipped(x)
            continue
        guard.used()
        return x, state

"""grain pipelines for the three stages: sharding, zigzag layout, batching, workers, skip counts, resume.

Pipeline (per process)::

    range(len(source)) --shuffle(seed)--> [shard_index::shard_count] --repeat--> map(source index -> sample |
        Skipped, see lct_jax.data.skips.RecordReader) --to_iter_dataset--> pack rows (+ per-row `_skips`; the
        SkipGuard logs, bounds and raises skips as they are consumed) --zigzag rows (seq > 1)--> batch(B)
        --mp_prefetch(num_workers)--> Finalize (sums `_skips` into counts(), drops the field)

The shuffle permutes source *indices*, so a skipped record is named by its place in the source
(``docs.jsonl:17``), not by its position in the shuffled stream.

- **Multi-host**: every process shuffles the whole record list with the same seed and keeps every
  ``shard_count``-th record from ``shard_index``, so shards are disjoint and cover the epoch. The default is
  ``jax.process_index()/process_count()``; when processes share rows (``'seq'`` across hosts) pass
  ``mesh_data_shard(mesh)``. :func:`global_batch` assembles the global ``jax.Array`` with
  ``jax.make_array_from_process_local_data`` (batch over ``'data'``, tokens over ``'seq'``).
- **Zigzag**: with ``seq_shards`` W > 1 every per-token field of every row is permuted with
  :func:`lct_jax.ops.zigzag.zigzag`; the row length is rounded up to a multiple of 2W first, and rounding padding
  has ``loss_mask`` 0 and ``segment_ids`` 0, so it is never trained on.
- **Resume**: the returned iterator is a grain ``DatasetIterator``; ``get_state()/set_state()`` restore it
  exactly, and ``grain.checkpoint.CheckpointSave/CheckpointRestore`` put it inside an Orbax ``CheckpointManager``
  composite next to the model (see :func:`checkpoint_args`). Restore with the same config (workers included).
- **Bad records** are dropped with a logged (rate-limited) warning naming the source record and counted;
  ``it.counts()`` gives ``{'skipped/<reason>': n, 'rows': ..., 'batches': ...}`` for the training metrics, with
  the reasons this stage can produce (``strict=True`` raises). When the data yields nothing usable (an epoch of
  skips in a row, or more than ``max_skip_fraction`` of the last ``skip_window`` records) the iterator raises
  :class:`lct_jax.errors.DataError` naming the likely cause instead of skipping forever.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import grain
import jax
import numpy as np
from grain import DatasetIterator, IterDataset

from lct_jax.data import multimodal, text
from lct_jax.data.options import PipelineOptions
from lct_jax.data.skips import SKIP_REASONS, RecordReader, SkipPolicy, skips_to_dict
from lct_jax.errors import DataError
from lct_jax.ops.zigzag import unzigzag, zigzag

log = logging.getLogger("lct_jax.data")

PER_TOKEN_FIELDS = ("inputs", "targets", "loss_mask", "positions", "segment_ids", "visual_index")


# ------------------------------------------------------------------------------------------- small helpers


def padded_length(seq_len: int, seq_shards: int) -> int:
    """Row length the zigzag layout needs: ``seq_len`` rounded up to a multiple of 2 * seq_shards."""
    if seq_shards < 1:
        raise ValueError(f"{seq_shards=} must be >= 1")
    if seq_shards == 1:
        return seq_len
    m = 2 * seq_shards
    out = -(-seq_len // m) * m
    if out != seq_len:
        log.info(
            "row length %d rounded up to %d for the zigzag layout over %d shards", seq_len, out, seq_shards
        )
    return out


def zigzag_row(row: dict[str, np.ndarray], seq_shards: int, inverse: bool = False) -> dict[str, np.ndarray]:
    """Apply (or undo) the zigzag permutation to every per-token field of one row ([L] arrays)."""
    if seq_shards == 1:
        return row
    f = unzigzag if inverse else zigzag
    return {k: (f(v, seq_shards, axis=-1) if k in PER_TOKEN_FIELDS else v) for k, v in row.items()}


def zigzag_batch(batch: dict[str, np.ndarray], seq_shards: int, inverse: bool = False):
    """The same on [B, L] batches (axis 1): ``zigzag_batch(zigzag_batch(b, W), W, inverse=True) == b``."""
    return zigzag_row(batch, seq_shards, inverse)


def process_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    i = jax.process_index() if shard_index is None else shard_index
    n = jax.process_count() if shard_count is None else shard_count
    if not 0 <= i < n:
        raise ValueError(f"{shard_index=} must be in [0, {shard_count=})")
    return i, n


def mark_absl_flags_parsed() -> None:
    """grain worker processes read absl flags; outside ``app.run`` they must be marked parsed (stack.md)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ---------------------------------------------------------------------------------------- final stage


class _FinalizeIterator(DatasetIterator):
    def __init__(self, parent: DatasetIterator, reasons: tuple[str, ...]):
        super().__init__(parent)
        self._reasons = reasons
        self._skips = np.zeros([len(SKIP_REASONS)], np.int64)
        self._rows = 0
        self._batches = 0

    def __next__(self):
        while True:
            # plain copies: worker batches arrive in shared memory blocks that are freed only with their arrays
            batch = {k: np.array(v) for k, v in next(self._parent).items()}
            self._skips += batch.pop("_skips").sum(0)  # [B, R] -> [R]
            rows = int(batch["segment_ids"].any(axis=1).sum())
            if rows:  # else only the empty row that carries the last skips of finite data
                break
        self._rows += rows
        self._batches += 1
        return batch

    def counts(self) -> dict[str, int]:
        """Cumulative ``skipped/<reason>`` counts (the reasons this pipeline can produce) plus ``rows`` and
        ``batches`` produced (restored on resume)."""
        return {**skips_to_dict(self._skips, self._reasons), "rows": self._rows, "batches": self._batches}

    def get_state(self):
        return {
            "parent": self._parent.get_state(),
            "skips": self._skips.tolist(),
            "rows": self._rows,
            "batches": self._batches,
        }

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._skips = np.asarray(state["skips"], np.int64)
        self._rows, self._batches = state["rows"], state["batches"]


class FinalizeIterDataset(IterDataset):
    def __init__(self, parent: IterDataset, reasons: tuple[str, ...] = SKIP_REASONS):
        super().__init__(parent)
        self._reasons = reasons

    def __iter__(self):
        return _FinalizeIterator(self._parent.__iter__(), self._reasons)

    def __str__(self):
        return "FinalizeIterDataset"


# -------------------------------------------------------------------------------------------- pipelines


def build_pipeline(source, prepare, pack_fn, opts: PipelineOptions, reasons: tuple[str, ...], read=(16, 500)):
    """source (random access) -> batches.

    ``prepare(record)`` maps one record to a sample or raises :class:`lct_jax.data.skips.BadRecord` with one of
    ``reasons``; ``pack_fn(samples, skip_policy)`` packs rows. Returns the :class:`FinalizeIterDataset`.
    """
    if opts.batch_size < 1:
        raise ValueError(f"batch_size={opts.batch_size} must be >= 1")
    if len(source) == 0:
        named = getattr(source, "paths", None) or getattr(source, "path", None) or "(given)"
        raise DataError(f"the data source {named} holds no records; check the data files")
    ds = grain.MapDataset.range(len(source))
    if opts.shuffle:
        ds = ds.shuffle(seed=opts.seed)
    i, n = process_shard(opts.shard_index, opts.shard_count)
    ds = ds[i::n]
    if len(ds) == 0:
        raise DataError(f"data shard {i} of {n} gets no records: the source holds {len(source)}, fewer than the "
                        "data shards")  # fmt: skip
    policy = SkipPolicy(strict=opts.strict, max_fraction=opts.max_skip_fraction, window=opts.skip_window,
                        epoch_records=len(ds))  # fmt: skip
    if opts.num_epochs != 1:
        ds = ds.repeat(opts.num_epochs)
    ds = ds.map(RecordReader(source, prepare, reasons, opts.max_record_bytes))
    threads = read[0] if opts.read_threads is None else opts.read_threads
    buffer = read[1] if opts.read_buffer is None else opts.read_buffer
    it = pack_fn(
        ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)), policy
    )
    if opts.seq_shards > 1:
        it = it.map(functools.partial(zigzag_row, seq_shards=opts.seq_shards))
    it = it.batch(opts.batch_size, drop_remainder=False)
    if opts.num_workers > 0:
        mark_absl_flags_parsed()
        mp = grain.MultiprocessingOptions(
            num_workers=opts.num_workers, per_worker_buffer_size=opts.worker_buffer_size
        )
        it = it.mp_prefetch(mp)
    return FinalizeIterDataset(it, reasons)


def text_dataset(cfg: text.TextDataConfig) -> IterDataset:
    """Stage-0 pipeline from a :class:`lct_jax.data.text.TextDataConfig`."""
    tok = text.make_tokenizer(cfg.tokenizer)
    seq_len = padded_length(cfg.seq_len, cfg.options.seq_shards)
    return build_pipeline(
        text.make_source(cfg),
        text.TokenizeDocument(tok, cfg.field, cfg.record_format),
        lambda it, skips: text.PackTextIterDataset(
            it, seq_len, tok.bos_id, tok.pad_id, cfg.per_document, cfg.drop_remainder, skips
        ),
        cfg.options,
        text.TEXT_SKIPS,
    )


def multimodal_dataset(cfg: multimodal.MultimodalDataConfig) -> IterDataset:
    """Stage-1/2 pipeline from a :class:`lct_jax.data.multimodal.MultimodalDataConfig`."""
    cfg = dataclasses.replace(cfg, max_len=padded_length(cfg.max_len, cfg.options.seq_shards))
    return build_pipeline(
        multimodal.make_source(cfg),
        multimodal.PrepareSample(cfg),
        lambda it, skips: multimodal.PackSamplesIterDataset(it, cfg, skips),
        cfg.options,
        multimodal.MULTIMODAL_SKIPS,
        read=(2, 4),
    )


# ------------------------------------------------------------------------------------ multi-host + resume


def batch_shardings(batch: dict[str, Any], mesh) -> dict[str, jax.sharding.NamedSharding]:
    """Batch over ``'data'``; per-token fields also over ``'seq'`` (their rows are already zigzagged)."""
    from lct_jax.sharding import logical_to_spec

    out = {}
    for k, v in batch.items():
        names = ("act_batch", "act_seq") if k in PER_TOKEN_FIELDS else ("act_batch",) + (None,) * (v.ndim - 1)
        out[k] = jax.sharding.NamedSharding(mesh, logical_to_spec(names))
    return out


def mesh_data_shard(mesh, process_index: int | None = None, process_of=None) -> tuple[int, int]:
    """``(shard_index, shard_count)`` for :class:`PipelineOptions`, read off the mesh.

    Rows are split over the ``'data'`` axis only; processes whose devices sit at the same ``'data'`` coordinates
    (e.g. when ``'seq'`` spans hosts for a 1M-token row) must build identical rows, so they get the same shard.
    ``process_of(device)`` defaults to ``device.process_index`` (tests pass a fake one to simulate hosts).
    """
    process_of = process_of or (lambda d: d.process_index)
    pi = jax.process_index() if process_index is None else process_index
    axis = mesh.axis_names.index("data")
    coords: dict[int, set[int]] = {}
    for idx, d in np.ndenumerate(mesh.devices):
        coords.setdefault(process_of(d), set()).add(idx[axis])
    groups = sorted({tuple(sorted(c)) for c in coords.values()})
    flat = [c for g in groups for c in g]
    if len(flat) != len(set(flat)):
        raise ValueError(
            f"processes hold overlapping but unequal sets of 'data' rows {groups}; arrange the mesh so that each "
            "process's devices cover whole 'data' groups (data over hosts, seq/model within or across whole groups)"
        )
    if pi not in coords:
        raise ValueError(f"process {pi} owns no device of the mesh; processes: {sorted(coords)}")
    return groups.index(tuple(sorted(coords[pi]))), len(groups)


def global_batch(batch: dict[str, np.ndarray], mesh, num_shards: int | None = None) -> dict[str, jax.Array]:
    """Process-local rows -> global ``jax.Array`` s with ``jax.make_array_from_process_local_data``.

    Every process passes whole rows ``[B_local, L]`` of its data shard; the global batch is
    ``B_local * num_shards`` rows (``num_shards`` defaults to :func:`mesh_data_shard`'s count) and each device
    takes its slice of rows (``'data'``) and of the token axis (``'seq'``, the rows being zigzagged already).
    """
    n = mesh_data_shard(mesh)[1] if num_shards is None else num_shards
    out = {}
    for k, sh in batch_shardings(batch, mesh).items():
        v = batch[k]
        out[k] = jax.make_array_from_process_local_data(sh, v, (v.shape[0] * n,) + v.shape[1:])
    return out


def checkpoint_args(iterator: DatasetIterator, restore: bool = False):
    """The Orbax ``args`` item for this iterator, to put in an ``ocp.args.Composite`` next to the model state:

    ``mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=checkpoint_args(it)))``
    and ``mngr.restore(step, args=ocp.args.Composite(..., data=checkpoint_args(it, restore=True)))``.
    Each process writes ``process_<i>-of-<n>.json`` holding its own iterator state.
    """
    import grain.checkpoint as gc

    return gc.CheckpointRestore(iterator) if restore else gc.CheckpointSave(iterator)

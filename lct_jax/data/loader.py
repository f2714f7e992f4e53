"""grain pipelines for the three stages: sharding, zigzag layout, batching, workers, skip counts, resume.

Pipeline (per process)::

    source --shuffle(seed)--> [shard_index::shard_count] --repeat--> map(record -> sample | Skipped)
        --to_iter_dataset--> pack rows (+ per-row `_skips`) --zigzag rows (seq > 1)--> batch(B)
        --mp_prefetch(num_workers)--> Finalize (sums `_skips` into counts(), drops the field)

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
- **Bad records** are dropped with a logged warning and counted; ``it.counts()`` gives
  ``{'skipped/<reason>': n, 'rows': ..., 'batches': ...}`` for the training metrics (``strict=True`` raises).
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

from lct_jax.data.skips import SKIP_REASONS, skips_to_dict
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
    def __init__(self, parent: DatasetIterator):
        super().__init__(parent)
        self._skips = np.zeros([len(SKIP_REASONS)], np.int64)
        self._rows = 0
        self._batches = 0

    def __next__(self):
        # plain copies: worker batches arrive in shared memory blocks that are freed only with their arrays
        batch = {k: np.array(v) for k, v in next(self._parent).items()}
        skips = batch.pop("_skips")  # [B, R]
        self._skips += skips.sum(0)
        self._rows += skips.shape[0]
        self._batches += 1
        return batch

    def counts(self) -> dict[str, int]:
        """Cumulative ``skipped/<reason>`` counts plus ``rows`` and ``batches`` produced (restored on resume)."""
        return {**skips_to_dict(self._skips), "rows": self._rows, "batches": self._batches}

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
    def __iter__(self):
        return _FinalizeIterator(self._parent.__iter__())

    def __str__(self):
        return "FinalizeIterDataset"


# -------------------------------------------------------------------------------------------- pipelines


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """What every stage shares. ``batch_size`` is per process (global batch = batch_size * shard_count)."""

    batch_size: int = 1
    seq_shards: int = 1  # size of the mesh 'seq' axis (zigzag when > 1)
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = None  # None = repeat forever
    num_workers: int = 0
    worker_buffer_size: int = 2
    # threads/buffer of grain's per-process record reader (None: 16/500 for text, 2/4 for images, whose decoded
    # samples are ~4 MB of uint8 tiles each at 12 tiles and ~16 MB at 49, so grain's default buffer of 500 would
    # hold 2-8 GB)
    read_threads: int | None = None
    read_buffer: int | None = None
    shard_index: int | None = None  # None = jax.process_index()
    shard_count: int | None = None  # None = jax.process_count()
    strict: bool = False


def build_pipeline(source, record_fn, pack_fn, opts: PipelineOptions, read=(16, 500)) -> IterDataset:
    """source (random access) -> batches; ``record_fn(index, record)`` maps records, ``pack_fn`` packs rows."""
    if opts.batch_size < 1:
        raise ValueError(f"batch_size={opts.batch_size} must be >= 1")
    ds = grain.MapDataset.source(source)
    if len(ds) == 0:
        raise ValueError("the data source is empty")
    if opts.shuffle:
        ds = ds.shuffle(seed=opts.seed)
    i, n = process_shard(opts.shard_index, opts.shard_count)
    ds = ds[i::n]
    if opts.num_epochs != 1:
        ds = ds.repeat(opts.num_epochs)
    ds = ds.map_with_index(record_fn)
    threads = read[0] if opts.read_threads is None else opts.read_threads
    buffer = read[1] if opts.read_buffer is None else opts.read_buffer
    it = pack_fn(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)))
    if opts.seq_shards > 1:
        it = it.map(functools.partial(zigzag_row, seq_shards=opts.seq_shards))
    it = it.batch(opts.batch_size, drop_remainder=False)
    if opts.num_workers > 0:
        mark_absl_flags_parsed()
        mp = grain.MultiprocessingOptions(
            num_workers=opts.num_workers, per_worker_buffer_size=opts.worker_buffer_size
        )
        it = it.mp_prefetch(mp)
    return FinalizeIterDataset(it)


def text_dataset(cfg) -> IterDataset:
    """Stage-0 pipeline from a :class:`lct_jax.data.text.TextDataConfig`."""
    from lct_jax.data import text

    tok = text.make_tokenizer(cfg.tokenizer)
    seq_len = padded_length(cfg.seq_len, cfg.options.seq_shards)
    return build_pipeline(
        text.make_source(cfg),
        text.TokenizeDocument(tok, cfg.field, cfg.record_format, cfg.options.strict),
        lambda it: text.PackTextIterDataset(
            it, seq_len, tok.bos_id, tok.pad_id, cfg.per_document, cfg.drop_remainder
        ),
        cfg.options,
    )


def multimodal_dataset(cfg) -> IterDataset:
    """Stage-1/2 pipeline from a :class:`lct_jax.data.multimodal.MultimodalDataConfig`."""
    from lct_jax.data import multimodal

    cfg = dataclasses.replace(cfg, max_len=padded_length(cfg.max_len, cfg.options.seq_shards))
    return build_pipeline(
        multimodal.make_source(cfg),
        multimodal.PrepareSample(cfg),
        lambda it: multimodal.PackSamplesIterDataset(it, cfg),
        cfg.options,
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

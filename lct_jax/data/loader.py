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
  composite next to the model (see :func:`checkpoint_args`; one ``process_<i>-of-<n>.json`` per process). Every
  state carries its :class:`StreamLayout` (records, shard index/count, workers, seed), so a restore can tell
  whether it is exact (see *Data stream* below for other process counts and shardings).
- **Bad records** are dropped with a logged (rate-limited) warning naming the source record and counted;
  ``it.counts()`` gives ``{'skipped/<reason>': n, 'rows': ..., 'batches': ...}`` for the training metrics, with
  the reasons this stage can produce (``strict=True`` raises). When the data yields nothing usable (an epoch of
  skips in a row, or more than ``max_skip_fraction`` of the last ``skip_window`` records) the iterator raises
  :class:`lct_jax.errors.DataError` naming the likely cause instead of skipping forever.

Data stream: what a seed fixes, and what a change of sharding does
------------------------------------------------------------------
The *global stream* is fixed by the data and the seed alone: epoch after epoch of the shuffled record order (grain
reshuffles every epoch), position ``g = epoch * records + k``. Shard ``i`` of ``n`` reads positions ``i, i+n, ...``
of each epoch (with ``W > 1`` workers, worker ``w`` reads every W-th of those from the w-th), and **each reader packs
its own records into rows**. So:

- invariant for a given seed: the order of records in every epoch, that every epoch holds each record exactly once
  across the shards, and that shards never share a record;
- *not* invariant: the batch sequence. With another number of data shards (or workers) the rows hold other
  groupings of records and global batch k (shard 0's k-th batch, then shard 1's, ...) differs, even from step 1.
  Worked example, records in epoch order ``r0 r1 r2 r3 ...``: 2 shards pack ``r0 r2 r4 ...`` and ``r1 r3 r5 ...``
  separately; 1 shard packs ``r0 r1 r2 r3 ...``. Processes that share a shard (``'seq'`` across hosts) read
  identical rows, so adding hosts along ``'seq'`` or ``'model'`` changes nothing.

Restoring a checkpoint (``lct_jax.train.checkpoint``):

- same layout: exact, batch for batch;
- another process count, same data sharding (e.g. fewer hosts along ``'seq'``): exact, from a state saved by a
  process that had this shard (:func:`restore_saved_state`);
- another shard count or worker count: packed rows cannot be split or merged across shards (grain's own
  ``ElasticIterator`` needs a fixed number of records per batch, i.e. no packing), so :func:`elastic_state`
  restarts every new reader at the *earliest* global position an old reader had not finished (the minimum over
  old readers of the record each was packing). Nothing is skipped; what old readers
  had read beyond that point (shards drift apart by a few records, as records differ in length), plus the partly
  packed record of each old reader, is read again, and a warning says how many records (and what fraction of an
  epoch) that is. Example: 2 shards stopped with their next unfinished records at positions 6 (shard 0) and 9
  (shard 1); 1 shard resumes at 6 and reads 6, 7, 8, 9, ...; position 7 was already read in full by shard 1, so
  1 record is read twice. Skip/row/batch counters of all old shards are summed into new shard 0.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import Any

import grain
import jax
import numpy as np
from etils import epath
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
    def __init__(self, parent: DatasetIterator, layout: dict[str, Any], reasons: tuple[str, ...]):
        super().__init__(parent)
        self.layout = layout
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
            "layout": self.layout,
        }

    def set_state(self, state):
        if state.get("layout", self.layout) != self.layout:
            raise ValueError(
                f"iterator state saved with layout {state['layout']}, this pipeline has {self.layout}; "
                "map it with elastic_state()"
            )
        self._parent.set_state(state["parent"])
        self._skips = np.asarray(state["skips"], np.int64)
        self._rows, self._batches = state["rows"], state["batches"]


class FinalizeIterDataset(IterDataset):
    def __init__(self, parent: IterDataset, layout: dict[str, Any], reasons: tuple[str, ...] = SKIP_REASONS):
        super().__init__(parent)
        self.layout = layout  # StreamLayout as a dict: travels in every saved state
        self._reasons = reasons

    def __iter__(self):
        return _FinalizeIterator(self._parent.__iter__(), self.layout, self._reasons)

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
    records = len(source)
    ds = grain.MapDataset.range(records)
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
    layout = StreamLayout(
        records, i, n, opts.num_workers, opts.seed if opts.shuffle else None, opts.num_epochs
    )
    return FinalizeIterDataset(it, dataclasses.asdict(layout), reasons)


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


# ------------------------------------------------------------------------------------------- elastic resume


@dataclasses.dataclass(frozen=True)
class StreamLayout:
    """Where a pipeline's records come from in the global record stream; saved inside every iterator state.

    The global stream is epoch after epoch of the shuffled source (grain reshuffles each epoch): position
    ``g = epoch * records + k`` is the k-th record of that epoch's order. Shard ``i`` of ``n`` reads positions
    ``i, i + n, ...`` of every epoch; with ``W > 1`` workers, worker ``w`` reads every W-th record of its shard from
    the w-th on (grain's worker slicing), each worker packing its own rows.
    """

    records: int  # source records (one epoch)
    shard_index: int
    shard_count: int
    workers: int  # grain worker processes (0 = none)
    seed: int | None  # shuffle seed (None: no shuffle)
    num_epochs: int | None

    @property
    def streams(self) -> int:
        return max(self.workers, 1)

    def global_position(self, worker: int, q: int) -> int:
        """Global stream position of the q-th record that ``worker`` reads."""
        p = worker + q * self.streams  # index in the shard
        epoch, k = divmod(p, len(range(self.shard_index, self.records, self.shard_count)))
        return epoch * self.records + self.shard_index + k * self.shard_count

    def first_at_or_after(self, worker: int, position: int) -> int:
        """The smallest q whose global position is >= ``position`` (positions grow with q)."""
        lo, hi = 0, position + 1  # global_position(w, q) >= q
        while lo < hi:
            mid = (lo + hi) // 2
            if self.global_position(worker, mid) >= position:
                hi = mid
            else:
                lo = mid + 1
        return lo


def _find_next_index(state: Any, path=()) -> list[tuple]:
    """Paths of every ``{"next_index": k}`` in a packer state (grain's record reader; exactly one per packer)."""
    if isinstance(state, dict):
        if "next_index" in state:
            return [path]
        return [p for k, v in state.items() for p in _find_next_index(v, (*path, k))]
    return []


def _reader_states(state: dict) -> list[dict]:
    """The per-worker packer states of a saved iterator state, in worker order (one when there are no workers)."""
    parent = state["parent"]
    if "iterators_in_use_states" in parent:  # mp_prefetch: each worker runs its own reader and packer
        by_worker = dict(
            zip(parent["iterators_in_use_indices"], parent["iterators_in_use_states"], strict=True)
        )
        return [by_worker[w] for w in sorted(by_worker)]
    return [parent]


def _next_index(reader_state: dict) -> int:
    paths = _find_next_index(reader_state)
    if len(paths) != 1:
        raise ValueError(
            f"expected one record cursor in the packer state, found {len(paths)}: {reader_state}"
        )
    node = reader_state
    for k in paths[0]:
        node = node[k]
    return int(node["next_index"])


def _set_next_index(reader_state: dict, q: int) -> None:
    (path,) = _find_next_index(reader_state)
    node = reader_state
    for k in path:
        node = node[k]
    node["next_index"] = int(q)


@dataclasses.dataclass(frozen=True)
class ElasticResume:
    """What :func:`elastic_state` did; ``message`` is the warning the run prints."""

    resume_at: int  # global stream position every new shard restarts from
    read_again: int  # records some old shard had read in full that a new shard reads again
    message: str


def elastic_state(saved: list[dict], fresh: dict) -> tuple[dict, ElasticResume]:
    """Map iterator states saved under one sharding (``saved``: one per process, e.g. grain's
    ``process_<i>-of-<n>.json``) onto a pipeline with another (``fresh``: its ``get_state()`` before any batch).

    Packed rows cannot be split or merged across shards (each shard packs its own records), so an exact
    continuation does not exist. The data stream restarts, for every new shard, at the earliest global stream
    position that some old shard had not finished (see :class:`StreamLayout`): nothing is dropped; the records old
    shards had read beyond that point (a few per shard: shards drift apart by record lengths) and the partly packed
    record of each old reader are read again, and the warning says how many. Skip/row/batch counts of all old shards
    are summed into new shard 0 (the others restart at 0).
    """
    new = StreamLayout(**fresh["layout"])
    olds: dict[int, tuple[StreamLayout, dict]] = {}
    for st in saved:
        if "layout" not in st:
            raise ValueError(
                "the checkpoint's data state has no layout (written before elastic resume existed); resume it "
                "with the process count and mesh it was written with"
            )
        lay = StreamLayout(**st["layout"])
        if (lay.records, lay.seed, lay.num_epochs) != (new.records, new.seed, new.num_epochs):
            raise ValueError(
                f"the data changed since the checkpoint (records, seed, epochs were {lay.records}, {lay.seed}, "
                f"{lay.num_epochs}; now {new.records}, {new.seed}, {new.num_epochs}): restore needs the same data"
            )
        olds.setdefault(lay.shard_index, (lay, st))  # processes that share a shard saved the same state
    counts = {lay.shard_count for lay, _ in olds.values()}
    if len(counts) != 1 or set(olds) != set(range(next(iter(counts)))):
        raise ValueError(
            f"the checkpoint holds states of shards {sorted(olds)} of {sorted(counts)}: incomplete"
        )
    cursors = [
        (lay, w, _next_index(r)) for lay, st in olds.values() for w, r in enumerate(_reader_states(st))
    ]
    resume_at = min(lay.global_position(w, q) for lay, w, q in cursors)
    again = sum(q - lay.first_at_or_after(w, resume_at) for lay, w, q in cursors)
    state = json.loads(json.dumps(fresh))  # a deep copy
    for w, reader in enumerate(_reader_states(state)):
        _set_next_index(reader, new.first_at_or_after(w, resume_at))
    if new.shard_index == 0:
        state["skips"] = np.sum([st["skips"] for _, st in olds.values()], 0).tolist()
        state["rows"] = sum(st["rows"] for _, st in olds.values())
        state["batches"] = sum(st["batches"] for _, st in olds.values())
    old = next(iter(olds.values()))[0]
    epoch, k = divmod(resume_at, new.records)
    message = (
        f"elastic resume: data shards x workers {old.shard_count}x{old.workers} -> {new.shard_count}x{new.workers}; "
        f"packed rows cannot move between shards, so the data stream restarts at record {k} of epoch {epoch} of "
        f"the shuffled order (the earliest one an old shard had not finished): nothing is skipped, {again} records "
        f"({100 * again / new.records:.2g}% of an epoch) already read by an old shard, plus the partly packed record "
        f"of each of the {len(cursors)} old readers, are read again, and the batches differ from those of an "
        f"uninterrupted {old.shard_count}-shard run"
    )
    return state, ElasticResume(resume_at, again, message)


def _saved_states(data_dir) -> dict[str, dict]:
    files = sorted(epath.Path(data_dir).glob("process_*-of-*.json"))
    return {f.name: json.loads(f.read_text()) for f in files}


def saved_state_matches(iterator: DatasetIterator, data_dir) -> bool:
    """Whether this process's file in a checkpoint's data item (grain: ``process_<i>-of-<n>.json``) exists and
    was written by a pipeline with this iterator's layout, i.e. restores exactly through grain's handler."""
    f = epath.Path(data_dir) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not f.exists():
        return False
    layout = json.loads(f.read_text()).get("layout")
    return layout is None or layout == iterator.get_state()["layout"]  # no layout: written before it existed


def restore_saved_state(iterator: DatasetIterator, data_dir) -> ElasticResume | None:
    """Set ``iterator`` (fresh) from the states every process saved in ``data_dir``: exactly from a state with this
    iterator's layout if there is one (the process count changed, the data sharding did not, e.g. fewer hosts
    along 'seq'), else with :func:`elastic_state`, with a warning (returned)."""
    saved = _saved_states(data_dir)
    if not saved:
        raise FileNotFoundError(f"no iterator state (process_*-of-*.json) in {data_dir}")
    layout = iterator.get_state()["layout"]
    same = [name for name, st in saved.items() if st.get("layout") == layout]
    if same:
        iterator.set_state(saved[same[0]])
        log.info("data iterator restored exactly from %s (same data sharding)", same[0])
        return None
    state, report = elastic_state(list(saved.values()), iterator.get_state())
    iterator.set_state(state)
    log.warning("%s", report.message)
    return report

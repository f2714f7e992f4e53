"""The options every data pipeline shares (:class:`PipelineOptions`), apart from the loader so that the stage
modules (:mod:`lct_jax.data.text`, :mod:`lct_jax.data.multimodal`) can hold them without importing the loader."""

from __future__ import annotations

import dataclasses


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
    strict: bool = False  # raise on the first bad record instead of skipping it
    # bounded failure (lct_jax.data.skips.SkipGuard): stop with an error naming the likely cause when more than
    # this fraction of the last `skip_window` records was skipped (an epoch of skips in a row always stops)
    max_skip_fraction: float = 0.5
    skip_window: int = 1000
    # records (a JSON line, a document, an annotation) larger than this are skipped as too_long before they are
    # parsed, so one huge document cannot take the host's memory (a 50 MB text becomes ~200 MB of int32 tokens)
    max_record_bytes: int = 64 << 20

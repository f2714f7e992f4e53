"""The on-disk visual-token store: chunked writes in order, resume after a stop, slice reads, clear errors."""

import ml_dtypes
import numpy as np
import pytest

from lct_jax.eval.store import EmbeddingStore, StoreError

META = {"checkpoint": "ck/12", "video": "movie.mp4", "fps": 1.0}


def _frames(start, n, p=3, d=4):
    return (
        np.arange(start, start + n, dtype=np.float32)[:, None, None] + np.zeros([n, p, d], np.float32)
    ) / 8


def test_write_resume_and_read_slices(tmp_path):
    path = tmp_path / "hay"
    s = EmbeddingStore.create(path, shape=(7, 3, 4), dtype="bfloat16", chunk_frames=2, meta=META)
    s.write(0, _frames(0, 2))
    s.write(2, _frames(2, 2))
    with pytest.raises(StoreError, match="incomplete \\(4 of 7"):
        EmbeddingStore.open(path)
    # a new writer (e.g. after a kill) picks up where the last durable chunk ended
    s = EmbeddingStore.create(path, shape=(7, 3, 4), dtype="bfloat16", chunk_frames=2, meta=META)
    assert s.frames_done == 4 and not s.complete
    with pytest.raises(StoreError, match="expected 4"):
        s.write(2, _frames(2, 2))
    s.write(4, _frames(4, 2))
    s.write(6, _frames(6, 1))  # the short last chunk
    r = EmbeddingStore.open(path)
    assert r.complete and r.shape == (7, 3, 4) and r.meta["fps"] == 1.0
    got = r.read(3, 6)
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), _frames(3, 3))  # k/8 is exact in bf16
    np.testing.assert_array_equal(r.read().astype(np.float32), _frames(0, 7))


def test_mismatched_store_and_bad_paths_are_named(tmp_path):
    path = tmp_path / "hay"
    EmbeddingStore.create(path, shape=(4, 3, 4), dtype="float32", chunk_frames=2, meta=META)
    with pytest.raises(StoreError, match=r"fps: 1.0 there vs 2.0 now"):
        EmbeddingStore.create(
            path, shape=(4, 3, 4), dtype="float32", chunk_frames=2, meta={**META, "fps": 2.0}
        )
    with pytest.raises(StoreError, match="not an embedding store"):
        EmbeddingStore.open(tmp_path / "nothing_here")
    s = EmbeddingStore.create(path, shape=(4, 3, 4), dtype="float32", chunk_frames=2, meta=META)
    with pytest.raises(StoreError, match="whole number"):
        s.write(0, _frames(0, 1))
    with pytest.raises(StoreError, match="outside"):
        s.read(0, 1)

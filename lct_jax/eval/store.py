"""Visual-token arrays on disk: a haystack's frames (or needles) as ``[N, P, D]``, written front to back, resumable.

Axis alphabet: N frames, P visual tokens per frame (144 at full size), D model dim.

A store is a directory (a local path or a URL tensorstore understands, e.g. ``gs://bucket/haystacks/movie``)::

    DIR/meta.json        {"format": "lct_jax.embeddings/1", "shape": [N, P, D], "dtype": ..., "chunk_frames": c,
                          ...what the writer records: checkpoint, video, fps, frame indices...}
    DIR/progress.json    {"frames_done": k}: frames [0, k) are written and durable
    DIR/embeddings/      zarr v3 array [N, P, D], chunks of [c, P, D] frames

Frames are written in order, in whole chunks (the last one may be short), and ``progress.json`` is rewritten after
each chunk lands, so a killed writer resumes at ``frames_done`` and never trusts a half-written chunk. Readers
take any slice ``[start, stop)`` without loading the rest (hosts of a pod read only the frames they need).
Everything goes through tensorstore (which Orbax already brings), so local disks and GCS behave the same.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorstore as ts

from lct_jax.errors import UserError

FORMAT = "lct_jax.embeddings/1"
META, PROGRESS, ARRAY = "meta.json", "progress.json", "embeddings"


class StoreError(UserError, ValueError):
    """A store that does not exist, is incomplete, or does not match what the caller asked for."""


def _url(path: str | os.PathLike) -> str:
    """A tensorstore kvstore URL ending in '/': ``gs://...`` and ``file://...`` pass through, paths become file://."""
    s = os.fspath(path)
    if "://" not in s:
        s = "file://" + os.path.abspath(s)
    return s.rstrip("/") + "/"


def _kv(path) -> ts.KvStore:
    return ts.KvStore.open(_url(path)).result()


def _read_json(kv: ts.KvStore, key: str) -> dict | None:
    got = kv.read(key).result()
    if got.state == "missing":
        return None
    try:
        return json.loads(bytes(got.value))
    except json.JSONDecodeError as e:
        raise StoreError(f"{kv.url}{key} is not valid JSON ({e}); delete the store and rebuild it") from e


def _short(value, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters (a 3000-frame index list must not fill the screen)."""
    r = repr(value)
    if len(r) <= limit:
        return r
    return r[: limit - 5] + " ...]" if r.startswith("[") else r[: limit - 4] + " ..."


def _write_json(kv: ts.KvStore, key: str, value: Mapping) -> None:
    kv.write(key, (json.dumps(value, indent=1) + "\n").encode()).result()  # one atomic object write


class EmbeddingStore:
    """Open with :meth:`create` (new or resumed writer) or :meth:`open` (reader)."""

    def __init__(self, path, meta: dict, frames_done: int, array: ts.TensorStore):
        self.path = os.fspath(path)
        self.meta = meta
        self.frames_done = frames_done
        self._array = array
        self._kv = _kv(path)

    # ------------------------------------------------------------------------------------------- open / create
    @classmethod
    def create(
        cls,
        path,
        *,
        shape: tuple[int, int, int],
        dtype: str,
        chunk_frames: int,
        meta: Mapping[str, Any],
    ) -> EmbeddingStore:
        """A new store, or the partial one already at ``path`` when its shape, dtype and ``meta`` are the same
        (resume). Anything else there is an error naming the difference."""
        n, p, d = (int(x) for x in shape)
        if min(n, p, d) < 1 or chunk_frames < 1:
            raise StoreError(f"store shape {shape} and {chunk_frames=} must be positive")
        want = {
            "format": FORMAT,
            "shape": [n, p, d],
            "dtype": str(np.dtype(dtype)),
            "chunk_frames": int(chunk_frames),
            **json.loads(json.dumps(dict(meta))),  # plain JSON types, so the comparison below is exact
        }
        kv = _kv(path)
        have = _read_json(kv, META)
        if have is not None:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            if diff:
                shown = ", ".join(
                    f"{k}: {_short(have.get(k))} there vs {_short(want.get(k))} now" for k in diff
                )
                raise StoreError(
                    f"{path} already holds a different embedding store ({shown}); "
                    "pass another output directory or delete that one"
                )
            progress = _read_json(kv, PROGRESS) or {"frames_done": 0}
            array = ts.open({"driver": "zarr3", "kvstore": _url(path) + ARRAY + "/", "open": True}).result()
            return cls(path, have, int(progress["frames_done"]), array)
        spec = {
            "driver": "zarr3",
            "kvstore": _url(path) + ARRAY + "/",
            "metadata": {
                "shape": [n, p, d],
                "data_type": want["dtype"],
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunk_frames, p, d]}},
            },
            "create": True,
            "delete_existing": True,
        }
        array = ts.open(spec).result()
        _write_json(kv, PROGRESS, {"frames_done": 0})
        _write_json(kv, META, want)  # last: a directory with meta.json is a store
        return cls(path, want, 0, array)

    @classmethod
    def open(cls, path, *, allow_partial: bool = False) -> EmbeddingStore:
        kv = _kv(path)
        meta = _read_json(kv, META)
        if meta is None or meta.get("format") != FORMAT:
            raise StoreError(
                f"{path} is not an embedding store (no {META} with format {FORMAT!r}); "
                "build one with `python -m lct_jax.eval haystack ... --out DIR`"
            )
        done = int((_read_json(kv, PROGRESS) or {"frames_done": 0})["frames_done"])
        if done < meta["shape"][0] and not allow_partial:
            raise StoreError(
                f"{path} is incomplete ({done} of {meta['shape'][0]} frames written); "
                "rerun the command that builds it to finish"
            )
        array = ts.open({"driver": "zarr3", "kvstore": _url(path) + ARRAY + "/", "open": True}).result()
        return cls(path, meta, done, array)

    # ------------------------------------------------------------------------------------------------ access
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["shape"])

    @property
    def complete(self) -> bool:
        return self.frames_done == self.shape[0]

    def write(self, start: int, frames: np.ndarray) -> None:
        """Write ``frames`` [n, P, D] at ``start`` (= :attr:`frames_done`, a chunk boundary), then record progress."""
        c = self.meta["chunk_frames"]
        n = len(frames)
        if start != self.frames_done or start % c:
            raise StoreError(
                f"write at frame {start}: expected {self.frames_done} (frames are written in order)"
            )
        if tuple(frames.shape[1:]) != self.shape[1:] or start + n > self.shape[0]:
            raise StoreError(f"frames {tuple(frames.shape)} at {start} do not fit the store's {self.shape}")
        if n % c and start + n != self.shape[0]:
            raise StoreError(f"write of {n} frames is not a whole number of {c}-frame chunks")
        self._array[start : start + n].write(np.asarray(frames, self._array.dtype.numpy_dtype)).result()
        self.frames_done = start + n
        _write_json(self._kv, PROGRESS, {"frames_done": self.frames_done})

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``[start, stop)`` as numpy ``[n, P, D]`` (only those chunks are read)."""
        stop = self.frames_done if stop is None else stop
        if not 0 <= start <= stop <= self.frames_done:
            raise StoreError(
                f"read [{start}, {stop}) outside the {self.frames_done} frames written in {self.path}"
            )
        return self._array[start:stop].read().result()

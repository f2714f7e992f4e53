"""Reading and writing Hugging Face safetensors directories with numpy only (no torch).

Every tensor read for an import is checked (:meth:`SafetensorsDir.__getitem__`): it must hold floating values
lct_jax's fp32 params store exactly (float16, bfloat16, float32; any other dtype is cast only with
``allow_cast=True``, the CLI's ``--allow-cast``) and no NaN or Inf. The error names the tensor and its file, so a
damaged checkpoint stops the import instead of showing up as non-finite losses many steps later.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from lct_jax.convert.mapping import ConversionError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
EXACT_DTYPES = ("float16", "bfloat16", "float32")  # held exactly by fp32 params
# safetensors dtype codes -> numpy names, widest float last (the source dtype of a mixed checkpoint is the widest)
_FLOAT_CODES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


class SafetensorsDir:
    """Lazy view of the tensors of an HF directory (single file or sharded with an index); every tensor read is
    checked (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, allow_cast: bool = False):
        self.dir = Path(directory)
        self.allow_cast = allow_cast
        if not self.dir.is_dir():
            raise ConversionError(f"Hugging Face directory {str(self.dir)!r} does not exist")
        index = self.dir / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: not a valid safetensors index ({e})") from e
        elif (self.dir / SINGLE_NAME).exists():
            weight_map = None
        else:
            raise ConversionError(f"{self.dir}: no {SINGLE_NAME} or {INDEX_NAME} found")
        self._files: dict[str, Path] = {}
        if weight_map is None:
            for key in self._open(self.dir / SINGLE_NAME).keys():
                self._files[key] = self.dir / SINGLE_NAME
        else:
            for key, fname in weight_map.items():
                path = self.dir / fname
                if not path.exists():
                    raise ConversionError(f"{index} names shard {fname!r} for {key!r}, but {path} is missing")
                self._files[key] = path
        self._handles: dict[Path, object] = {}

    def _open(self, path: Path):
        try:
            return safe_open(str(path), framework="numpy")
        except Exception as e:  # noqa: BLE001 - the safetensors error types are not public
            raise ConversionError(f"{path}: cannot read safetensors file ({e})") from e

    def keys(self) -> list[str]:
        return list(self._files)

    def _handle(self, key: str):
        path = self._files[key]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        return path, self._handles[path]

    def __getitem__(self, key: str) -> np.ndarray:
        path, handle = self._handle(key)
        try:
            arr = handle.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{path}: cannot read tensor {key!r} ({e})") from e
        if arr.dtype.name not in EXACT_DTYPES and not self.allow_cast:
            raise ConversionError(
                f"tensor {key!r} in {path.name} is {arr.dtype.name}, not a floating type fp32 params hold exactly "
                f"({', '.join(EXACT_DTYPES)}); pass --allow-cast to convert it to float32 anyway"
            )
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr))) if arr.dtype.kind != "b" else 0
        if bad:
            raise ConversionError(
                f"tensor {key!r} in {path.name} holds {bad} NaN/Inf of {arr.size} values; the checkpoint is damaged"
            )
        return arr

    def source_dtype(self) -> str | None:
        """The floating dtype the checkpoint's tensors are stored in (the widest, if they are mixed), read from the
        file headers only; ``None`` when none is floating."""
        found = set()
        for key in self._files:
            code = self._handle(key)[1].get_slice(key).get_dtype()
            if code in _FLOAT_CODES:
                found.add(code)
        return next((_FLOAT_CODES[c] for c in reversed(_FLOAT_CODES) if c in found), None)


def write_sharded(tensors: Mapping[str, np.ndarray], out_dir: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        arr = tensors[key]
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = arr
        size += arr.nbytes
    n = len(shards)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(dict(shard), str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = int(sum(a.nbytes for a in tensors.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

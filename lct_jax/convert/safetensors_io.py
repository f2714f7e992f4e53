"""Reading and writing Hugging Face safetensors directories with numpy only (no torch)."""

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


class SafetensorsDir:
    """Lazy view of the tensors of an HF directory (single file or sharded with an index)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
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

    def __getitem__(self, key: str) -> np.ndarray:
        path = self._files[key]
        if path not in self._handles:
            self._handles[path] = self._open(path)
        try:
            return self._handles[path].get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(f"{path}: cannot read tensor {key!r} ({e})") from e


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

"""Model checkpoint directories: ``lct_config.json`` (which model, its config) + an Orbax ``params`` item.

Layout::

    CKPT_DIR/
      lct_config.json     {"kind": "qwen2", "config": {...Qwen2Config fields...}}
      params/             Orbax PyTree checkpoint of the params (nested dict, fp32 by default)
      tokenizer.json ...  optional tokenizer files, copied through on export

Writes are atomic: everything goes to a hidden sibling directory that is renamed into place at the end, so a
crash, a bad input or a full disk never leaves a half-written output directory.

:func:`check_orbax_item` tells cheaply (metadata and index nodes only, no array data) whether an Orbax item is
complete: committed, its index readable, and every data file it references present and long enough. Training
restarts and ``export-hf`` use it to refuse damaged or unfinished checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from lct_jax.convert.mapping import ConversionError, flatten_params
from lct_jax.errors import DiskFullError, OutputExistsError, is_disk_full

CONFIG_NAME = "lct_config.json"
PARAMS_ITEM = "params"
COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last, into every finished step and item
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)


def model_classes(kind: str):
    """(config class, model class) for a checkpoint kind."""
    if kind == "qwen2":
        from lct_jax.model.qwen2 import Qwen2, Qwen2Config

        return Qwen2Config, Qwen2
    if kind == "longva":
        from lct_jax.model.longva import LongVA, LongVAConfig

        return LongVAConfig, LongVA
    raise ConversionError(f"unknown model kind {kind!r} in {CONFIG_NAME}; expected 'qwen2' or 'longva'")


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(kind: str, d: dict):
    cls, _ = model_classes(kind)
    if hasattr(cls, "from_dict"):
        return cls.from_dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConversionError(f"{CONFIG_NAME}: unknown {kind} config fields {sorted(unknown)}")
    return cls(**d)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory that becomes ``out`` only if the block succeeds (a full disk on the way raises
    :class:`lct_jax.errors.DiskFullError` naming ``out``; nothing is left behind)."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is a file, not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output directory {out} exists and is not empty; remove it or pass --overwrite"
        )
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except Exception as e:
        if is_disk_full(e):  # (named by the outermost output: a nested one's path is inside this temporary)
            raise DiskFullError(out) from e
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``path`` through a temporary sibling and a rename: readers see the old file or the new one, never a
    truncated one (a full disk raises :class:`lct_jax.errors.DiskFullError` naming ``path``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFullError(path) from e
        raise


def _locations(node) -> list[str]:
    """OCDBT node/value locations (``"<kind>:<base>:<file>:<offset>:<length>"``) inside a dumped manifest/node."""
    if isinstance(node, dict):
        return [loc for v in node.values() for loc in _locations(v)]
    if isinstance(node, list):
        return [loc for v in node for loc in _locations(v)]
    if isinstance(node, str) and node.split(":", 1)[0] in ("btreenode", "value", "versionnode"):
        return [node]
    return []


def check_orbax_item(path: str | os.PathLike) -> str | None:
    """What is wrong with the Orbax item (a params / opt_state / ... directory) at ``path``, or ``None``.

    Checks, without reading array data: the item exists and was committed, and, for OCDBT items (Orbax's default),
    that the index is readable and every data file it references exists and is long enough (a missing or
    truncated ``d/<hash>`` file). ``tensorstore.ocdbt.dump`` reads the manifest and B-tree nodes.
    """
    path = Path(path).absolute()
    name = path.name
    if not path.is_dir():
        return f"{name}/ is missing"
    if not (path / COMMIT_MARKER).exists():
        return f"{name}/ has no {COMMIT_MARKER} (its save did not finish)"
    if not (path / "manifest.ocdbt").exists():
        if any(path.glob("ocdbt.process_*")):
            return f"{name}/manifest.ocdbt is missing"
        return (
            None if (path / "_METADATA").exists() else f"{name}/ has neither an OCDBT manifest nor _METADATA"
        )
    try:
        kv = ts.KvStore.open(f"file://{path}/").result()
        todo = _locations(ts.ocdbt.dump(kv).result())
        while todo:
            parts = todo.pop().rsplit(":", 4)
            if len(parts) != 5:  # not a file location this check knows how to read
                continue
            kind, base, rel, offset, length = parts
            f = path / (base + rel)
            if not f.is_file():
                return f"{name}/{base}{rel} is missing"
            if f.stat().st_size < int(offset) + int(length):
                return f"{name}/{base}{rel} is truncated ({f.stat().st_size} bytes, needs {int(offset) + int(length)})"
            if kind == "btreenode":
                todo += _locations(ts.ocdbt.dump(kv, ":".join(parts)).result())
    except ValueError as e:  # tensorstore's errors (a corrupt manifest or node)
        return f"{name}/ has an unreadable index ({str(e).splitlines()[0][:200]})"
    return None


def save_params(path: Path, params: dict) -> None:
    """Save a nested dict of arrays as an Orbax PyTree checkpoint at ``path`` (must not exist)."""
    params = jax.tree.map(np.asarray, params)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(Path(path).absolute(), params)


def restore_params_numpy(path: Path) -> dict:
    """Restore an Orbax params item as a nested dict of numpy arrays (no devices, no sharding).

    Works on a standalone item (``CKPT/params``) and on an item of a training step (``STEP/params``); a damaged or
    unfinished item is a :class:`ConversionError` naming what is wrong (:func:`check_orbax_item`). The item-level
    handler is used because a ``Checkpointer`` looks for step metadata inside the item directory and warns when it
    is (rightly) not there.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise ConversionError(f"no Orbax params at {path}")
    problem = check_orbax_item(path)
    if problem:
        raise ConversionError(f"checkpoint {path.parent} is damaged or unfinished: {problem}")
    handler = ocp.PyTreeCheckpointHandler()
    try:
        meta = handler.metadata(path)
        tree = meta.tree if hasattr(meta, "tree") else meta
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        handler.close()


def save_model_checkpoint(
    out: str | os.PathLike,
    kind: str,
    cfg,
    params: dict,
    *,
    extra_files=(),
    overwrite: bool = False,
    source_dtype: str | None = None,
) -> Path:
    """Write ``out/lct_config.json`` + ``out/params`` atomically; ``extra_files`` are copied in (tokenizer...).
    ``source_dtype``: the dtype the weights came in (``export-hf`` writes it back by default)."""
    meta = {"kind": kind, "config": config_to_dict(cfg)}
    if source_dtype:
        meta["source_dtype"] = source_dtype
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        save_params(tmp / PARAMS_ITEM, params)
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
    return Path(out)


def find_model_config(ckpt: str | os.PathLike) -> Path:
    """The ``lct_config.json`` of a model checkpoint dir, or of a training step dir (looked up one level up)."""
    ckpt = Path(ckpt)
    for d in (ckpt, ckpt.parent, ckpt.parent.parent):
        if (d / CONFIG_NAME).exists():
            return d / CONFIG_NAME
    raise ConversionError(
        f"{ckpt}: no {CONFIG_NAME} found here or in its parents; is this an lct_jax checkpoint?"
    )


def read_model_config(ckpt: str | os.PathLike, **overrides):
    """(kind, config) of a checkpoint; ``overrides`` replace config fields (e.g. dtype='float32')."""
    meta = json.loads(find_model_config(ckpt).read_text())
    cfg = config_from_dict(meta["kind"], meta["config"])
    return meta["kind"], (dataclasses.replace(cfg, **overrides) if overrides else cfg)


def tokenizer_files_near(*dirs: str | os.PathLike) -> list[Path]:
    """Tokenizer files found in the first of ``dirs`` that has any."""
    for d in dirs:
        found = [Path(d) / n for n in TOKENIZER_FILES if (Path(d) / n).is_file()]
        if found:
            return found
    return []


def params_of(model: nnx.Module) -> dict:
    """A model's params as a nested dict of arrays."""
    return nnx.state(model, nnx.Param).to_pure_dict()


def _abstract_model(kind: str, cfg) -> nnx.Module:
    _, model_cls = model_classes(kind)
    return nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))


def param_shapes(kind: str, cfg) -> dict[str, tuple[int, ...]]:
    """``{"a/b/c": shape}`` of a ``kind`` model with config ``cfg`` (abstract: nothing allocated)."""
    params = nnx.state(_abstract_model(kind, cfg), nnx.Param).to_pure_dict()
    return {k: tuple(v.shape) for k, v in flatten_params(params).items()}


def model_from_params(kind: str, cfg, params: dict) -> nnx.Module:
    """Build a model of ``kind`` without random init and load ``params`` (nested dict) into it."""
    abstract = _abstract_model(kind, cfg)
    graphdef, state = nnx.split(abstract)
    want = jax.tree.map(lambda x: tuple(x.shape), nnx.state(abstract, nnx.Param).to_pure_dict())
    got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
    if want != got:
        raise ConversionError(f"checkpoint params do not match the {kind} config: expected {want}, got {got}")
    state.replace_by_pure_dict(jax.tree.map(jax.numpy.asarray, params))
    return nnx.merge(graphdef, state)


def load_model(ckpt: str | os.PathLike, **overrides) -> nnx.Module:
    """Load a model checkpoint directory into an nnx model (e.g. ``load_model(d, dtype='float32')``)."""
    kind, cfg = read_model_config(ckpt, **overrides)
    ckpt = Path(ckpt)
    params_dir = ckpt / PARAMS_ITEM
    return model_from_params(kind, cfg, restore_params_numpy(params_dir))

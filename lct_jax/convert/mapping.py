"""Declarative checkpoint mappings: one table of rules, applied in either direction.

A :class:`Rule` pairs a PyTorch/HF key with an lct_jax param path and a transform. Keys containing ``{i}`` are
per-layer: they map onto one slice of a param stacked on a leading ``layers`` axis. Both directions check that
every source key and every target path is used exactly once and that every shape matches; anything left over,
missing or misshapen is an error that names the key.

Layouts: PyTorch ``Linear.weight`` is [out, in]; our kernels are [*in_dims, *out_dims] (e.g. a q projection
[D, N, H] is HF's [N*H, D] transposed and reshaped).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from lct_jax.errors import UserError

# export dtypes by name (--dtype)
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}


class ConversionError(UserError, ValueError):
    """A checkpoint does not match the mapping: missing, unexpected or misshapen tensors, bad config."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """``to_ours(hf_array, our_shape) -> our_array`` and ``to_hf(our_array) -> hf_array``; ``hf_shape`` predicts
    the HF shape from ours (for shape checks and abstract key sets)."""

    to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


IDENTITY = Transform(lambda a, s: a, lambda a: a, lambda s: tuple(s))
FLAT = Transform(lambda a, s: a.reshape(s), lambda a: a.reshape(-1), lambda s: (math.prod(s),))


def linear(n_in: int) -> Transform:
    """PyTorch Linear weight [prod(out), prod(in)] <-> kernel [*in (n_in dims), *out]."""

    def hf_shape(s):
        return (math.prod(s[n_in:]), math.prod(s[:n_in]))

    return Transform(
        lambda a, s: a.T.reshape(s),
        lambda a: a.reshape(math.prod(a.shape[:n_in]), -1).T,
        hf_shape,
    )


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # e.g. "model.layers.{i}.self_attn.q_proj.weight"
    ours: str  # e.g. "layers/attn/q/kernel"
    transform: Transform = IDENTITY

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


def _hf_keys(rule: Rule, num_layers: int) -> list[str]:
    return [rule.hf.format(i=i) for i in range(num_layers)] if rule.stacked else [rule.hf]


def hf_shapes(rules: Iterable[Rule], our_shapes: Mapping[str, tuple[int, ...]], num_layers: int) -> dict:
    """The HF key set and shapes implied by our param shapes (no arrays needed: works on abstract 7B models)."""
    out = {}
    for rule in rules:
        shape = tuple(our_shapes[rule.ours])
        per = shape[1:] if rule.stacked else shape
        for key in _hf_keys(rule, num_layers):
            out[key] = rule.transform.hf_shape(per)
    return out


def _check_coverage(rules: list[Rule], our_shapes: Mapping[str, tuple[int, ...]]) -> None:
    paths = [r.ours for r in rules]
    dup = {p for p in paths if paths.count(p) > 1}
    if dup:
        raise ConversionError(f"mapping uses param paths more than once: {sorted(dup)}")
    missing = set(our_shapes) - set(paths)
    extra = set(paths) - set(our_shapes)
    if missing or extra:
        raise ConversionError(
            f"mapping does not cover the model: unmapped params {sorted(missing)}, "
            f"rules for params that do not exist {sorted(extra)}"
        )


def to_ours(
    rules: Iterable[Rule],
    get_hf: Callable[[str], np.ndarray],
    hf_keys: Iterable[str],
    our_shapes: Mapping[str, tuple[int, ...]],
    num_layers: int,
    dtype=np.float32,
) -> dict[str, np.ndarray]:
    """HF tensors -> {our path: array}. ``get_hf(key)`` loads one tensor lazily."""
    rules = list(rules)
    _check_coverage(rules, our_shapes)
    available = set(hf_keys)
    expected = set()
    for rule in rules:
        expected.update(_hf_keys(rule, num_layers))
    unexpected = available - expected
    missing = expected - available
    if unexpected or missing:
        raise ConversionError(
            f"checkpoint keys do not match the model config: missing {sorted(missing)[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {sorted(unexpected)[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )
    out = {}
    for rule in rules:
        shape = tuple(our_shapes[rule.ours])
        per = shape[1:] if rule.stacked else shape
        want_hf = rule.transform.hf_shape(per)
        slices = []
        for key in _hf_keys(rule, num_layers):
            arr = np.asarray(get_hf(key))
            if tuple(arr.shape) != want_hf:
                raise ConversionError(
                    f"tensor {key!r} has shape {tuple(arr.shape)}, expected {want_hf} "
                    f"(for param {rule.ours} of shape {per})"
                )
            slices.append(rule.transform.to_ours(arr, per).astype(dtype))
        out[rule.ours] = np.stack(slices) if rule.stacked else slices[0]
    return out


def to_hf(
    rules: Iterable[Rule], params: Mapping[str, np.ndarray], num_layers: int, dtype=None
) -> dict[str, np.ndarray]:
    """{our path: array} -> HF tensors (contiguous, optionally cast)."""
    rules = list(rules)
    _check_coverage(rules, {k: v.shape for k, v in params.items()})
    out = {}
    for rule in rules:
        arr = np.asarray(params[rule.ours])
        for i, key in enumerate(_hf_keys(rule, num_layers)):
            t = rule.transform.to_hf(arr[i] if rule.stacked else arr)
            t = np.ascontiguousarray(t if dtype is None else t.astype(dtype))
            if key in out:
                raise ConversionError(f"mapping writes HF key {key!r} twice")
            out[key] = t
    return out


def flatten_params(tree, sep: str = "/") -> dict[str, np.ndarray]:
    """Nested dict of arrays -> {"a/b/c": array}."""
    flat = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}{sep}{k}" if prefix else str(k))
        else:
            flat[prefix] = node

    walk(tree, "")
    return flat


def unflatten_params(flat: Mapping[str, np.ndarray], sep: str = "/") -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def read_strict_config(
    hf: Mapping,
    *,
    what: str,
    translated: Mapping[str, str],
    required: Mapping[str, tuple],
    ignored: Iterable[str],
    special: Mapping[str, Callable[[object, dict], None]] | None = None,
) -> dict:
    """Translate an HF config dict field by field; any field not accounted for is an error.

    ``translated``: HF name -> our field name; ``required``: HF name -> the values we implement (the first is
    named in the error); ``ignored``: informational fields that do not change the computed function;
    ``special``: HF name -> ``fn(value, kwargs)`` for fields that need code. Returns our config kwargs.
    """
    special = special or {}
    ignored = set(ignored)
    kw: dict = {}
    unknown = []
    for key, value in hf.items():
        if key in translated:
            kw[translated[key]] = value
        elif key in required:
            if value not in required[key]:
                raise ConversionError(
                    f"{what}: {key}={value!r} is not supported (lct_jax implements {required[key][0]!r})"
                )
        elif key in special:
            special[key](value, kw)
        elif key not in ignored:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"{what}: fields lct_jax does not understand: {sorted(unknown)}; refusing to drop them silently"
        )
    return kw


_LAYER_RE = re.compile(r"\.(\d+)\.")


def describe_keys(keys: Iterable[str]) -> list[str]:
    """Collapse per-layer keys to their ``{i}`` pattern (for readable errors and docs)."""
    return sorted({_LAYER_RE.sub(".{i}.", k) for k in keys})

"""Checkpoints for evaluation: find the step, restore its params straight onto the eval mesh, find its tokenizer.

A checkpoint argument may be a model checkpoint dir (``lct_config.json`` + ``params/``, e.g. from
``python -m lct_jax.convert import-hf``), a training step dir (``WORKDIR/checkpoints/<step>``), a training
checkpoint dir or a training workdir (its latest step). :func:`load_eval_model` restores each parameter with its
sharding on the mesh (FSDP over ``data x seq``, tensor parallel over ``model``: no host or device ever holds the
whole model) and optionally casts to bf16 on restore (a 7B LM in bf16 is 15 GB instead of 30).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from lct_jax.convert.checkpoint import (
    PARAMS_ITEM,
    ConversionError,
    model_classes,
    read_model_config,
    tokenizer_files_near,
)
from lct_jax.data.tokenizer import load_tokenizer
from lct_jax.eval.cli import EvalError, add_distributed_arguments
from lct_jax.kernels import KERNELS
from lct_jax.sharding import make_mesh, state_shardings

PARAM_DTYPES = ("float32", "bfloat16")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The absolute step (or model checkpoint) directory holding ``params/`` for any accepted checkpoint path."""
    path = Path(path).absolute()
    for base in (path, path / "checkpoints"):
        if (base / PARAMS_ITEM).is_dir():
            return base
        if base.is_dir():
            steps = sorted((int(p.name) for p in base.iterdir() if p.name.isdigit()), reverse=True)
            if steps and (base / str(steps[0]) / PARAMS_ITEM).is_dir():
                return base / str(steps[0])
    raise EvalError(
        f"--ckpt {path}: no '{PARAMS_ITEM}' there, in its latest step, or in checkpoints/<step>; pass a model "
        "checkpoint dir (convert import-hf), a training step dir or a training workdir"
    )


@dataclasses.dataclass(frozen=True)
class EvalModel:
    kind: str  # 'qwen2' | 'longva'
    cfg: object  # Qwen2Config | LongVAConfig, as loaded (param/compute dtype overrides applied)
    model: nnx.Module  # Qwen2 | LongVA with params placed on the mesh
    checkpoint: Path  # the resolved step dir

    @property
    def lm(self):
        """The Qwen2 language model (a LongVA's ``lm``)."""
        return self.model.lm if self.kind == "longva" else self.model


def load_eval_model(
    ckpt: str | os.PathLike,
    mesh: Mesh,
    *,
    param_dtype: str | None = None,
    dtype: str | None = None,
    attention: str | None = None,
    ring_kernel: str | None = None,
) -> EvalModel:
    """Restore a checkpoint onto ``mesh``: every param with its sharding, cast to ``param_dtype`` while restoring.

    ``None`` keeps the checkpoint config's value: ``param_dtype`` (fp32 as trained), ``dtype`` (compute; for
    LongVA both towers), ``attention`` ('auto' = ring attention when the mesh's seq axis > 1; 'ring' on one
    device is blockwise attention, memory flat in T; 'dense' is the reference) and ``ring_kernel`` ('xla',
    'pallas_tpu', 'pallas_gpu')."""
    step = resolve_checkpoint(ckpt)
    if param_dtype is not None and param_dtype not in PARAM_DTYPES:
        raise EvalError(f"--param-dtype {param_dtype!r}: expected one of {PARAM_DTYPES}")
    dtypes = {k: v for k, v in (("param_dtype", param_dtype), ("dtype", dtype)) if v is not None}
    lm = {k: v for k, v in (("attention", attention), ("ring_kernel", ring_kernel)) if v is not None}
    try:
        kind, cfg = read_model_config(step, **dtypes)
        if lm:
            cfg = cfg.replace(**lm) if kind == "qwen2" else cfg.replace(text=cfg.text.replace(**lm))
    except (ConversionError, TypeError, ValueError) as e:
        raise EvalError(f"--ckpt {step}: {e}") from e
    _, model_cls = model_classes(kind)
    abstract = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh).to_pure_dict()
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state.to_pure_dict(), shardings
    )
    handler = ocp.PyTreeCheckpointHandler()
    try:
        restored = handler.restore(
            step / PARAMS_ITEM,
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
            ),
        )
    except (ValueError, KeyError) as e:
        raise EvalError(f"--ckpt {step}: its params do not match its {kind} config ({e})") from e
    finally:
        handler.close()
    state.replace_by_pure_dict(restored)
    return EvalModel(kind, cfg, nnx.merge(graphdef, state), step)


def eval_setup(model, mesh: Mesh | None, tokenizer, **overrides) -> tuple[Mesh, EvalModel, object]:
    """(mesh, model, tokenizer) for a run: ``mesh`` defaults to every device on ``seq``; ``model`` is an
    :class:`EvalModel` or a checkpoint path restored onto the mesh with ``overrides`` (:func:`load_eval_model`);
    ``tokenizer`` is a tokenizer, its name/path, or None (the checkpoint's, :func:`resolve_tokenizer`)."""
    mesh = make_mesh(1, -1, 1) if mesh is None else mesh
    if not isinstance(model, EvalModel):
        model = load_eval_model(model, mesh, **overrides)
    if tokenizer is None or isinstance(tokenizer, str):
        tokenizer = resolve_tokenizer(tokenizer, model.checkpoint)
    return mesh, model, tokenizer


def resolve_tokenizer(name_or_path: str | None, checkpoint: str | os.PathLike):
    """``name_or_path`` ('byte', 'qwen' or a tokenizer.json) if given; else tokenizer files next to the checkpoint
    (import-hf copies them), else the ``data.tokenizer`` of the training run that wrote the step."""
    if name_or_path:
        try:
            return load_tokenizer(name_or_path)
        except (FileNotFoundError, ValueError) as e:
            raise EvalError(f"--tokenizer {name_or_path}: {e}") from e
    step = Path(checkpoint)
    found = tokenizer_files_near(step, step.parent)
    if any(f.name == "tokenizer.json" for f in found):
        return load_tokenizer(str(found[0].parent / "tokenizer.json"))
    for run_config in (step.parent.parent / "config.json", step.parent / "config.json"):
        if run_config.is_file():
            name = json.loads(run_config.read_text()).get("data", {}).get("tokenizer")
            if name:
                return load_tokenizer(name)
    raise EvalError(
        f"no tokenizer found for {step} (no tokenizer.json next to it, no training config.json naming one); "
        "pass --tokenizer byte|qwen|PATH/tokenizer.json"
    )


# ---------------------------------------------------------------------------------------------------- CLI


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Flags V-NIAH and text NIAH share: tokenizer, mesh, dtypes, bucketing, progress, pod start."""
    p.add_argument(
        "--tokenizer", default=None, help="byte | qwen | PATH to tokenizer.json (default: the checkpoint's)"
    )
    p.add_argument("--seq", type=int, default=-1, help="sequence-parallel devices (ring attention); -1 = all")
    p.add_argument("--model", type=int, default=1, help="tensor-parallel devices (heads, MLP, vocabulary)")
    p.add_argument("--param-dtype", default=None, choices=("float32", "bfloat16"),
                   help="cast params while restoring (default: as stored; bfloat16 halves a 7B model)")  # fmt: skip
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint config's)")
    p.add_argument("--attention", default=None, choices=("auto", "ring", "dense"),
                   help="default: the checkpoint's (auto = ring when --seq > 1); ring on one device = blockwise")  # fmt: skip
    p.add_argument("--ring-kernel", default=None, choices=KERNELS,
                   help="ring attention block kernel (default: the checkpoint's; pallas_tpu on TPU)")  # fmt: skip
    p.add_argument("--bucket", type=int, default=1, help="pad sequences to a multiple of this many tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_distributed_arguments(p)


def mesh_from_args(args) -> Mesh:
    """``data=1 x seq x model``: all devices with ``--seq -1``, else the first ``seq x model`` of them."""
    try:
        if args.seq == -1:
            return make_mesh(1, -1, args.model)
        return make_mesh(1, args.seq, args.model, devices=jax.devices()[: max(args.seq * args.model, 0)])
    except ValueError as e:
        raise EvalError(f"--seq {args.seq} --model {args.model}: {e}") from e


def run_kwargs(args) -> dict:
    """The keyword arguments of ``run_vniah`` / ``run_text_niah`` that :func:`add_model_arguments` sets."""
    return dict(
        tokenizer=args.tokenizer,
        mesh=mesh_from_args(args),
        param_dtype=args.param_dtype,
        dtype=args.dtype,
        attention=args.attention,
        ring_kernel=args.ring_kernel,
        bucket=args.bucket,
        progress=not args.no_progress,
    )

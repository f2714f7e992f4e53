"""AdamW with parameter groups: frozen / vision tower / projector / language model.

Every parameter gets exactly one group label from its path (:func:`param_group`). Frozen params are not part of
the optimizer at all: the train step differentiates only the trainable ones and passes frozen ones through
untouched (bit-for-bit). Each trainable group has its own learning rate and schedule; all groups share the AdamW
moments' hyper-parameters, weight decay and one global-norm clip over all trainable gradients.

Config (``ml_collections``, see ``configs/``)::

    optim.b1, optim.b2, optim.eps, optim.weight_decay, optim.grad_clip (<= 0: off)
    optim.total_steps
    optim.groups.<name>.lr        (<= 0 or ``trainable=False``: frozen)
    optim.groups.<name>.schedule  'constant' | 'cosine'
    optim.groups.<name>.warmup    fraction of total_steps (e.g. 0.03) for linear warmup
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

GROUPS = ("vision", "projector", "lm")
FROZEN = "frozen"
SCHEDULES = ("constant", "cosine")

# first path element of a LongVA param -> group; a bare Qwen2 (stage 0) is all 'lm'
_PREFIX_GROUPS = {
    "vision": "vision",
    "vision_tower": "vision",
    "tower": "vision",
    "clip": "vision",
    "projector": "projector",
    "mm_projector": "projector",
}


def param_group(path: tuple) -> str:
    """Group of one param from its nnx path, e.g. ('vision', 'layers', ...) -> 'vision'."""
    head = str(path[0]) if path else ""
    return _PREFIX_GROUPS.get(head, "lm")


def group_labels(params: dict) -> dict:
    """The same tree as a pure param dict with each leaf replaced by its group name."""
    return jax.tree_util.tree_map_with_path(lambda p, _: param_group(_keys(p)), params)


def make_schedule(lr: float, schedule: str, total_steps: int, warmup: float = 0.0) -> optax.Schedule:
    """Linear warmup over ``warmup * total_steps`` steps, then constant or cosine decay to 0 at ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"{schedule=} is not one of {SCHEDULES}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"{warmup=} must be a fraction of total_steps in [0, 1)")
    if total_steps < 1:
        raise ValueError(f"{total_steps=} must be >= 1")
    warm = int(round(warmup * total_steps))
    if schedule == "constant":
        main = optax.constant_schedule(lr)
    else:
        main = optax.cosine_decay_schedule(lr, decay_steps=max(1, total_steps - warm))
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def trainable_groups(optim) -> dict[str, Mapping]:
    """{group: its config} for the groups that train (lr > 0 and trainable not False)."""
    groups = dict(optim.groups)
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown optimizer groups {sorted(unknown)}; expected a subset of {GROUPS}")
    return {name: g for name, g in groups.items() if g.get("trainable", True) and float(g["lr"]) > 0.0}


def schedules(optim) -> dict[str, optax.Schedule]:
    return {
        name: make_schedule(
            float(g["lr"]), g.get("schedule", "constant"), int(optim.total_steps), float(g.get("warmup", 0.0))
        )
        for name, g in trainable_groups(optim).items()
    }


def make_optimizer(optim, labels) -> optax.GradientTransformation:
    """AdamW per group (fp32 moments), global-norm clipping first.

    ``labels``: a tree of group names matching the *trainable* params (or a callable producing it).
    """
    groups = schedules(optim)
    if not groups:
        raise ValueError(f"no trainable group: every group in {dict(optim.groups)} is frozen")
    txs = {
        name: optax.adamw(
            sched,
            b1=float(optim.b1),
            b2=float(optim.b2),
            eps=float(optim.eps),
            weight_decay=float(optim.weight_decay),
            mu_dtype=jnp.float32,
        )
        for name, sched in groups.items()
    }
    chain = [optax.multi_transform(txs, labels)]
    if float(optim.grad_clip) > 0:
        chain.insert(0, optax.clip_by_global_norm(float(optim.grad_clip)))
    return optax.chain(*chain)


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def split_trainable(params: dict, optim) -> tuple[dict, dict]:
    """(trainable, frozen) partition of a pure param dict (``nnx.State.to_pure_dict()``) by group."""
    train = set(trainable_groups(optim))
    trainable, frozen = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = _keys(path)
        dst = trainable if param_group(keys) in train else frozen
        for k in keys[:-1]:
            dst = dst.setdefault(k, {})
        dst[keys[-1]] = leaf
    return trainable, frozen


def merge_params(a: dict, b: dict) -> dict:
    """Deep union of two disjoint pure param dicts (inverse of :func:`split_trainable`)."""
    out = dict(a)
    for k, v in b.items():
        if k in out:
            if not (isinstance(v, dict) and isinstance(out[k], dict)):
                raise ValueError(f"param {k!r} is in both halves")
            out[k] = merge_params(out[k], v)
        else:
            out[k] = v
    return out

"""The train state: one pytree (step, trainable params, frozen params, optimizer state, RNG, skip counter).

Params are *pure* nested dicts of fp32 arrays (``nnx.State.to_pure_dict()``), split by optimizer group into
``params`` (differentiated and updated) and ``frozen`` (passed through the step untouched, so bit-for-bit equal
after any number of steps). ``nnx.merge(graphdef, merge_params(params, frozen))`` rebuilds the model.

Sharded init follows the flax recipe: ``eval_shape`` → logical axes → ``NamedSharding`` per leaf → ``jit(init,
out_shardings=...)``, so no full-size array ever lives on one device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from optax.transforms import MaskedNode

from lct_jax.sharding import state_shardings
from lct_jax.train.optimizer import group_labels, make_optimizer, merge_params, split_trainable


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32[]: optimizer steps taken (skipped non-finite steps included)
    params: dict  # trainable params, fp32
    frozen: dict  # params not trained in this stage, fp32
    opt_state: Any  # optax state over ``params``
    rng: jax.Array  # uint32[2]: raw key data, advanced every step
    nonfinite: jax.Array  # int32[]: steps whose update was skipped for non-finite gradients

    def all_params(self) -> dict:
        return merge_params(self.params, self.frozen)


@dataclasses.dataclass(frozen=True)
class StateSpec:
    """Everything static about a train state: how to rebuild the model, the optimizer, and the shardings."""

    graphdef: Any
    tx: optax.GradientTransformation
    shardings: TrainState  # a TrainState whose leaves are NamedShardings
    abstract: TrainState  # ShapeDtypeStructs carrying those shardings (restore target)
    mesh: Mesh


def abstract_model(make_model: Callable[[nnx.Rngs], nnx.Module]):
    """(graphdef, abstract pure param dict, nnx.State of abstract params) without allocating."""
    abstract = nnx.eval_shape(lambda: make_model(nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"model has non-Param variables, which the train state does not carry: {rest}")
    return graphdef, params


def param_shardings(abstract_params: nnx.State, mesh: Mesh) -> dict:
    return state_shardings(abstract_params, mesh).to_pure_dict()


def make_state_spec(make_model, optim, mesh: Mesh) -> StateSpec:
    graphdef, abs_state = abstract_model(make_model)
    shard = param_shardings(abs_state, mesh)
    abs_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abs_state.to_pure_dict(), shard
    )
    train_abs, frozen_abs = split_trainable(abs_params, optim)
    tx = make_optimizer(optim, group_labels(train_abs))
    opt_abs = jax.eval_shape(tx.init, train_abs)
    train_shard = jax.tree.map(lambda x: x.sharding, train_abs)
    replicated = NamedSharding(mesh, PartitionSpec())
    # moments mirror their params' shardings; counters and the like are replicated
    opt_shard = optax.tree_map_params(
        tx,
        lambda p, s: p if isinstance(p, MaskedNode) else s,  # a group's state masks out other groups' params
        opt_abs,
        train_shard,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding | MaskedNode),
    )
    shardings = TrainState(
        step=replicated,
        params=train_shard,
        frozen=jax.tree.map(lambda x: x.sharding, frozen_abs),
        opt_state=opt_shard,
        rng=replicated,
        nonfinite=replicated,
    )
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=train_abs,
        frozen=frozen_abs,
        opt_state=opt_abs,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
        nonfinite=jax.ShapeDtypeStruct((), jnp.int32),
    )
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
    return StateSpec(graphdef=graphdef, tx=tx, shardings=shardings, abstract=abstract, mesh=mesh)


def init_state(spec: StateSpec, make_model, optim, seed: int = 0, params: dict | None = None) -> TrainState:
    """A fresh sharded state: random params from ``make_model``, overwritten leaf by leaf by ``params`` (a full or
    partial pure dict, e.g. the LM from a text-stage checkpoint and the tower from an imported CLIP), zero
    optimizer moments, ``step = 0``."""

    def init(given):
        model = make_model(nnx.Rngs(seed))
        full = nnx.split(model, nnx.Param)[1].to_pure_dict()
        full = (
            merge_params(_drop(full, given), given) if given else full
        )  # random leaves only where not given
        train, frozen = split_trainable(full, optim)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=train,
            frozen=frozen,
            opt_state=spec.tx.init(train),
            rng=jax.random.key_data(jax.random.key(seed)),
            nonfinite=jnp.zeros((), jnp.int32),
        )

    if params is not None:
        check_params(params, spec)
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    with jax.set_mesh(spec.mesh):
        return jax.jit(init, out_shardings=spec.shardings)(params)


def _drop(full: dict, given: dict) -> dict:
    """``full`` without the leaves present in ``given``."""
    out = {}
    for k, v in full.items():
        if k not in given:
            out[k] = v
        elif isinstance(v, dict):
            rest = _drop(v, given[k])
            if rest:
                out[k] = rest
    return out


def check_params(params: dict, spec: StateSpec) -> None:
    """Loaded params must be model keys with the model's shapes (a subset is fine: the rest stays random)."""
    flat = lambda t: {  # noqa: E731
        jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(t)[0]
    }
    want = flat(merge_params(spec.abstract.params, spec.abstract.frozen))
    got = flat(params)
    extra = sorted(set(got) - set(want))
    bad = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if extra or bad:
        raise ValueError(
            f"loaded params do not fit the model: unknown keys={extra[:5]} "
            f"shape mismatches={[(k, got[k], want[k]) for k in bad[:5]]} (model keys look like {sorted(want)[:3]})"
        )

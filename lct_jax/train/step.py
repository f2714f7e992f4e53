"""One pure train step: micro-batch gradient accumulation, chunked loss, clipped AdamW, non-finite skip.

``train_step(state, batch) -> (state, metrics)`` is compiled once by :func:`jit_train_step` with explicit in/out
shardings (the state's own shardings on both sides, so step 2 reuses step 1's executable) and the state donated.
Params and optimizer state are fp32; the model computes in its config dtype (bf16 by default).

Loss = (sum of per-token losses over the whole optimizer batch) / (number of loss tokens in that batch), for any
sharding and any number of micro-batches: each micro-batch contributes ``loss_sum_i / total_tokens``, where
``total_tokens`` is counted over the full batch before the accumulation loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lct_jax.data.loader import batch_shardings
from lct_jax.sharding import mesh_axis_size
from lct_jax.train.loss import chunked_cross_entropy
from lct_jax.train.optimizer import merge_params, schedules
from lct_jax.train.state import StateSpec, TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many micro-batches
    loss_chunk: int = 1024  # tokens per row per chunk of the vocabulary projection
    vocab_chunk: int = 0  # vocabulary columns per chunk of the head (0 = the whole head per token chunk)

    @classmethod
    def from_config(cls, step) -> StepConfig:
        """From a stage config's ``step`` section."""
        return cls(micro_batches=step.micro_batches, loss_chunk=step.loss_chunk, vocab_chunk=step.vocab_chunk)


def text_forward(model, batch) -> tuple[jax.Array, jax.Array]:
    """Qwen2: (hidden [B, T, D], head weight [D, V])."""
    hidden = model.encode(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    return hidden, model.head_weight()


def multimodal_forward(model, batch) -> tuple[jax.Array, jax.Array]:
    """LongVA: splice visual tokens, run the decoder; (hidden [B, T, D], head weight [D, V])."""
    hidden = model.encode(
        batch["inputs"],
        pixels=batch["pixels"],
        pixel_mask=batch["pixel_mask"],
        visual_index=batch["visual_index"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
    )
    return hidden, model.head_weight()


def forward_for(batch_keys) -> Callable:
    return multimodal_forward if "pixels" in batch_keys else text_forward


def _split_micro(x: jax.Array, a: int) -> jax.Array:
    """[B, ...] -> [A, B/A, ...] with strided micro-batches (row r goes to micro-batch r % A), which keeps the
    batch dim's data sharding on B/A."""
    b = x.shape[0]
    return jnp.moveaxis(x.reshape(b // a, a, *x.shape[1:]), 1, 0)


def make_loss_and_grads(spec: StateSpec, step_cfg: StepConfig, forward: Callable | None = None):
    """``fn(state, batch) -> (loss, loss_tokens, grads)``: the mean loss over the whole batch and its gradient
    w.r.t. the trainable params, accumulated over ``step_cfg.micro_batches`` strided micro-batches."""
    a = step_cfg.micro_batches

    def loss_and_grads(state: TrainState, batch: dict):
        fwd = forward or forward_for(batch.keys())
        b = batch["inputs"].shape[0]
        if b % a:
            raise ValueError(f"batch size {b} does not divide into micro_batches={a}")
        total_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        denom = jnp.maximum(total_tokens, 1.0)
        seq = mesh_axis_size("seq")

        def loss_fn(trainable, micro):
            model = nnx.merge(spec.graphdef, merge_params(trainable, state.frozen))
            hidden, w = fwd(model, micro)
            loss_sum, _ = chunked_cross_entropy(
                hidden,
                w,
                micro["targets"],
                micro["loss_mask"],
                chunk_size=step_cfg.loss_chunk,
                multiple_of=seq,
                vocab_chunk=step_cfg.vocab_chunk,
            )
            return loss_sum / denom, loss_sum

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if a == 1:
            (_, loss_sum), grads = grad_fn(state.params, batch)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, a), batch)

            def body(carry, mb):
                g_acc, l_acc = carry
                (_, ls), g = grad_fn(state.params, mb)
                g_acc = jax.tree.map(jnp.add, g_acc, g)
                g_acc = jax.lax.with_sharding_constraint(g_acc, spec.shardings.params)
                return (g_acc, l_acc + ls), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), micro)
        return loss_sum / denom, total_tokens, grads

    return loss_and_grads


def make_train_step(spec: StateSpec, optim, step_cfg: StepConfig, forward: Callable | None = None):
    """The pure step function (not jitted). ``forward(model, batch) -> (hidden, head_weight)``."""
    scheds = schedules(optim)
    loss_and_grads = make_loss_and_grads(spec, step_cfg, forward)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        loss, total_tokens, grads = loss_and_grads(state, batch)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
        updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            frozen=state.frozen,
            opt_state=keep(opt_state, state.opt_state),
            rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)),
            nonfinite=state.nonfinite + jnp.where(finite, 0, 1).astype(jnp.int32),
        )
        # same shardings out as in: the next call hits the same executable (stack.md trap)
        new_state = jax.lax.with_sharding_constraint(new_state, spec.shardings)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "finite": finite,
            "loss_tokens": total_tokens,
            "nonfinite_total": new_state.nonfinite,
            **{f"lr/{name}": s(state.step) for name, s in scheds.items()},
        }
        return new_state, metrics

    return train_step


def jit_train_step(spec: StateSpec, optim, step_cfg: StepConfig, batch_example: dict, forward=None):
    """``jax.jit`` of the step with explicit shardings and the state donated. Call it inside
    ``jax.set_mesh(spec.mesh)``."""
    fn = make_train_step(spec, optim, step_cfg, forward)
    replicated = NamedSharding(spec.mesh, PartitionSpec())
    return jax.jit(
        fn,
        in_shardings=(spec.shardings, batch_shardings(batch_example, spec.mesh)),
        out_shardings=(spec.shardings, replicated),
        donate_argnums=0,
    )

"""Checkpoint/resume (also onto another mesh shape), SIGTERM, and the TensorBoard event files."""

import os
import signal

import jax
import ml_collections
import numpy as np

from lct_jax.data.loader import global_batch
from lct_jax.model.qwen2 import PRESETS, Qwen2
from lct_jax.sharding import make_mesh
from lct_jax.testing.events import event_files, read_scalars
from lct_jax.train.checkpoint import Checkpointer
from lct_jax.train.loop import train_loop
from lct_jax.train.metrics import EventWriter
from lct_jax.train.state import init_state, make_state_spec
from lct_jax.train.step import StepConfig, jit_train_step

CFG = PRESETS["tiny"].replace(dtype="float32", num_layers=1)
OPTIM = ml_collections.ConfigDict(
    dict(
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip=1.0,
        total_steps=6,
        groups=dict(lm=dict(lr=3e-3, schedule="cosine", warmup=0.2)),
    )
)


class ToyIter:
    """Deterministic batches keyed by their index, resumable via get_state/set_state."""

    def __init__(self, sigterm_at=None):
        self.i, self.sigterm_at = 0, sigterm_at

    def __next__(self):
        rng = np.random.default_rng([7, self.i])
        self.i += 1
        if self.i == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        toks = rng.integers(0, CFG.vocab_size, (4, 17)).astype(np.int32)
        return dict(
            inputs=toks[:, :-1],
            targets=toks[:, 1:],
            loss_mask=np.ones((4, 16), np.float32),
            positions=np.tile(np.arange(16, dtype=np.int32), (4, 1)),
            segment_ids=np.ones((4, 16), np.int32),
        )

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


def _setup(mesh):
    mk = lambda r: Qwen2(CFG, rngs=r)  # noqa: E731
    spec = make_state_spec(mk, OPTIM, mesh)
    it = ToyIter()
    step = jit_train_step(spec, OPTIM, StepConfig(), next(ToyIter()))
    return spec, mk, it, step


def _run(spec, state, step, it, n, ckpt=None, writer=None):
    with jax.set_mesh(spec.mesh):
        return train_loop(
            state,
            step,
            it,
            put_batch=lambda b: global_batch(b, spec.mesh),
            num_steps=n,
            checkpointer=ckpt,
            writer=writer,
            progress=False,
            print_fn=lambda s: None,
        )


def test_resume_equals_uninterrupted_on_another_mesh(tmp_path):
    mesh_a = make_mesh(2, 1, 2, devices=jax.devices()[:4])
    spec, mk, it, step = _setup(mesh_a)
    full = _run(spec, init_state(spec, mk, OPTIM), step, it, 6)
    losses = [h["loss"] for h in full.history]
    assert losses[-1] < losses[0]

    spec, mk, it, step = _setup(mesh_a)
    ckpt = Checkpointer(tmp_path / "ck", every=2, keep=2)
    first = _run(spec, init_state(spec, mk, OPTIM), step, it, 3, ckpt=ckpt)
    assert first.status == "done" and ckpt.manager.all_steps() == [2, 3]  # keep=2, final step always saved
    ckpt.close()

    mesh_b = make_mesh(1, 1, 2, devices=jax.devices()[4:6])  # another shape, other devices
    spec_b, mk, it_b, step_b = _setup(mesh_b)
    ckpt_b = Checkpointer(tmp_path / "ck", every=2, keep=2)
    state = ckpt_b.restore(spec_b, OPTIM, it_b)
    assert int(state.step) == 3 and it_b.i == 3
    leaf = jax.tree.leaves(state.params)[0]
    assert leaf.sharding.mesh.shape == mesh_b.shape
    rest = _run(spec_b, state, step_b, it_b, 6, ckpt=ckpt_b)
    resumed = [h["loss"] for h in first.history + rest.history]
    print({"uninterrupted": losses, "resumed": resumed})
    np.testing.assert_allclose(resumed, losses, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(rest.state.rng), np.asarray(full.state.rng))  # RNG resumed too
    ckpt_b.close()


def test_sigterm_saves_current_step_and_events_are_readable(tmp_path):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    spec, mk, _, step = _setup(mesh)
    it = ToyIter(sigterm_at=3)  # SIGTERM arrives while batch 3 is being fetched
    ckpt = Checkpointer(tmp_path / "ck", every=100, keep=3)
    writer = EventWriter(tmp_path / "tb")
    res = _run(spec, init_state(spec, mk, OPTIM), step, it, 6, ckpt=ckpt, writer=writer)
    writer.close()
    assert res.status == "preempted" and len(res.history) == 3
    assert ckpt.latest_step() == 3  # the step that was running when SIGTERM came
    ckpt.close()

    # step events: the loss as the loop saw it, read back with TensorBoard's own reader
    (path,) = event_files(tmp_path / "tb")
    losses = read_scalars(path)["loss"]
    assert sorted(losses) == [1, 2, 3]
    assert abs(losses[1] - res.history[0]["loss"]) < 1e-6

"""Stage semantics: stage 1 trains only the projector (bit-for-bit), stage 2 gives the vision tower its own LR,
and the 8-device ring-attention step equals the 1-device dense step."""

import functools
from pathlib import Path

import jax
import numpy as np
import pytest

from lct_jax.data.loader import global_batch, zigzag_batch
from lct_jax.model.qwen2 import PRESETS, Qwen2
from lct_jax.sharding import make_mesh
from lct_jax.train.optimizer import group_labels
from lct_jax.train.run import build_model, load_config
from lct_jax.train.state import init_state, make_state_spec
from lct_jax.train.step import StepConfig, jit_train_step, make_loss_and_grads

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
IMAGE_TOKEN = -200


def _mm_batch(model_cfg, b=2, l=32, m=2, seed=0):
    """A LongVA batch by hand: each row = BOS, m tiles of visual slots, then text; loss on the text only."""
    rng = np.random.default_rng(seed)
    tpt, v = model_cfg.tokens_per_tile, model_cfg.text.vocab_size
    nvis = m * tpt
    toks = rng.integers(0, v, (b, l + 1)).astype(np.int32)
    inputs, targets = toks[:, :-1].copy(), toks[:, 1:].copy()
    inputs[:, 1 : 1 + nvis] = IMAGE_TOKEN
    visual_index = np.full((b, l), -1, np.int32)
    visual_index[:, 1 : 1 + nvis] = np.arange(nvis)
    loss_mask = np.ones((b, l), np.float32)
    loss_mask[:, : 1 + nvis] = 0.0
    s = model_cfg.tile
    return dict(
        inputs=inputs,
        targets=targets,
        loss_mask=loss_mask,
        positions=np.tile(np.arange(l, dtype=np.int32), (b, 1)),
        segment_ids=np.ones((b, l), np.int32),
        visual_index=visual_index,
        pixels=rng.standard_normal((b, m, s, s, 3)).astype(np.float32),
        pixel_mask=np.ones((b, m), bool),
    )


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _stage_run(config_name, steps=2, **optim_overrides):
    config = load_config(f"{CONFIGS / config_name}:size=tiny")
    for k, v in optim_overrides.items():
        config.optim[k] = v
    _, model_cfg, make_model = build_model(config)
    mesh = make_mesh(2, 1, 2, devices=jax.devices()[:4])
    spec = make_state_spec(make_model, config.optim, mesh)
    state = init_state(spec, make_model, config.optim, seed=0)
    before = _flat(state.all_params())
    batch = _mm_batch(model_cfg)
    step = jit_train_step(spec, config.optim, StepConfig(loss_chunk=8), batch)
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(steps):
            state, m = step(state, global_batch(batch, mesh))
            losses.append(float(m["loss"]))
    return config, before, _flat(state.all_params()), losses, state


def test_stage1_changes_only_projector_bit_for_bit():
    config, before, after, losses, state = _stage_run("align_pretrain.py", steps=3)
    assert set(jax.tree.leaves(group_labels(state.params))) == {"projector"}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    projector = {k for k in before if k.startswith("['projector']")}
    print(f"stage 1: {len(changed)} of {len(before)} param arrays changed, losses {losses}")
    assert changed == projector  # every projector array moved; nothing else changed by a single bit
    assert losses[-1] < losses[0]


def test_stage2_vision_lr_applies_to_exactly_the_vision_params():
    lrs = {"vision": 1e-3, "projector": 3e-3, "lm": 5e-3}
    config = load_config(f"{CONFIGS / 'align_finetune.py'}:size=tiny")
    groups = {
        k: dict(config.optim.groups[k].to_dict(), lr=v, warmup=0.0, schedule="constant")
        for k, v in lrs.items()
    }
    _, before, after, _, state = _stage_run("align_finetune.py", steps=1, groups=groups, grad_clip=0.0)
    labels = _flat(group_labels(state.params))
    for k in before:
        group = (
            "vision" if k.startswith("['vision']") else "projector" if k.startswith("['projector']") else "lm"
        )
        assert str(labels[k]) == group, k
        # first AdamW step (wd 0, no clip): |update| = lr * |g| / (|g| + eps) <= lr, ~lr wherever |g| >> eps
        delta = np.abs(after[k].astype(np.float64) - before[k].astype(np.float64)).max()
        assert delta <= lrs[group] * (1 + 1e-3), (k, delta)
        # ... and another group's LR would land in the forbidden band [0.01 lr, 0.5 lr); arrays whose gradient is
        # ~0 in exact arithmetic (attention k bias: softmax ignores it) move by << 0.01 lr
        assert not 0.01 * lrs[group] <= delta < 0.5 * lrs[group], (k, delta, group)
    moved = {
        g: sum(1 for k in before if k.startswith(f"['{g}']") and not np.array_equal(before[k], after[k]))
        for g in ("vision", "projector", "lm")
    }
    print(f"stage 2: arrays moved per group {moved}")
    assert all(moved.values())


def _text_batch(cfg, b=2, l=64):
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.vocab_size, (b, l + 1)).astype(np.int32)
    return dict(
        inputs=toks[:, :-1],
        targets=toks[:, 1:],
        loss_mask=(rng.random((b, l)) > 0.1).astype(np.float32),
        positions=np.tile(np.arange(l, dtype=np.int32), (b, 1)),
        segment_ids=np.repeat(np.array([[1] * 40 + [2] * 24]), b, 0).astype(np.int32),
    )


def _loss_and_grads(cfg, mesh, batch, step_cfg):
    config = load_config(f"{CONFIGS / 'text_extension.py'}:size=tiny")
    mk = lambda r: Qwen2(cfg, rngs=r)  # noqa: E731
    spec = make_state_spec(mk, config.optim, mesh)
    state = init_state(spec, mk, config.optim, seed=0)
    fn = jax.jit(make_loss_and_grads(spec, step_cfg))
    with jax.set_mesh(mesh):
        loss, _, grads = fn(state, global_batch(batch, mesh))
    return float(loss), _flat(grads)


TINY = PRESETS["tiny"].replace(dtype="float32", num_layers=2)  # 4 query heads, 2 kv heads
TINY6 = TINY.replace(num_heads=6, head_dim=16)  # 6 query heads: model=4 cannot split them


@functools.cache
def _one_device_dense(cfg):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return _loss_and_grads(cfg.replace(attention="dense"), mesh, _text_batch(cfg), StepConfig(loss_chunk=8))


@pytest.mark.parametrize(
    "cfg,mesh,features",
    [
        (TINY, (1, 8, 1), dict(ring_head_passes=2)),  # ring attention over 8 shards, one ring per kv head
        # ring over 2 shards, residual stream split over model=4 (> 2 kv heads: each shard gets its kv head),
        # blockwise MLP (2 chunks of each shard's 32 tokens), embedding lookup in 4 chunks, 4 vocabulary chunks
        (TINY, (1, 2, 4), dict(mlp_chunk=16, embed_chunk=16, vocab_chunk=128)),
        # data=2 splits the rows; 6 query heads on model=4 are replicated (dense attention), blockwise MLP
        (TINY6, (2, 1, 4), dict(mlp_chunk=16, vocab_chunk=100)),
    ],
)
def test_sharded_step_equals_one_device_dense_step(cfg, mesh, features):
    """Loss and every gradient of the sharded step (ring or dense attention, each memory feature on) equal the
    plain 1-device dense step's."""
    want = _one_device_dense(cfg)
    features = dict(features)
    step_cfg = StepConfig(loss_chunk=8, vocab_chunk=features.pop("vocab_chunk", 0))
    batch, seq = _text_batch(cfg), mesh[1]
    got = _loss_and_grads(
        cfg.replace(attention="auto", **features),
        make_mesh(*mesh),
        zigzag_batch(batch, seq) if seq > 1 else batch,
        step_cfg,
    )
    diff = max(np.abs(got[1][k] - want[1][k]).max() for k in want[1])
    print(f"{mesh} {features}: loss {got[0]:.7f} vs {want[0]:.7f}, max grad diff {diff:.2e}")
    assert abs(got[0] - want[0]) <= 1e-5
    assert diff <= 1e-5

"""Stage configs: the spec §8 hyper-parameters at full size, typos rejected, stages chained by init_from."""

import math
from pathlib import Path

import pytest

from lct_jax.train.optimizer import make_schedule, trainable_groups
from lct_jax.train.run import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _load(name, size="7b"):
    return load_config(f"{CONFIGS / name}.py:size={size}")


def test_full_size_hyper_parameters_follow_the_spec():
    c = _load("text_extension")
    assert (c.model.preset, c.model.rope_theta, c.data.seq_len, c.data.batch_size, c.num_steps) == (
        "qwen2_7b", 1e9, 224_000, 4, 1000)  # fmt: skip
    assert (c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay, c.optim.grad_clip) == (
        0.9,
        0.95,
        1e-8,
        0.1,
        1.0,
    )
    assert dict(c.optim.groups.lm) == dict(lr=1e-5, schedule="constant", warmup=0.0, trainable=True)
    assert not c.data.per_document  # no cross-document mask, continuous positions

    c = _load("align_pretrain")
    assert set(trainable_groups(c.optim)) == {"projector"}
    assert (c.optim.groups.projector.lr, c.optim.groups.projector.schedule, c.optim.groups.projector.warmup) == (
        1e-3, "cosine", 0.03)  # fmt: skip
    assert (c.optim.b2, c.optim.weight_decay, c.data.max_len, c.data.template, c.data.image_mode) == (
        0.999, 0.0, 8192, "plain", "crop")  # fmt: skip

    c = _load("align_finetune")
    assert set(trainable_groups(c.optim)) == {"vision", "projector", "lm"}
    lrs = {k: c.optim.groups[k].lr for k in c.optim.groups}
    assert lrs == {"vision": 2e-6, "projector": 1e-5, "lm": 1e-5}
    assert (c.optim.weight_decay, c.optim.grad_clip, c.data.max_len, c.data.max_tiles, c.data.template) == (
        0.0, 1.0, 32768, 49, "qwen_1_5")  # fmt: skip


def test_typos_and_bad_sizes_are_errors():
    c = _load("text_extension", "tiny")
    with pytest.raises(AttributeError, match="num_step"):
        c.num_step = 5  # noqa: B018 - a typo of num_steps
    with pytest.raises(AttributeError, match="does not exist"):
        c.optim.groups.lm.learning_rate = 1.0
    with pytest.raises(ValueError, match="size="):
        _load("text_extension", "3b")
    c.num_steps = 7
    assert c.optim.total_steps == 7  # schedules follow num_steps


def test_schedules():
    cos = make_schedule(1.0, "cosine", total_steps=100, warmup=0.03)
    assert (
        float(cos(0)) == 0.0 and float(cos(3)) == pytest.approx(1.0) and float(cos(100)) == pytest.approx(0.0)
    )
    # 3 linear warmup steps, then cosine over the remaining 97: 50 steps in, 0.5 * (1 + cos(pi * 50 / 97))
    assert float(cos(53)) == pytest.approx(0.5 * (1 + math.cos(math.pi * 50 / 97)), abs=1e-6)
    const = make_schedule(2.0, "constant", total_steps=10)
    assert float(const(0)) == float(const(9)) == 2.0
    with pytest.raises(ValueError, match="schedule"):
        make_schedule(1.0, "linear", total_steps=10)

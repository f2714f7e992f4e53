"""Random models for tests without running their initializers (eager Flax init compiles every op once: ~5-15 s for
the tiny presets on a 2-core machine; this takes well under a second)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from lct_jax.convert.checkpoint import model_classes, model_from_params


def random_params(kind: str, cfg, seed: int = 0, std: float = 0.02) -> dict:
    """Params of a ``kind`` ('qwen2' | 'longva') model as numpy: norm scales 1, biases 0, the rest N(0, std)."""
    _, cls = model_classes(kind)
    shapes = nnx.state(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), nnx.Param).to_pure_dict()
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(x.shape, x.dtype)
        if name == "bias":
            return np.zeros(x.shape, x.dtype)
        return (std * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree.map_with_path(draw, shapes)


def random_model(kind: str, cfg, seed: int = 0, std: float = 0.02):
    """(model, params): a ``kind`` model holding :func:`random_params`."""
    params = random_params(kind, cfg, seed, std)
    return model_from_params(kind, cfg, params), params

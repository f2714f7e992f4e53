"""Hugging Face CLIP vision tower ⇄ lct_jax: config translation and the weight table.

Python entry point::

    from lct_jax.convert.clip import load_hf_clip
    tower = load_hf_clip("/path/to/clip-vit-large-patch14-336", dtype="float32")
    feats = tower(pixels)              # [B, 576, 1024] = CLIPVisionModel(...).hidden_states[-2][:, 1:]

Accepted directories: a transformers ``CLIPVisionModel`` (config ``model_type: clip_vision_model``; tensors named
``embeddings.*`` in transformers 5, ``vision_model.embeddings.*`` in older releases) or a full ``CLIPModel``
(``model_type: clip`` with a ``vision_config``; its text tower and projections are skipped). The config is read
strictly, like the Qwen2 one: unknown fields are errors.
"""

from __future__ import annotations

import os

import numpy as np

from lct_jax.convert.mapping import (
    FLAT,
    ConversionError,
    Rule,
    Transform,
    linear,
    read_strict_config,
    to_hf,
    to_ours,
)
from lct_jax.convert.qwen2 import read_hf_config
from lct_jax.convert.safetensors_io import SafetensorsDir
from lct_jax.model.clip import CLIPConfig

# PyTorch conv weight OIHW [E, 3, P, P] <-> our patch kernel HWIO [P, P, 3, E]
PATCH_CONV = Transform(
    lambda a, s: a.transpose(2, 3, 1, 0),
    lambda a: a.transpose(3, 2, 0, 1),
    lambda s: (s[3], s[2], s[0], s[1]),
)

_TRANSLATED = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "image_size": "image_size",
    "patch_size": "patch_size",
    "layer_norm_eps": "layer_norm_eps",
}
_REQUIRED = {
    "model_type": ("clip_vision_model",),
    "hidden_act": ("quick_gelu",),
    "num_channels": (3,),
    "attention_dropout": (0.0, 0),
    "dropout": (0.0, 0),
    "architectures": (["CLIPVisionModel"], None),
}
_IGNORED = {
    "dtype",
    "torch_dtype",
    "transformers_version",
    "initializer_range",
    "initializer_factor",
    "projection_dim",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "id2label",
    "label2id",
}


def config_from_hf(hf: dict, **overrides) -> CLIPConfig:
    """Strict HF CLIPVisionConfig dict (or a full CLIP config's ``vision_config``) -> CLIPConfig."""
    if hf.get("model_type") == "clip":
        if "vision_config" not in hf:
            raise ConversionError("config.json: model_type 'clip' without a vision_config")
        hf = {"model_type": "clip_vision_model", **hf["vision_config"]}
    kw = read_strict_config(
        hf, what="CLIP config", translated=_TRANSLATED, required=_REQUIRED, ignored=_IGNORED
    )
    # transformers' defaults for fields a minimal config may omit (CLIPVisionConfig())
    defaults = dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, image_size=224,
                    patch_size=32, layer_norm_eps=1e-5)  # fmt: skip
    return CLIPConfig(**{**defaults, **kw, **overrides})


def config_to_hf(cfg: CLIPConfig, dtype: str = "float32") -> dict:
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_act": "quick_gelu",
        "num_channels": 3,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "torch_dtype": dtype,
    }


def rules(cfg: CLIPConfig, prefix: str = "", ours_prefix: str = "") -> list[Rule]:
    """The CLIP vision weight table; ``prefix`` is the HF key prefix (e.g. ``vision_model.``)."""
    p, o = prefix, ours_prefix
    L = f"{p}encoder.layers.{{i}}."
    table = [
        Rule(f"{p}embeddings.class_embedding", f"{o}class_embed"),
        Rule(f"{p}embeddings.patch_embedding.weight", f"{o}patch_embed/kernel", PATCH_CONV),
        Rule(f"{p}embeddings.position_embedding.weight", f"{o}pos_embed"),
        Rule(f"{p}pre_layrnorm.weight", f"{o}pre_norm/scale"),
        Rule(f"{p}pre_layrnorm.bias", f"{o}pre_norm/bias"),
        Rule(f"{p}post_layernorm.weight", f"{o}post_norm/scale"),
        Rule(f"{p}post_layernorm.bias", f"{o}post_norm/bias"),
        Rule(L + "layer_norm1.weight", f"{o}layers/ln1/scale"),
        Rule(L + "layer_norm1.bias", f"{o}layers/ln1/bias"),
        Rule(L + "layer_norm2.weight", f"{o}layers/ln2/scale"),
        Rule(L + "layer_norm2.bias", f"{o}layers/ln2/bias"),
        Rule(L + "mlp.fc1.weight", f"{o}layers/mlp/fc1/kernel", linear(1)),
        Rule(L + "mlp.fc1.bias", f"{o}layers/mlp/fc1/bias"),
        Rule(L + "mlp.fc2.weight", f"{o}layers/mlp/fc2/kernel", linear(1)),
        Rule(L + "mlp.fc2.bias", f"{o}layers/mlp/fc2/bias"),
    ]
    for name in ("q", "k", "v"):
        table.append(Rule(L + f"self_attn.{name}_proj.weight", f"{o}layers/attn/{name}/kernel", linear(1)))
        table.append(Rule(L + f"self_attn.{name}_proj.bias", f"{o}layers/attn/{name}/bias", FLAT))
    table.append(Rule(L + "self_attn.out_proj.weight", f"{o}layers/attn/o/kernel", linear(2)))
    table.append(Rule(L + "self_attn.out_proj.bias", f"{o}layers/attn/o/bias"))
    return table


def our_shapes(cfg: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """Param path -> shape, from an abstract tower (no allocation)."""
    from flax import nnx

    from lct_jax.convert.mapping import flatten_params
    from lct_jax.model.clip import CLIPVisionTower

    abstract = nnx.eval_shape(lambda: CLIPVisionTower(cfg, rngs=nnx.Rngs(0)))
    return {
        k: tuple(v.shape) for k, v in flatten_params(nnx.state(abstract, nnx.Param).to_pure_dict()).items()
    }


def _vision_prefix(keys: set[str]) -> str:
    """'' for transformers-5 CLIPVisionModel files, 'vision_model.' for older ones and full CLIPModel files."""
    if "embeddings.class_embedding" in keys:
        return ""
    if "vision_model.embeddings.class_embedding" in keys:
        return "vision_model."
    raise ConversionError(
        "no CLIP vision tensors found: expected 'embeddings.class_embedding' or "
        f"'vision_model.embeddings.class_embedding'; found e.g. {sorted(keys)[:5]}"
    )


def hf_to_params(hf_dir: str | os.PathLike, cfg: CLIPConfig | None = None, *, allow_cast: bool = False):
    """(config, nested fp32 params) from an HF CLIPVisionModel or CLIPModel directory (tensors checked)."""
    from lct_jax.convert.mapping import unflatten_params

    hf_cfg = read_hf_config(hf_dir)
    cfg = cfg or config_from_hf(hf_cfg)
    st = SafetensorsDir(hf_dir, allow_cast=allow_cast)
    keys = set(st.keys())
    prefix = _vision_prefix(keys)
    if hf_cfg.get("model_type") == "clip":  # full CLIP: keep only the vision tower's tensors
        keys = {k for k in keys if k.startswith("vision_model.")}
    flat = to_ours(rules(cfg, prefix), st.__getitem__, keys, our_shapes(cfg), cfg.num_layers)
    return cfg, unflatten_params(flat)


def params_to_hf(cfg: CLIPConfig, params: dict, dtype=None, prefix: str = "") -> dict[str, np.ndarray]:
    from lct_jax.convert.mapping import flatten_params

    return to_hf(rules(cfg, prefix), flatten_params(params), cfg.num_layers, dtype=dtype)


def load_hf_clip(hf_dir: str | os.PathLike, **config_overrides):
    """Load an HF CLIP (vision) directory into an lct_jax ``CLIPVisionTower``."""
    from flax import nnx

    from lct_jax.model.clip import CLIPVisionTower

    cfg = config_from_hf(read_hf_config(hf_dir), **config_overrides)
    cfg, params = hf_to_params(hf_dir, cfg)
    abstract = nnx.eval_shape(lambda: CLIPVisionTower(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    import jax

    state.replace_by_pure_dict(jax.tree.map(jax.numpy.asarray, params))
    return nnx.merge(graphdef, state)

"""LongVA (llava_qwen) checkpoints ⇄ lct_jax (spec §10).

CLI (registered through :data:`FORMATS`, picked up by ``python -m lct_jax.convert``)::

    python -m lct_jax.convert import-hf --format longva --hf-dir LongVA-7B --out ckpt/longva7b
    python -m lct_jax.convert export-hf --format longva --ckpt ckpt/longva7b --out LongVA-7B-export  # bf16

Layout (734 tensors for LongVA-7B): the Qwen2 LM keys unprefixed (``model.layers.{i}...``, ``lm_head.weight``),
the CLIP tower under ``model.vision_tower.vision_tower.vision_model.`` (all 24 blocks and ``post_layernorm``, even
though only 23 blocks are used), the projector as ``model.mm_projector.{0,2}.{weight,bias}``. config.json carries
the Qwen2 fields plus the mm_* fields. A tower that is not ViT-L/14-336 (tiny test models) is described by an
extra ``mm_vision_config`` (a CLIPVisionConfig dict), since ``mm_vision_tower`` only names a hub repository.

Python entry points: :func:`hf_to_params`, :func:`params_to_hf`, :func:`export_shapes` (abstract key set and
shapes, no allocation), :func:`init_from_parts` (stage-1 start: a Qwen2 + a CLIP checkpoint + a fresh projector).
"""

from __future__ import annotations

import os

import numpy as np

from lct_jax.convert import clip as clip_convert
from lct_jax.convert import qwen2 as qwen2_convert
from lct_jax.convert.mapping import (
    DTYPES,
    ConversionError,
    Rule,
    flatten_params,
    hf_shapes,
    linear,
    to_hf,
    to_ours,
    unflatten_params,
)
from lct_jax.convert.safetensors_io import SafetensorsDir
from lct_jax.data.unires import canvases
from lct_jax.model.clip import PRESETS as CLIP_PRESETS
from lct_jax.model.longva import LongVAConfig

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
CLIP_L336 = "openai/clip-vit-large-patch14-336"
_KNOWN_TOWERS = {CLIP_L336: CLIP_PRESETS["clip_vit_l14_336"]}

# mm fields with the only values lct_jax implements (checked on import, written on export)
_MM_REQUIRED = {
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_feature": "patch",
    "mm_patch_merge_type": "unires",
    "image_aspect_ratio": "anyres",
    "mm_spatial_pool_mode": "average",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
}
# LLaVA-NeXT training/tokenizer bookkeeping: no effect on the function the weights compute
_MM_IGNORED = {
    "tokenizer_model_max_length", "tokenizer_padding_side", "use_mm_proj", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "mm_tunable_parts", "mm_vision_tower_lr",
    "mm_projector_lr", "vision_tower_pretrained", "mm_resampler_type", "mm_mask_drop_mode",
    "mm_mask_drop_skip_percentage", "mm_mask_drop_ratio", "mm_mask_drop_ratio_upper", "mm_mask_drop_ratio_lower",
    "mm_spatial_pool_out_channels", "image_crop_resolution", "image_split_resolution", "delay_load",
    "add_faster_video", "faster_token_stride", "use_pos_skipping", "pos_skipping_range", "mm_newline_position",
    "tokenizer_class", "image_token_index", "max_window_layers",
}  # fmt: skip
QWEN2_ENDOFTEXT, QWEN2_IM_END = 151643, 151645
TOKENIZER_MODEL_MAX_LENGTH = 1_048_576  # long video: 32768 would truncate inputs (spec §10)


# ------------------------------------------------------------------------------------------------------- config


def config_from_hf(hf: dict, **overrides) -> LongVAConfig:
    """Strict llava_qwen config.json → LongVAConfig."""
    text_fields = {}
    vision = None
    mm = {}
    for key, value in hf.items():
        if key in _MM_REQUIRED:
            if value != _MM_REQUIRED[key]:
                raise ConversionError(
                    f"config.json: {key}={value!r} is not supported (lct_jax implements {_MM_REQUIRED[key]!r})"
                )
        elif key in _MM_IGNORED:
            continue
        elif key in ("mm_vision_tower", "mm_vision_config", "mm_vision_select_layer", "mm_hidden_size",
                     "mm_spatial_pool_stride", "image_grid_pinpoints", "architectures", "model_type"):  # fmt: skip
            mm[key] = value
        else:
            text_fields[key] = value
    if mm.get("model_type", "llava_qwen") != "llava_qwen":
        raise ConversionError(f"config.json: model_type={mm['model_type']!r}, expected 'llava_qwen'")
    if mm.get("architectures", ["LlavaQwenForCausalLM"]) != ["LlavaQwenForCausalLM"]:
        raise ConversionError(
            f"config.json: architectures={mm['architectures']!r}, expected LlavaQwenForCausalLM"
        )
    text = qwen2_convert.config_from_hf({**text_fields, "model_type": "qwen2"})
    if "mm_vision_config" in mm:
        vision = clip_convert.config_from_hf(mm["mm_vision_config"])
    elif mm.get("mm_vision_tower") in _KNOWN_TOWERS:
        vision = _KNOWN_TOWERS[mm["mm_vision_tower"]]
    else:
        raise ConversionError(
            f"config.json: mm_vision_tower={mm.get('mm_vision_tower')!r} is not a tower lct_jax knows "
            f"({sorted(_KNOWN_TOWERS)}); add an mm_vision_config (CLIPVisionConfig fields) to describe it"
        )
    vision = vision.replace(select_layer=int(mm.get("mm_vision_select_layer", -2)))
    if mm.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ConversionError(
            f"config.json: mm_hidden_size={mm['mm_hidden_size']} but the vision tower is {vision.hidden_size} wide"
        )
    cfg = LongVAConfig(text=text, vision=vision, pool_stride=int(mm.get("mm_spatial_pool_stride", 2)))
    pinpoints = mm.get("image_grid_pinpoints")
    if pinpoints is not None and {tuple(p) for p in pinpoints} != set(canvases(cfg.tile)):
        raise ConversionError(
            "config.json: image_grid_pinpoints differ from lct_jax's UniRes canvases (200 pairs (tile·a, tile·b), "
            "a·b ≤ 49, without (tile, tile)); UniRes would produce different tiles"
        )
    return cfg.replace(**overrides) if overrides else cfg


def config_to_hf(cfg: LongVAConfig, dtype: str = "bfloat16", extra: dict | None = None) -> dict:
    hf = qwen2_convert.config_to_hf(cfg.text, dtype, extra)
    hf.update(
        architectures=["LlavaQwenForCausalLM"],
        model_type="llava_qwen",
        mm_hidden_size=cfg.vision.hidden_size,
        mm_vision_select_layer=cfg.vision.select_layer,
        mm_spatial_pool_stride=cfg.pool_stride,
        image_grid_pinpoints=[list(c) for c in canvases(cfg.tile)],
        tokenizer_padding_side="right",
        tokenizer_model_max_length=TOKENIZER_MODEL_MAX_LENGTH,
        **_MM_REQUIRED,
    )
    if cfg.text.vocab_size > QWEN2_IM_END:  # Qwen2 tokenizer ids, unless the imported config said otherwise
        hf.setdefault("bos_token_id", QWEN2_ENDOFTEXT)
        hf.setdefault("eos_token_id", QWEN2_IM_END)
    if extra and extra.get("tokenizer_model_max_length", 0) > TOKENIZER_MODEL_MAX_LENGTH:
        hf["tokenizer_model_max_length"] = extra["tokenizer_model_max_length"]
    neutral = dict(select_layer=-2, dtype="bfloat16", param_dtype="float32", remat="full")
    known = {
        name: t for name, t in _KNOWN_TOWERS.items() if t.replace(**neutral) == cfg.vision.replace(**neutral)
    }
    if known:
        hf["mm_vision_tower"] = next(iter(known))
    else:
        hf["mm_vision_tower"] = "lct_jax/custom-clip"
        vc = clip_convert.config_to_hf(cfg.vision, dtype)
        hf["mm_vision_config"] = {k: v for k, v in vc.items() if k not in ("architectures", "torch_dtype")}
    return hf


# ------------------------------------------------------------------------------------------------------ weights


def rules(cfg: LongVAConfig) -> tuple[list[Rule], list[Rule], list[Rule]]:
    """(LM, vision, projector) tables; the LM and vision ones have different layer counts."""
    lm = qwen2_convert.rules(cfg.text, prefix="", ours_prefix="lm/")
    vision = clip_convert.rules(cfg.vision, prefix=VISION_PREFIX, ours_prefix="vision/")
    projector = [
        Rule("model.mm_projector.0.weight", "projector/fc1/kernel", linear(1)),
        Rule("model.mm_projector.0.bias", "projector/fc1/bias"),
        Rule("model.mm_projector.2.weight", "projector/fc2/kernel", linear(1)),
        Rule("model.mm_projector.2.bias", "projector/fc2/bias"),
    ]
    return lm, vision, projector


def our_shapes(cfg: LongVAConfig) -> dict[str, tuple[int, ...]]:
    """Param path → shape, from an abstract model (no allocation)."""
    from flax import nnx

    from lct_jax.model.longva import LongVA

    abstract = nnx.eval_shape(lambda: LongVA(cfg, rngs=nnx.Rngs(0)))
    return {
        k: tuple(v.shape) for k, v in flatten_params(nnx.state(abstract, nnx.Param).to_pure_dict()).items()
    }


def _split(shapes: dict, prefix: str) -> dict:
    return {k: v for k, v in shapes.items() if k.startswith(prefix)}


def export_shapes(cfg: LongVAConfig) -> dict[str, tuple[int, ...]]:
    """The exported key set with PyTorch shapes, computed abstractly (for the 7B model: 734 keys)."""
    shapes = our_shapes(cfg)
    lm, vision, projector = rules(cfg)
    out = hf_shapes(lm, _split(shapes, "lm/"), cfg.text.num_layers)
    out.update(hf_shapes(vision, _split(shapes, "vision/"), cfg.vision.num_layers))
    out.update(hf_shapes(projector, _split(shapes, "projector/"), 1))
    return out


def hf_to_params(hf_dir: str | os.PathLike, cfg: LongVAConfig | None = None, *, allow_cast: bool = False):
    """(config, nested fp32 params) from a llava_qwen directory; every tensor must be used exactly once (and
    pass the checks of :class:`lct_jax.convert.safetensors_io.SafetensorsDir`)."""
    hf_cfg = qwen2_convert.read_hf_config(hf_dir)
    cfg = cfg or config_from_hf(hf_cfg)
    st = SafetensorsDir(hf_dir, allow_cast=allow_cast)
    keys = set(st.keys())
    shapes = our_shapes(cfg)
    lm, vision, projector = rules(cfg)
    parts = [
        (
            lm,
            _split(shapes, "lm/"),
            cfg.text.num_layers,
            {k for k in keys if not k.startswith(VISION_PREFIX)},
        ),
        (
            vision,
            _split(shapes, "vision/"),
            cfg.vision.num_layers,
            {k for k in keys if k.startswith(VISION_PREFIX)},
        ),
    ]
    proj_keys = {k for k in keys if k.startswith("model.mm_projector.")}
    parts[0] = (*parts[0][:3], parts[0][3] - proj_keys)
    parts.append((projector, _split(shapes, "projector/"), 1, proj_keys))
    flat = {}
    for table, part_shapes, n_layers, part_keys in parts:
        flat.update(to_ours(table, st.__getitem__, part_keys, part_shapes, n_layers))
    return cfg, unflatten_params(flat)


def params_to_hf(cfg: LongVAConfig, params: dict, dtype=None) -> dict[str, np.ndarray]:
    flat = flatten_params(params)
    lm, vision, projector = rules(cfg)
    out = to_hf(lm, _split(flat, "lm/"), cfg.text.num_layers, dtype=dtype)
    out.update(to_hf(vision, _split(flat, "vision/"), cfg.vision.num_layers, dtype=dtype))
    out.update(to_hf(projector, _split(flat, "projector/"), 1, dtype=dtype))
    want = set(export_shapes(cfg))
    if set(out) != want:
        raise ConversionError(f"export key set mismatch: extra {sorted(set(out) - want)[:5]}, "
                              f"missing {sorted(want - set(out))[:5]}")  # fmt: skip
    return out


def init_from_parts(qwen2_hf_dir, clip_hf_dir, *, seed: int = 0, pool_stride: int = 2):
    """Stage-1 starting point: (config, params) from an HF Qwen2 directory, an HF CLIP (vision) directory and a
    freshly initialized projector."""
    import jax
    from flax import nnx

    from lct_jax.model.projector import Projector

    text_cfg, text_params = qwen2_convert.hf_to_params(qwen2_hf_dir)
    vision_cfg, vision_params = clip_convert.hf_to_params(clip_hf_dir)
    cfg = LongVAConfig(text=text_cfg, vision=vision_cfg, pool_stride=pool_stride)
    proj = Projector(vision_cfg.hidden_size, text_cfg.hidden_size, dtype=np.float32, param_dtype=np.float32,
                     rngs=nnx.Rngs(seed), init_std=text_cfg.init_std)  # fmt: skip
    proj_params = jax.tree.map(np.asarray, nnx.state(proj, nnx.Param).to_pure_dict())
    return cfg, {"vision": vision_params, "projector": proj_params, "lm": text_params}


# ---------------------------------------------------------------------------------------------------------- CLI


def _import(hf_dir, allow_cast=False):
    hf_cfg = qwen2_convert.read_hf_config(hf_dir)
    cfg, params = hf_to_params(hf_dir, config_from_hf(hf_cfg), allow_cast=allow_cast)
    return "longva", cfg, params, hf_cfg


def _export(cfg, params, dtype, hf_extra):
    return config_to_hf(cfg, dtype, hf_extra), params_to_hf(cfg, params, DTYPES[dtype])


FORMATS = {"longva": (_import, _export)}

"""Hugging Face Qwen2 ⇄ lct_jax: config translation and the weight table.

Python entry point::

    from lct_jax.convert.qwen2 import load_hf_qwen2
    model = load_hf_qwen2("/path/to/Qwen2-7B-Instruct", dtype="bfloat16")
    logits = model(input_ids)          # float32[B, T, V]

The HF config is read strictly: every field is either translated, checked against the only value we support,
or known to be informational (ignored). Anything else is an error, so a new HF feature is never silently dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lct_jax.convert.mapping import FLAT, ConversionError, Rule, linear, read_strict_config, to_hf, to_ours
from lct_jax.convert.safetensors_io import SafetensorsDir
from lct_jax.model.qwen2 import Qwen2Config

# HF field -> Qwen2Config field
_TRANSLATED = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "intermediate_size": "intermediate_size",
    "rms_norm_eps": "rms_norm_eps",
    "tie_word_embeddings": "tie_word_embeddings",
    "head_dim": "head_dim",
}
# fields with the only values lct_jax implements
_REQUIRED = {
    "model_type": ("qwen2",),
    "hidden_act": ("silu",),
    "use_sliding_window": (False,),
    "attention_dropout": (0.0, 0),
    "rope_scaling": (None,),
    "architectures": (["Qwen2ForCausalLM"], None),
}
# informational: do not change the function computed by the model
_IGNORED = {
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "initializer_range",
    "max_position_embeddings",
    "sliding_window",
    "max_window_layers",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}
# these are also written back on export when present at import
_PRESERVED_ON_EXPORT = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")


def _rope_theta(value, kw):
    kw["rope_theta"] = float(value)


def _rope_parameters(value, kw):
    if value.get("rope_type", "default") != "default" or set(value) - {"rope_type", "rope_theta"}:
        raise ConversionError(
            f"config.json: rope_parameters={value} is not supported (only rope_type 'default' with rope_theta)"
        )
    kw["rope_theta"] = float(value["rope_theta"])


def _layer_types(value, kw):
    if any(t != "full_attention" for t in value):
        raise ConversionError(f"config.json: layer_types={value} is not supported (only full_attention)")


def _attention_bias(value, kw):
    if value is not True:
        raise ConversionError(f"config.json: attention_bias={value!r}; Qwen2 has q/k/v biases")


_SPECIAL = {
    "rope_theta": _rope_theta,
    "rope_parameters": _rope_parameters,
    "layer_types": _layer_types,
    "attention_bias": _attention_bias,
}


def config_from_hf(hf: dict, **overrides) -> Qwen2Config:
    """Strict HF Qwen2 config.json -> Qwen2Config."""
    kw = read_strict_config(
        hf, what="config.json", translated=_TRANSLATED, required=_REQUIRED, ignored=_IGNORED, special=_SPECIAL
    )
    for required in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
        if required not in kw:
            raise ConversionError(f"config.json: missing required field for {required}")
    kw.setdefault("num_kv_heads", kw["num_heads"])
    kw.setdefault("tie_word_embeddings", False)
    kw.update(overrides)
    return Qwen2Config(**kw)


def config_to_hf(cfg: Qwen2Config, dtype: str, extra: dict | None = None) -> dict:
    hf = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": dtype,
    }
    if extra:
        hf.update({k: extra[k] for k in _PRESERVED_ON_EXPORT if k in extra})
    return hf


def rules(cfg: Qwen2Config, prefix: str = "", ours_prefix: str = "") -> list[Rule]:
    """The Qwen2 weight table. ``prefix``/``ours_prefix`` let LongVA reuse it for its language model."""
    L = f"{prefix}model.layers.{{i}}."
    o = ours_prefix
    table = [
        Rule(f"{prefix}model.embed_tokens.weight", f"{o}embed"),
        Rule(f"{prefix}model.norm.weight", f"{o}norm/scale"),
        Rule(L + "input_layernorm.weight", f"{o}layers/input_norm/scale"),
        Rule(L + "post_attention_layernorm.weight", f"{o}layers/post_attn_norm/scale"),
        Rule(L + "self_attn.q_proj.weight", f"{o}layers/attn/q/kernel", linear(1)),
        Rule(L + "self_attn.q_proj.bias", f"{o}layers/attn/q/bias", FLAT),
        Rule(L + "self_attn.k_proj.weight", f"{o}layers/attn/k/kernel", linear(1)),
        Rule(L + "self_attn.k_proj.bias", f"{o}layers/attn/k/bias", FLAT),
        Rule(L + "self_attn.v_proj.weight", f"{o}layers/attn/v/kernel", linear(1)),
        Rule(L + "self_attn.v_proj.bias", f"{o}layers/attn/v/bias", FLAT),
        Rule(L + "self_attn.o_proj.weight", f"{o}layers/attn/o/kernel", linear(2)),
        Rule(L + "mlp.gate_proj.weight", f"{o}layers/mlp/gate/kernel", linear(1)),
        Rule(L + "mlp.up_proj.weight", f"{o}layers/mlp/up/kernel", linear(1)),
        Rule(L + "mlp.down_proj.weight", f"{o}layers/mlp/down/kernel", linear(1)),
    ]
    if not cfg.tie_word_embeddings:
        table.append(Rule(f"{prefix}lm_head.weight", f"{o}lm_head", linear(1)))
    return table


def our_shapes(cfg: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Param path -> shape, from an abstract model (no allocation)."""
    from flax import nnx

    from lct_jax.convert.mapping import flatten_params
    from lct_jax.model.qwen2 import Qwen2

    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    return {
        k: tuple(v.shape) for k, v in flatten_params(nnx.state(abstract, nnx.Param).to_pure_dict()).items()
    }


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from e


def hf_to_params(hf_dir: str | os.PathLike, cfg: Qwen2Config | None = None, *, allow_cast: bool = False):
    """(config, nested fp32 params) from an HF Qwen2 directory (tensors checked, see
    :class:`lct_jax.convert.safetensors_io.SafetensorsDir`)."""
    from lct_jax.convert.mapping import unflatten_params

    cfg = cfg or config_from_hf(read_hf_config(hf_dir))
    st = SafetensorsDir(hf_dir, allow_cast=allow_cast)
    keys = set(st.keys())
    table = rules(cfg)
    if cfg.tie_word_embeddings and "lm_head.weight" in keys:
        # some tied checkpoints still store the head; it must equal the embedding
        if not np.array_equal(st["lm_head.weight"], st["model.embed_tokens.weight"]):
            raise ConversionError(
                "config says tie_word_embeddings=true but lm_head.weight differs from "
                "model.embed_tokens.weight"
            )
        keys.discard("lm_head.weight")
    flat = to_ours(table, st.__getitem__, keys, our_shapes(cfg), cfg.num_layers)
    return cfg, unflatten_params(flat)


def params_to_hf(cfg: Qwen2Config, params: dict, dtype=None) -> dict[str, np.ndarray]:
    from lct_jax.convert.mapping import flatten_params

    return to_hf(rules(cfg), flatten_params(params), cfg.num_layers, dtype=dtype)


def load_hf_qwen2(hf_dir: str | os.PathLike, **config_overrides):
    """Load an HF Qwen2 directory into an lct_jax ``Qwen2`` (params fp32; compute dtype per ``dtype=``)."""
    from lct_jax.convert.checkpoint import model_from_params

    cfg = config_from_hf(read_hf_config(hf_dir), **config_overrides)
    cfg, params = hf_to_params(hf_dir, cfg)
    return model_from_params("qwen2", cfg, params)

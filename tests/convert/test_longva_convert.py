"""LongVA (llava_qwen) export/import: spec key set, round trip, transformers reload, CLIP import, bad input."""

import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModel, Qwen2ForCausalLM
from transformers import Qwen2Config as HFQwen2Config

from lct_jax.convert import clip as clip_convert
from lct_jax.convert import longva as lv
from lct_jax.convert.__main__ import main as convert_main
from lct_jax.convert.checkpoint import (
    model_from_params,
    params_of,
    restore_params_numpy,
    save_model_checkpoint,
)
from lct_jax.convert.mapping import ConversionError
from lct_jax.convert.safetensors_io import SafetensorsDir
from lct_jax.model.longva import PRESETS, LongVA

VP = "model.vision_tower.vision_tower.vision_model."


def spec_key_set(lm_layers=28, vision_layers=24, tied=False):
    """The spec §10 key list, written out independently of the conversion tables."""
    keys = {"model.embed_tokens.weight", "model.norm.weight"} | ({"lm_head.weight"} if not tied else set())
    for i in range(lm_layers):
        p = f"model.layers.{i}."
        keys |= {p + f"self_attn.{x}_proj.{w}" for x in "qkv" for w in ("weight", "bias")}
        keys |= {p + "self_attn.o_proj.weight"} | {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    keys |= {
        VP + f"embeddings.{x}"
        for x in ("class_embedding", "patch_embedding.weight", "position_embedding.weight")
    }
    keys |= {VP + f"{n}.{w}" for n in ("pre_layrnorm", "post_layernorm") for w in ("weight", "bias")}
    for i in range(vision_layers):
        p = f"{VP}encoder.layers.{i}."
        keys |= {p + f"self_attn.{x}_proj.{w}" for x in ("q", "k", "v", "out") for w in ("weight", "bias")}
        keys |= {p + f"layer_norm{j}.{w}" for j in (1, 2) for w in ("weight", "bias")}
        keys |= {p + f"mlp.fc{j}.{w}" for j in (1, 2) for w in ("weight", "bias")}
    keys |= {f"model.mm_projector.{j}.{w}" for j in (0, 2) for w in ("weight", "bias")}
    return keys


def test_7b_export_key_set_and_shapes_abstract():
    shapes = lv.export_shapes(PRESETS["longva_7b"])  # eval_shape only: nothing allocated
    assert len(shapes) == 734
    assert set(shapes) == spec_key_set()
    assert sum(math.prod(s) for s in shapes.values()) == 7_935_646_208
    want = {
        "model.embed_tokens.weight": (152064, 3584),
        "lm_head.weight": (152064, 3584),
        "model.layers.0.self_attn.q_proj.weight": (3584, 3584),
        "model.layers.0.self_attn.k_proj.weight": (512, 3584),
        "model.layers.0.self_attn.k_proj.bias": (512,),
        "model.layers.27.self_attn.o_proj.weight": (3584, 3584),
        "model.layers.0.mlp.gate_proj.weight": (18944, 3584),
        "model.layers.0.mlp.down_proj.weight": (3584, 18944),
        VP + "embeddings.class_embedding": (1024,),
        VP + "embeddings.patch_embedding.weight": (1024, 3, 14, 14),
        VP + "embeddings.position_embedding.weight": (577, 1024),
        VP + "encoder.layers.23.self_attn.out_proj.weight": (1024, 1024),
        VP + "encoder.layers.0.mlp.fc1.weight": (4096, 1024),
        VP + "post_layernorm.weight": (1024,),
        "model.mm_projector.0.weight": (3584, 1024),
        "model.mm_projector.2.weight": (3584, 3584),
        "model.mm_projector.2.bias": (3584,),
    }
    assert {k: shapes[k] for k in want} == want


def test_7b_config_json():
    hf = lv.config_to_hf(PRESETS["longva_7b"])
    assert hf["architectures"] == ["LlavaQwenForCausalLM"] and hf["torch_dtype"] == "bfloat16"
    assert (hf["rope_theta"], hf["vocab_size"], hf["tie_word_embeddings"]) == (1e9, 152064, False)
    assert hf["mm_vision_tower"] == "openai/clip-vit-large-patch14-336" and "mm_vision_config" not in hf
    assert (hf["mm_hidden_size"], hf["mm_vision_select_layer"], hf["mm_spatial_pool_stride"]) == (1024, -2, 2)
    assert hf["mm_projector_type"] == "mlp2x_gelu" and hf["mm_patch_merge_type"] == "unires"
    assert hf["mm_vision_select_feature"] == "patch" and hf["image_aspect_ratio"] == "anyres"
    assert hf["mm_spatial_pool_mode"] == "average" and hf["mm_use_im_start_end"] is False
    assert hf["mm_use_im_patch_token"] is False and hf["tokenizer_padding_side"] == "right"
    assert hf["tokenizer_model_max_length"] > 500_000 and len(hf["image_grid_pinpoints"]) == 200
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (151643, 151645)
    assert lv.config_from_hf(json.loads(json.dumps(hf))) == PRESETS["longva_7b"]


def random_tiny(seed=0):
    cfg = PRESETS["tiny"].replace(dtype="float32")
    model = LongVA(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
                          params_of(model))  # fmt: skip
    return cfg, params


def export(tmp_path, cfg, params, dtype="float32"):
    ckpt, out = tmp_path / f"ckpt_{dtype}", tmp_path / f"hf_{dtype}"
    save_model_checkpoint(ckpt, "longva", cfg, params)
    args = ["export-hf", "--ckpt", str(ckpt), "--out", str(out), "--format", "longva"]
    assert convert_main(args + ["--dtype", dtype, "--max-shard-size-gb", str(60e3 / 2**30)]) == 0
    return ckpt, out


def test_round_trip_bit_exact_and_bf16_default(tmp_path):
    cfg, params = random_tiny()
    _, out = export(tmp_path, cfg, params)
    st = SafetensorsDir(out)
    assert set(st.keys()) == spec_key_set(cfg.text.num_layers, cfg.vision.num_layers)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    back = tmp_path / "reimported"
    assert convert_main(["import-hf", "--format", "longva", "--hf-dir", str(out), "--out", str(back)]) == 0
    got = restore_params_numpy(back / "params")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, params)
    assert all(
        a.tobytes() == b.tobytes() for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True)
    )
    # default dtype is bf16: every tensor bf16, and re-import gives exactly the bf16-rounded params
    ckpt = tmp_path / "ckpt_float32"
    out16 = tmp_path / "hf_bf16"
    assert convert_main(["export-hf", "--ckpt", str(ckpt), "--out", str(out16), "--format", "longva"]) == 0
    st16 = SafetensorsDir(out16)
    assert {st16[k].dtype for k in st16.keys()} == {np.dtype(ml_dtypes.bfloat16)}
    assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, p16 = lv.hf_to_params(out16)
    rounded = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), p16, rounded)


def test_exported_parts_load_in_transformers(tmp_path):
    cfg, params = random_tiny(1)
    _, out = export(tmp_path, cfg, params)
    hf_cfg = json.loads((out / "config.json").read_text())
    st = SafetensorsDir(out)
    tensors = {k: torch.from_numpy(np.array(st[k])) for k in st.keys()}
    model = model_from_params("longva", cfg, params)

    # LM keys -> Qwen2ForCausalLM
    qcfg = HFQwen2Config(**{k: v for k, v in hf_cfg.items() if not k.startswith(("mm_", "image_", "tokenizer_"))
                            and k not in ("model_type", "architectures")})  # fmt: skip
    qcfg._attn_implementation = "eager"
    lm = Qwen2ForCausalLM(qcfg).eval()
    lm_sd = {k: v for k, v in tensors.items() if not k.startswith((VP, "model.mm_projector."))}
    missing, unexpected = lm.load_state_dict(lm_sd, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    ids = np.random.default_rng(0).integers(0, cfg.text.vocab_size, (2, 12))
    with torch.no_grad():
        want = lm(torch.from_numpy(ids)).logits.numpy()
    got = np.asarray(model.lm(jnp.asarray(ids, jnp.int32)))
    err_lm = np.abs(got - want).max()

    # vision keys -> CLIPVisionModel (transformers 5 names them without the vision_model. prefix)
    vis = CLIPVisionModel(CLIPVisionConfig(**hf_cfg["mm_vision_config"])).eval()
    vis.load_state_dict({k[len(VP) :]: v for k, v in tensors.items() if k.startswith(VP)}, strict=True)
    px = np.random.default_rng(1).standard_normal((2, cfg.tile, cfg.tile, 3)).astype(np.float32)
    with torch.no_grad():
        hs = vis(torch.from_numpy(px.transpose(0, 3, 1, 2)), output_hidden_states=True).hidden_states[-2][
            :, 1:
        ]
    err_vis = np.abs(np.asarray(model.vision(jnp.asarray(px))) - hs.numpy()).max()

    # projector keys -> nn.Sequential(Linear, GELU, Linear)
    proj = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    proj.load_state_dict(
        {k[len("model.mm_projector.") :]: v for k, v in tensors.items() if "mm_projector" in k}
    )
    with torch.no_grad():
        pw = proj(hs).numpy()
    err_proj = np.abs(np.asarray(model.projector(jnp.asarray(hs.numpy()))) - pw).max()
    print(
        f"transformers reload: LM logits {err_lm:.2e}, CLIP features {err_vis:.2e}, projector {err_proj:.2e}"
    )
    assert err_lm <= 1e-5 and err_vis <= 1e-5 and err_proj <= 1e-5


def test_import_clip_checkpoints(tmp_path):
    vcfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56,
                patch_size=14)  # fmt: skip
    torch.manual_seed(0)
    vis = CLIPVisionModel(CLIPVisionConfig(**vcfg)).eval()
    vis.save_pretrained(tmp_path / "vision")
    full = CLIPModel(HFCLIPConfig(vision_config=vcfg, text_config=dict(hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2, vocab_size=50)))  # fmt: skip
    full.vision_model.load_state_dict(vis.state_dict())
    full.save_pretrained(tmp_path / "full")
    px = np.random.default_rng(0).standard_normal((1, 56, 56, 3)).astype(np.float32)
    with torch.no_grad():
        want = vis(torch.from_numpy(px.transpose(0, 3, 1, 2)), output_hidden_states=True).hidden_states[-2][
            :, 1:
        ]
    for d in ("vision", "full"):
        tower = clip_convert.load_hf_clip(tmp_path / d, dtype="float32")
        assert np.abs(np.asarray(tower(jnp.asarray(px))) - want.numpy()).max() <= 1e-5, d


def test_init_from_parts(tmp_path, hf_qwen2):
    qdir, _ = hf_qwen2(hidden_size=32)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=28, patch_size=14)).save_pretrained(tmp_path / "clip")  # fmt: skip
    cfg, params = lv.init_from_parts(qdir, tmp_path / "clip")
    assert cfg.tokens_per_tile == 1 and cfg.vision.select_layer == -2
    model = model_from_params("longva", cfg.replace(dtype="float32"), params)
    ids = jnp.asarray([[1, 2, -200, 3]], jnp.int32)
    logits, _ = model(ids, pixels=jnp.zeros((1, 1, 28, 28, 3)), pixel_mask=jnp.ones((1, 1), bool),
                      visual_index=jnp.asarray([[-1, -1, 0, -1]], jnp.int32))  # fmt: skip
    assert logits.shape == (1, 4, 96) and np.isfinite(np.asarray(logits)).all()


def test_bad_checkpoints_fail_loudly(tmp_path):
    cfg, params = random_tiny()
    _, out = export(tmp_path, cfg, params)
    hf_cfg = json.loads((out / "config.json").read_text())
    for field, value, match in [
        ("mm_projector_type", "linear", "mm_projector_type='linear' is not supported"),
        ("mm_patch_merge_type", "spatial_unpad", "mm_patch_merge_type"),
        ("mm_vision_config", None, "mm_vision_tower='lct_jax/custom-clip' is not a tower"),
        ("some_new_feature", 1, "some_new_feature"),
    ]:
        bad = dict(hf_cfg)
        if value is None:
            del bad[field]
        else:
            bad[field] = value
        with pytest.raises(ConversionError, match=match):
            lv.config_from_hf(bad)
    # an extra tensor (a newline embedding this variant does not have) is named in the error
    st = SafetensorsDir(out)
    tensors = {k: np.array(st[k]) for k in st.keys()}
    tensors["model.image_newline"] = np.zeros(64, np.float32)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    save_file(tensors, str(bad_dir / "model.safetensors"))
    (bad_dir / "config.json").write_text(json.dumps(hf_cfg))
    with pytest.raises(ConversionError, match="model.image_newline"):
        lv.hf_to_params(bad_dir)
    # and the CLI reports it without leaving an output directory
    assert (
        convert_main(
            ["import-hf", "--format", "longva", "--hf-dir", str(bad_dir), "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert not (tmp_path / "x").exists()

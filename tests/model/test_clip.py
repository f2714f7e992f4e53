"""CLIP vision tower vs transformers' CLIPVisionModel (fp32, random weights incl. norms and biases)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPVisionConfig, CLIPVisionModel

from lct_jax.convert import clip as clip_convert
from lct_jax.convert.mapping import to_ours, unflatten_params
from lct_jax.model.clip import PRESETS, CLIPConfig, CLIPVisionTower


def random_hf_clip(cfg: CLIPConfig, seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    hf = CLIPVisionModel(clip_convert_config(cfg)).eval()
    with torch.no_grad():  # every tensor random, so norms and biases are exercised too
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return hf


def clip_convert_config(cfg: CLIPConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(**{k: v for k, v in clip_convert.config_to_hf(cfg).items() if k != "torch_dtype"})


def tower_from_hf(hf: CLIPVisionModel, cfg: CLIPConfig) -> CLIPVisionTower:
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    flat = to_ours(
        clip_convert.rules(cfg), sd.__getitem__, sd.keys(), clip_convert.our_shapes(cfg), cfg.num_layers
    )
    tower = nnx.eval_shape(lambda: CLIPVisionTower(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(tower)
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, unflatten_params(flat)))
    return nnx.merge(graphdef, state)


def hf_hidden_states(hf, pixels_nhwc: np.ndarray):
    with torch.no_grad():
        out = hf(torch.from_numpy(pixels_nhwc.transpose(0, 3, 1, 2)), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize(
    "cfg",
    [
        PRESETS["tiny"].replace(dtype="float32"),
        CLIPConfig(
            image_size=42,
            patch_size=7,
            hidden_size=48,
            num_layers=2,
            num_heads=3,
            intermediate_size=80,
            dtype="float32",
        ),  # fmt: skip
    ],
    ids=["tiny", "tiny_odd"],
)
def test_tiny_tower_matches_transformers(cfg):
    hf = random_hf_clip(cfg)
    tower = tower_from_hf(hf, cfg)
    pixels = np.random.default_rng(1).normal(size=(3, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    want = hf_hidden_states(hf, pixels)
    got = np.asarray(jax.jit(lambda m, x: m(x))(tower, jnp.asarray(pixels)))
    assert got.shape == (3, cfg.num_patches, cfg.hidden_size)
    err = np.abs(got - want[-2][:, 1:]).max()
    print(f"tiny tower max|diff| vs hidden_states[-2][:, 1:] = {err:.2e}")
    assert err <= 1e-5
    # every intermediate depth too (embeddings + pre_layrnorm at 0, and the last block that LongVA skips)
    for n in range(cfg.num_layers + 1):
        hs = np.asarray(tower.hidden_states(jnp.asarray(pixels), n))
        np.testing.assert_allclose(hs, want[n], atol=1e-5, rtol=0)


def test_select_layer_and_unused_params():
    cfg = PRESETS["tiny"].replace(dtype="float32")
    assert cfg.feature_layer == cfg.num_layers - 1
    tower = CLIPVisionTower(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, cfg.image_size, cfg.image_size, 3)), jnp.float32)
    base = tower(x)
    # the last block and post_layernorm exist but must not change the features
    graphdef, state = nnx.split(tower)
    state["post_norm"]["scale"][...] = state["post_norm"]["scale"][...] * 3.0
    state["layers"]["mlp"]["fc2"]["bias"][...] = state["layers"]["mlp"]["fc2"]["bias"][...].at[-1].add(5.0)
    np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, state)(x)), np.asarray(base))
    # ... whereas block 0 does
    state["layers"]["mlp"]["fc2"]["bias"][...] = state["layers"]["mlp"]["fc2"]["bias"][...].at[0].add(5.0)
    assert np.abs(np.asarray(nnx.merge(graphdef, state)(x)) - np.asarray(base)).max() > 1e-3


def test_bad_pixels_shape_is_a_clear_error():
    cfg = PRESETS["tiny"]
    tower = CLIPVisionTower(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"expected \[B, 56, 56, 3\]"):
        tower(jnp.zeros((1, 3, 56, 56)))


def test_full_size_param_count_abstract():
    tower = nnx.eval_shape(lambda: CLIPVisionTower(PRESETS["clip_vit_l14_336"], rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(tower, nnx.Param)))
    assert n == 303_507_456  # openai/clip-vit-large-patch14-336 vision tower incl. post_layernorm
    out = jax.eval_shape(lambda m, x: m(x), tower, jax.ShapeDtypeStruct((2, 336, 336, 3), jnp.float32))
    assert out.shape == (2, 576, 1024)


@pytest.mark.slow
def test_full_size_tower_matches_transformers():
    """ViT-L/14-336 shape config, random weights, fp32 (~1 min on 2 cores)."""
    cfg = PRESETS["clip_vit_l14_336"].replace(dtype="float32", remat="none")
    torch.manual_seed(0)
    hf = CLIPVisionModel(clip_convert_config(cfg)).eval()  # transformers' own init for the matrices ...
    with torch.no_grad():  # ... plus random norm scales and biases (its init leaves them at 1 and 0)
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    tower = tower_from_hf(hf, cfg)
    pixels = np.random.default_rng(2).normal(size=(2, 336, 336, 3)).astype(np.float32)
    want = hf_hidden_states(hf, pixels)[-2][:, 1:]
    del hf
    got = np.asarray(jax.jit(lambda m, x: m(x))(tower, jnp.asarray(pixels)))
    err = np.abs(got - want).max()
    print(
        f"ViT-L/14-336 max|diff| = {err:.2e} (features max|x| = {np.abs(want).max():.2f}, "
        f"std {want.std():.3f})"
    )
    assert err <= 1e-5

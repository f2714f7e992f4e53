"""LongVA forward vs a hand composition; projector/pool vs torch; 7B preset shapes (abstract)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lct_jax.model.longva import IMAGE_TOKEN, PRESETS, LongVA
from lct_jax.model.projector import Projector, pool2x2
from lct_jax.model.qwen2 import count_params


def tiny_model(seed=0, **text_overrides):
    cfg = PRESETS["tiny"].replace(dtype="float32")
    cfg = cfg.replace(text=cfg.text.replace(**text_overrides))
    model = LongVA(cfg, rngs=nnx.Rngs(seed))
    # non-trivial norms/biases everywhere (init leaves them at 1 / 0)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        name = "/".join(str(p) for p in path)
        if name.endswith("bias") or "norm" in name or name.endswith("scale"):
            return x + jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype)
        return x

    params = jax.tree_util.tree_map_with_path(perturb, nnx.state(model, nnx.Param).to_pure_dict())
    state.replace_by_pure_dict(params)
    return cfg, nnx.merge(graphdef, state)


def mixed_batch(cfg, seed=0):
    """Row 0: an image of 3 tiles (+1 unused tile slot); row 1: a video of 4 frames; row 2: text only."""
    rng = np.random.default_rng(seed)
    tpt, s, m, t = cfg.tokens_per_tile, cfg.tile, 4, 28
    vocab = cfg.text.vocab_size
    inputs = rng.integers(0, vocab, (3, t)).astype(np.int32)
    visual_index = np.full((3, t), -1, np.int32)
    # row 0: 5 text, 3 tiles * 4 tokens at 5..16, then text
    inputs[0, 5 : 5 + 3 * tpt] = IMAGE_TOKEN
    visual_index[0, 5 : 5 + 3 * tpt] = np.arange(3 * tpt)
    # row 1: 2 text, 4 frames * 4 tokens at 2..17, then text
    inputs[1, 2 : 2 + 4 * tpt] = IMAGE_TOKEN
    visual_index[1, 2 : 2 + 4 * tpt] = np.arange(4 * tpt)
    pixels = rng.standard_normal((3, m, s, s, 3)).astype(np.float32)
    pixel_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    pixels[~pixel_mask] = np.nan  # padding must never leak into anything
    layout = {0: (5, 3), 1: (2, 4), 2: None}  # row -> (first visual slot, tiles)
    return dict(inputs=inputs, visual_index=visual_index, pixels=pixels, pixel_mask=pixel_mask), layout


def numpy_pool(x, stride=2):
    """Independent 2x2 average pool over a row-major [g*g, D] grid, written as explicit windows."""
    n, p, d = x.shape
    g = int(round(p**0.5))
    grid = x.reshape(n, g, g, d)
    out = np.zeros((n, g // stride, g // stride, d), np.float64)
    for i in range(g // stride):
        for j in range(g // stride):
            win = grid[:, i * stride : (i + 1) * stride, j * stride : (j + 1) * stride]
            out[:, i, j] = win.mean(axis=(1, 2))
    return out.reshape(n, -1, d)


def test_forward_equals_hand_composition():
    cfg, model = tiny_model()
    batch, layout = mixed_batch(cfg)
    tpt = cfg.tokens_per_tile
    logits, inter = jax.jit(lambda m, b: m(**b))(model, {k: jnp.asarray(v) for k, v in batch.items()})
    logits = np.asarray(logits)
    assert logits.shape == (3, 28, cfg.text.vocab_size) and np.isfinite(logits).all()
    assert inter["visual_tokens"].shape == (3, 4 * tpt, cfg.text.hidden_size)

    # by hand: one tile at a time through tower, projector (two dense layers + erf GELU), numpy pool, then the
    # spliced sequence built by concatenation and run through the decoder alone
    tower = jax.jit(lambda m, x: m.vision(x))
    decoder = jax.jit(lambda m, x: m.lm(inputs_embeds=x))
    p = nnx.state(model, nnx.Param).to_pure_dict()
    embed = np.asarray(p["lm"]["embed"])
    w1, b1 = np.asarray(p["projector"]["fc1"]["kernel"]), np.asarray(p["projector"]["fc1"]["bias"])
    w2, b2 = np.asarray(p["projector"]["fc2"]["kernel"]), np.asarray(p["projector"]["fc2"]["bias"])
    for row in range(3):
        pieces, ids = [], batch["inputs"][row]
        if layout[row] is None:
            seq = embed[ids]
        else:
            start, n = layout[row]
            toks = []
            for k in range(n):
                feats = np.asarray(tower(model, jnp.asarray(batch["pixels"][row, k : k + 1])))[0]  # [P, E]
                h = feats @ w1 + b1
                h = 0.5 * h * (1 + torch.erf(torch.from_numpy(h / np.sqrt(2))).numpy())
                toks.append(numpy_pool((h @ w2 + b2)[None])[0])  # [tpt, D]
            pieces = [embed[ids[:start]], *toks, embed[ids[start + n * tpt :]]]
            seq = np.concatenate(pieces).astype(np.float32)
        want = np.asarray(decoder(model, jnp.asarray(seq[None])))[0]
        err = np.abs(logits[row] - want).max()
        print(f"row {row}: max|logits - hand composition| = {err:.2e}")
        assert err <= 1e-5
    # unused tile slots give zero tokens; encode() is the same hidden state the logits came from
    np.testing.assert_array_equal(np.asarray(inter["visual_tokens"])[0, 3 * tpt :], 0.0)
    hidden = jax.jit(lambda m, b: m.encode(**b))(model, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(np.asarray(model.logits(hidden)), logits, atol=1e-5)


def test_splice_follows_a_token_permutation():
    """visual_index/positions travel with the tokens (zigzag): permuted inputs give permuted logits."""
    cfg, model = tiny_model(1)
    batch, _ = mixed_batch(cfg, seed=1)
    t = batch["inputs"].shape[1]
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), batch["inputs"].shape)
    perm = np.random.default_rng(0).permutation(t)
    fwd = jax.jit(lambda m, b: m(**b)[0])
    ref = np.asarray(fwd(model, {**batch, "positions": positions}))
    permuted = {k: (v[:, perm] if v.shape[:2] == (3, t) else v) for k, v in batch.items()}
    got = np.asarray(fwd(model, {**permuted, "positions": positions[:, perm]}))
    np.testing.assert_allclose(got, ref[:, perm], atol=1e-5)


def test_precomputed_visual_tokens_and_errors():
    cfg, model = tiny_model()
    batch, _ = mixed_batch(cfg)
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    # V-NIAH path: precomputed visual tokens give the same logits as pixels
    visual = model.visual_tokens(b["pixels"], b["pixel_mask"])
    a, _ = model(b["inputs"], visual_tokens=visual, visual_index=b["visual_index"])
    c, _ = model(**b)
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6)
    text_only, inter = model(jnp.maximum(b["inputs"], 0))
    assert "visual_tokens" not in inter and text_only.shape == c.shape
    # shape errors are raised while tracing, before any compute
    with pytest.raises(ValueError, match="without visual_index"):
        jax.eval_shape(lambda m: m(b["inputs"], pixels=b["pixels"]), model)
    with pytest.raises(ValueError, match=r"pixel_mask shape \(3, 2\)"):
        jax.eval_shape(lambda m: m(**{**b, "pixel_mask": b["pixel_mask"][:, :2]}), model)


def test_projector_and_pool_match_torch():
    e, d, g = 12, 20, 6
    proj = Projector(e, d, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    torch.manual_seed(0)  # torch's default Linear init: large enough for the GELU to bend
    tproj = torch.nn.Sequential(torch.nn.Linear(e, d), torch.nn.GELU(), torch.nn.Linear(d, d))
    proj.fc1.kernel[...] = jnp.asarray(tproj[0].weight.detach().numpy().T)
    proj.fc1.bias[...] = jnp.asarray(tproj[0].bias.detach().numpy())
    proj.fc2.kernel[...] = jnp.asarray(tproj[2].weight.detach().numpy().T)
    proj.fc2.bias[...] = jnp.asarray(tproj[2].bias.detach().numpy())
    x = np.random.default_rng(0).standard_normal((2, g * g, e)).astype(np.float32) * 3
    got = np.asarray(pool2x2(proj(jnp.asarray(x))))
    with torch.no_grad():  # LLaVA's get_2dPool: [N, P, D] -> [N, D, g, g] -> avg_pool2d(2) -> [N, P/4, D]
        y = tproj(torch.from_numpy(x)).reshape(2, g, g, d).permute(0, 3, 1, 2)
        want = torch.nn.functional.avg_pool2d(y, 2).permute(0, 2, 3, 1).reshape(2, -1, d).numpy()
    assert got.shape == (2, 9, d)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # order matters: pooling before the projector is measurably different
    pre = np.asarray(proj(pool2x2(jnp.asarray(x))))
    assert np.abs(pre - got).max() > 5e-2
    with pytest.raises(ValueError, match="square patch grid"):
        pool2x2(jnp.zeros((1, 10, 4)))


def test_longva_7b_param_count_abstract():
    cfg = PRESETS["longva_7b"]
    abstract = nnx.eval_shape(lambda: LongVA(cfg, rngs=nnx.Rngs(0)))
    assert count_params(nnx.state(abstract, nnx.Param)) == 7_935_646_208
    assert (cfg.tile, cfg.tokens_per_tile, cfg.text.rope_theta) == (336, 144, 1e9)
    b, m, t = 1, 2, 320
    out = jax.eval_shape(
        lambda mdl, i, px, pm, vi: mdl.encode(i, pixels=px, pixel_mask=pm, visual_index=vi),
        abstract,
        jax.ShapeDtypeStruct((b, t), jnp.int32),
        jax.ShapeDtypeStruct((b, m, 336, 336, 3), jnp.float32),
        jax.ShapeDtypeStruct((b, m), jnp.bool_),
        jax.ShapeDtypeStruct((b, t), jnp.int32),
    )
    assert out.shape == (b, t, 3584)


def test_config_dict_round_trip_and_overrides():
    import dataclasses

    from lct_jax.model.longva import LongVAConfig

    cfg = PRESETS["longva_7b"].replace(dtype="float32")
    assert cfg.text.dtype == cfg.vision.dtype == "float32"
    assert LongVAConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown LongVAConfig fields"):
        LongVAConfig.from_dict({**dataclasses.asdict(cfg), "image_newline": True})


@pytest.mark.parametrize("mesh_sizes", [(2, 2, 2), (1, 8, 1)])
def test_sharded_forward_equals_unsharded(mesh_sizes):
    """data=2 x seq=2 x model=2 with ring attention: tiles spread over data x seq (act_tiles), tokens over seq
    (ring), heads over model; same logits and visual tokens as one device. seq=8: 3 rows x 4 tiles = 12 tiles
    on 8 devices (the tile batch is padded to 16 and the padding dropped)."""
    from lct_jax import sharding

    cfg, model = tiny_model(2, attention="auto")  # auto = ring on the seq=2 mesh, dense without one
    batch, _ = mixed_batch(cfg, seed=2)
    if mesh_sizes[0] == 2:
        batch = {k: np.concatenate([v, v[1:2]]) for k, v in batch.items()}  # B=4 divides data=2
    else:  # T=28 -> 32 text tokens, a multiple of seq=8
        extra = {"inputs": np.ones((3, 4), np.int32), "visual_index": np.full((3, 4), -1, np.int32)}
        batch = {k: np.concatenate([v, extra[k]], 1) if k in extra else v for k, v in batch.items()}
    fwd = jax.jit(lambda m, b: m(**b))
    want, want_inter = fwd(model, {k: jnp.asarray(v) for k, v in batch.items()})

    mesh = sharding.make_mesh(*mesh_sizes)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    names = {"pixels": ("act_batch",), "pixel_mask": ("act_batch",)}
    placed = {
        k: jax.device_put(v, sharding.named_sharding(mesh, names.get(k, ("act_batch", "act_seq"))))
        for k, v in batch.items()
    }
    with jax.set_mesh(mesh):
        got, inter = jax.jit(lambda s, b: nnx.merge(graphdef, s)(**b))(state, placed)
    assert state["vision"]["layers"]["attn"]["q"]["kernel"][...].sharding.spec == jax.sharding.PartitionSpec(
        None, ("data", "seq"), "model", None
    )
    np.testing.assert_allclose(
        np.asarray(inter["visual_tokens"]), np.asarray(want_inter["visual_tokens"]), atol=1e-5
    )
    err = np.abs(np.asarray(got) - np.asarray(want)).max()
    print(f"sharded (ring) vs unsharded max|diff| = {err:.2e}")
    assert err <= 1e-5


def test_uint8_pixels_are_normalized_on_device_like_the_host():
    """Loaders ship uint8 tiles; the model's on-device CLIP normalization equals the host's unires.normalize."""
    from lct_jax.data.unires import normalize
    from lct_jax.model.longva import normalize_pixels

    every_byte = np.stack(np.meshgrid(*[np.arange(256)] * 3, indexing="ij"), -1)[::5, ::3].astype(np.uint8)
    np.testing.assert_allclose(np.asarray(normalize_pixels(jnp.asarray(every_byte))), normalize(every_byte),
                               rtol=0, atol=1e-6)  # fmt: skip
    cfg, model = tiny_model()
    batch, _ = mixed_batch(cfg)
    rgb = np.random.default_rng(3).integers(0, 256, batch["pixels"].shape, dtype=np.uint8)
    got, _ = model(**{**batch, "pixels": jnp.asarray(rgb)})
    want, _ = model(**{**batch, "pixels": jnp.asarray(normalize(rgb))})
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5
    assert not np.allclose(np.asarray(got), np.asarray(model(**{**batch, "pixels": jnp.zeros_like(rgb)})[0]))

"""V-NIAH frame encoding: the letterbox geometry written out, and the batched encoder against the model itself."""

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from PIL import Image

from lct_jax.data.unires import normalize
from lct_jax.eval.encode import LETTERBOX_COLOR, FrameEncoder, letterbox
from lct_jax.model.longva import PRESETS, LongVA
from lct_jax.sharding import make_mesh


def test_letterbox_worked_example():
    # 4 wide x 2 high, red: padded to 4x4 with one mean-coloured row above and below
    assert LETTERBOX_COLOR == (122, 116, 104)
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    out = letterbox(img, 4)  # already square after padding at side 4: no resampling
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], np.tile(LETTERBOX_COLOR, (4, 1)))
    np.testing.assert_array_equal(out[3], np.tile(LETTERBOX_COLOR, (4, 1)))
    np.testing.assert_array_equal(out[1:3], np.tile((255, 0, 0), (2, 4, 1)))
    tall = letterbox(Image.new("RGB", (3, 9), (0, 0, 255)), 9)  # 3 columns of pad each side
    np.testing.assert_array_equal(tall[:, :3], np.tile(LETTERBOX_COLOR, (9, 3, 1)))
    np.testing.assert_array_equal(tall[:, 3:6], np.tile((0, 0, 255), (9, 3, 1)))
    assert letterbox(Image.new("RGB", (10, 5)), 8).shape == (8, 8, 3)


def test_frame_encoder_equals_the_model_on_one_and_eight_devices():
    cfg = PRESETS["tiny"].replace(dtype="float32")
    model = LongVA(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (11, cfg.tile, cfg.tile, 3), dtype=np.uint8)
    ref = np.asarray(model.encode_images(normalize(frames)))  # host normalization, one call, no batching
    got = FrameEncoder(model, batch_size=4)(frames)  # 3 batches, the last padded with 1 frame
    assert got.shape == (11, cfg.tokens_per_tile, cfg.text.hidden_size)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    mesh = make_mesh(2, 4, 1)
    with jax.set_mesh(mesh):
        sharded = FrameEncoder(model, batch_size=8, mesh=mesh)(frames)
    np.testing.assert_allclose(sharded, ref, rtol=0, atol=1e-5)


def test_frame_encoder_never_touches_the_language_model():
    """Only the tower and projector go to the devices: a model whose LM params are mere shapes (never loaded)
    encodes exactly like the full model (how a 7B LM stays off the accelerator while the haystack is built)."""
    cfg = PRESETS["tiny"].replace(dtype="float32")
    model = LongVA(cfg, rngs=nnx.Rngs(0))
    towers = nnx.Any(nnx.PathContains("vision"), nnx.PathContains("projector"))
    hollow = nnx.eval_shape(lambda: LongVA(cfg, rngs=nnx.Rngs(1)))
    nnx.update(hollow, nnx.state(model, towers))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(hollow.lm)))
    frames = np.random.default_rng(1).integers(0, 256, (5, cfg.tile, cfg.tile, 3), dtype=np.uint8)
    mesh = make_mesh(8, 1, 1)
    encoder = FrameEncoder(hollow, batch_size=8, mesh=mesh)
    np.testing.assert_array_equal(encoder(frames), FrameEncoder(model, batch_size=8, mesh=mesh)(frames))
    # the towers were put on the mesh once, replicated (not re-sent with every batch)
    replicated = NamedSharding(mesh, PartitionSpec())
    assert all(x.sharding.is_equivalent_to(replicated, x.ndim) for x in jax.tree.leaves(encoder._state))

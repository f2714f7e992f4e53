"""Qwen2 decoder vs transformers Qwen2ForCausalLM (fp32), on meshes, and the 7B shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from lct_jax import sharding
from lct_jax.convert.qwen2 import load_hf_qwen2
from lct_jax.model.qwen2 import PRESETS, Qwen2, Qwen2Config, count_params

TOL = 1e-5


def torch_logits(model, ids, positions):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), position_ids=torch.from_numpy(positions).long())
    return out.logits.numpy()


@pytest.mark.parametrize(
    "heads,kv_heads,tied,theta,offset",
    [
        (4, 4, False, 1e6, 0),  # GQA ratio 1
        (4, 2, True, 1e6, 0),  # ratio 2, tied head
        (7, 1, False, 1e9, 150_000),  # ratio 7, LongVA theta, positions beyond 100K
        (14, 2, True, 1e6, 123_457),  # ratio 7 (0.5B-like), tied, Qwen2 theta, positions beyond 100K
    ],
)
def test_logits_match_transformers(hf_qwen2, heads, kv_heads, tied, theta, offset):
    hidden = 8 * heads
    d, ref = hf_qwen2(
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_size=hidden,
        tie_word_embeddings=tied,
        rope_theta=theta,
    )
    model = load_hf_qwen2(d, dtype="float32")
    assert model.cfg.rope_theta == theta and model.cfg.tie_word_embeddings == tied
    rng = np.random.default_rng(0)
    b, t = 3, 17
    ids = rng.integers(0, 96, (b, t)).astype(np.int32)
    positions = (offset + np.arange(t)[None] + 1000 * np.arange(b)[:, None]).astype(np.int32)
    want = torch_logits(ref, ids, positions)
    got = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(positions)))
    assert got.shape == (b, t, 96)
    err = np.abs(got - want).max()
    assert err <= TOL, f"max abs logits difference {err:.2e} > {TOL}"
    assert np.abs(want).max() > 0.1  # the comparison is not between near-zero tensors


def test_inputs_embeds_equal_input_ids():
    model = Qwen2(PRESETS["tiny"].replace(dtype="float32"), rngs=nnx.Rngs(1))
    ids = jnp.arange(24).reshape(2, 12) % 512
    np.testing.assert_array_equal(
        np.asarray(model(ids)), np.asarray(model(inputs_embeds=model.embed_tokens(ids)))
    )


MESH_CFG = Qwen2Config(
    vocab_size=256,
    hidden_size=64,
    num_layers=2,
    num_heads=16,
    num_kv_heads=8,
    head_dim=8,
    intermediate_size=128,
    dtype="float32",
    attention="dense",
)


@pytest.mark.parametrize("seq,model_par", [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_sharded_logits_equal_unsharded(seq, model_par):
    model = Qwen2(MESH_CFG, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 32), 0, 256)
    want = np.asarray(model(ids))

    mesh = sharding.make_mesh(data=1, seq=seq, model=model_par)
    graphdef, state = nnx.split(model)
    shardings = sharding.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    ids_sharded = jax.device_put(ids, sharding.named_sharding(mesh, ("act_batch", "act_seq")))

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    with jax.set_mesh(mesh):
        got = forward(state, ids_sharded)
    # the params really are sharded over the mesh
    q = state["layers"]["attn"]["q"]["kernel"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, ("data", "seq"), "model", None)
    err = np.abs(np.asarray(got) - want).max()
    assert err <= 1e-5, f"{seq=} {model_par=}: max abs difference {err:.2e}"


def test_qwen2_7b_shapes_without_allocation():
    abstract = nnx.eval_shape(lambda: Qwen2(PRESETS["qwen2_7b"], rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param).to_pure_dict()
    assert count_params(params) == 7_615_616_512
    layers = params["layers"]
    assert params["embed"].shape == (152064, 3584)
    assert params["lm_head"].shape == (3584, 152064)
    assert layers["attn"]["q"]["kernel"].shape == (28, 3584, 28, 128)
    assert layers["attn"]["k"]["kernel"].shape == (28, 3584, 4, 128)
    assert layers["attn"]["k"]["bias"].shape == (28, 4, 128)
    assert layers["attn"]["o"]["kernel"].shape == (28, 28, 128, 3584)
    assert layers["mlp"]["gate"]["kernel"].shape == (28, 3584, 18944)
    assert layers["mlp"]["down"]["kernel"].shape == (28, 18944, 3584)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name,count", [("qwen2_0_5b", 494_032_768), ("qwen2_1_5b", 1_543_714_304)])
def test_small_presets_param_counts(name, count):
    abstract = nnx.eval_shape(lambda: Qwen2(PRESETS[name], rngs=nnx.Rngs(0)))
    assert count_params(nnx.state(abstract, nnx.Param)) == count


def test_mesh_errors_name_sizes():
    with pytest.raises(ValueError, match="3 x seq=.*"):
        sharding.make_mesh(data=3, seq=1, model=1)
    with pytest.raises(ValueError, match="does not divide 8"):
        sharding.make_mesh(data=3, seq=-1, model=1)
    mesh = sharding.make_mesh(seq=1, model=8)
    # heads the model axis cannot split are replicated over it (the ring attention pads / repeats them) ...
    cfg = MESH_CFG.replace(num_heads=4, num_kv_heads=4, head_dim=16)
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    q = sharding.state_shardings(nnx.state(abstract), mesh)["layers"]["attn"]["q"]["kernel"]
    assert q.spec == jax.sharding.PartitionSpec(None, ("data", "seq"), None, None)
    # ... any other dimension that does not divide is an error naming it
    abstract = nnx.eval_shape(lambda: Qwen2(MESH_CFG.replace(intermediate_size=12), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"size 12, which does not divide by mesh axes model"):
        sharding.state_shardings(nnx.state(abstract), mesh)
    model = Qwen2(MESH_CFG, rngs=nnx.Rngs(0))
    with jax.set_mesh(sharding.make_mesh(seq=8, model=1)), pytest.raises(ValueError, match="seq axis"):
        jax.eval_shape(lambda: model(jnp.zeros((1, 12), jnp.int32)))


@pytest.mark.tpu
def test_abstract_tpu_topology_mesh():
    from jax.experimental.topologies import get_topology_desc

    topo = get_topology_desc(
        platform="tpu",
        topology_name="v5e:2x2",
        chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
        wrap=(False, False, False),
    )
    mesh = sharding.make_mesh(seq=-1, model=2, devices=topo.devices)
    assert dict(mesh.shape) == {"data": 1, "seq": 2, "model": 2}
    assert mesh.devices.flat[0].platform == "tpu"

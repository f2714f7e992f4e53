"""Blockwise feed-forward (token_chunks) equals the plain MLP in value and gradient; chunk counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lct_jax.model.layers import divisors, pick_num_chunks
from lct_jax.model.qwen2 import MLP, PRESETS
from lct_jax.sharding import make_mesh

CFG = PRESETS["tiny"].replace(dtype="float32")


def _value_and_grads(chunk, x, mesh=None):
    mlp = MLP(CFG.replace(mlp_chunk=chunk), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(mlp)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)

    @jax.jit
    def f(params, x):
        y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
        return y, vjp(cot)

    if mesh is None:
        return f(params, x)
    with jax.set_mesh(mesh):
        return f(params, x)


@pytest.mark.parametrize("chunk,seq", [(4, 1), (3, 1), (2, 4)])
def test_blockwise_mlp_equals_plain_mlp(chunk, seq):
    """fp32: output, input gradient and weight gradients equal the unchunked MLP (32 tokens per row; 4 chunks of
    8, chunks of 4 (3 rounds up to a divisor), and on a seq=4 mesh 4 chunks of each shard's 8 tokens)."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, CFG.hidden_size)), jnp.float32)
    want = _value_and_grads(0, x)
    mesh = make_mesh(1, seq, 1, devices=jax.devices()[:seq]) if seq > 1 else None
    got = _value_and_grads(chunk, x, mesh)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=2e-6)


def test_blockwise_mlp_really_chunks():
    """The chunked MLP's compiled program never holds [T, F]: its temp memory is a fraction of the plain one's."""
    x = jax.ShapeDtypeStruct((1, 4096, CFG.hidden_size), jnp.float32)

    def temp(chunk):
        mlp = MLP(CFG.replace(mlp_chunk=chunk, intermediate_size=1024), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(mlp)
        loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(params, x).lower().compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain, chunked = temp(0), temp(256)
    hidden = 4096 * 1024 * 4  # one [T, F] fp32 intermediate
    assert plain >= hidden and chunked * 4 < plain, (plain, chunked)


def test_chunk_counts():
    assert divisors(36) == [1, 2, 3, 4, 6, 9, 12, 18, 36]
    assert pick_num_chunks(16_777_216 // 256, 2048) == 32
    assert pick_num_chunks(152064, 16384, multiple_of=8) == 11  # 11 vocabulary chunks of 13824 columns

"""pallas_tpu compiles for real TPU topologies from this CPU (libtpu, compile only), inside the ring, fwd + bwd.

Command (needs the [tpu] extra; ~1 min on 2 cores):

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 .venv/bin/pytest -m tpu tests/kernels/test_pallas_tpu_compile.py -q

(``ALLOW_MULTIPLE_LIBTPU_LOAD`` lets several processes on one host load libtpu; without it a second one fails
with "Internal error when accessing libtpu multi-process lockfile".)
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lct_jax.ops.ring_attention import ring_attention
from lct_jax.sharding import make_mesh

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

TOPOLOGIES = [("v5e:2x2", "default", (2, 2, 1)), ("v5p:2x2x1", "megacore", (2, 2, 1))]


@pytest.mark.tpu
@pytest.mark.parametrize("name,chip_config,bounds", TOPOLOGIES)
def test_pallas_tpu_ring_compiles_for_tpu(name, chip_config, bounds):
    topologies = pytest.importorskip("jax.experimental.topologies")
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=name, chip_config_name=chip_config, chips_per_host_bounds=bounds,
            num_slices=1, wrap=(False, False, False),
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - no libtpu: skip cleanly
        pytest.skip(f"no TPU compiler available: {e}")
    mesh = make_mesh(data=1, seq=2, model=-1, devices=topo.devices)
    b, t, n, kh, h = 1, 2048, 28, 4, 128  # LongVA-7B attention heads; 1024 local tokens per seq shard
    sd = lambda shape, dt, spec: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))
    qkv_spec, tok_spec = P("data", "seq", "model", None), P("data", "seq")
    q = sd((b, t, n, h), jnp.bfloat16, qkv_spec)
    kv = sd((b, t, kh, h), jnp.bfloat16, qkv_spec)
    pos = sd((b, t), jnp.int32, tok_spec)

    def grads(q, k, v, pos, seg):
        loss = lambda q, k, v: jnp.sum(
            ring_attention(q, k, v, pos, seg, kernel="pallas_tpu", interpret=False).astype(jnp.float32)
        )
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    with jax.set_mesh(mesh):
        compiled = jax.jit(grads).trace(q, kv, kv, pos, pos).lower().compile()
    text = compiled.as_text()
    # forward hop kernel (in the scan and after it) + dK/dV and dQ kernels, all lowered to Mosaic
    assert text.count("tpu_custom_call") >= 4, text.count("tpu_custom_call")
    assert compiled.memory_analysis().peak_memory_in_bytes > 0


@pytest.mark.tpu
def test_pallas_tpu_hop_compiles_for_a_long_local_length():
    """One forward + backward hop at 256K local tokens on v5p: the old [T/bq, S/bk] int32 visibility table would
    need 1024 x 512 x 4 B = 2 MiB of SMEM (more than a v5p core has); the per-block ranges need 18 KiB."""
    topologies = pytest.importorskip("jax.experimental.topologies")
    from lct_jax.kernels import pallas_tpu  # noqa: PLC0415
    from lct_jax.kernels.blocks import block_ranges, init_carry  # noqa: PLC0415

    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name="v5p:2x2x1", chip_config_name="megacore",
            chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False),
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - no libtpu: skip cleanly
        pytest.skip(f"no TPU compiler available: {e}")
    mesh = make_mesh(data=1, seq=1, model=-1, devices=topo.devices[:1])
    t, h, g = 256 * 1024, 128, 7
    q = jax.ShapeDtypeStruct((1, 1, g, t, h), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    k = jax.ShapeDtypeStruct((1, 1, t, h), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    pos = jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=NamedSharding(mesh, P()))
    kw = dict(scale=h**-0.5, block_q=256, block_k=512)

    def hop(q, k, pos):
        ranges = block_ranges(pos, pos, pos, pos, 256, 512)
        o, m, l = pallas_tpu.fwd_hop(q, k, k, pos, pos, pos, pos, ranges, *init_carry(q), **kw)
        zk = jnp.zeros(k.shape, jnp.float32)
        return pallas_tpu.bwd_hop(q, k, k, pos, pos, pos, pos, ranges, q, m, l, o, zk, zk, **kw)

    with jax.set_mesh(mesh):
        compiled = jax.jit(hop).trace(q, k, pos).lower().compile()
    assert compiled.as_text().count("tpu_custom_call") == 3

"""The ``ringattention`` package (RingAttention authors, PyPI 0.1.2) as an independent oracle. Tests only.

Its ``__init__`` calls ``jax.lib.xla_bridge.get_backend()``, which jax >= 0.9 removed; a stand-in module with
that one function makes the import work. Only its pure-JAX ring is used (its Pallas kernels target a pre-2025 API).
Its quirks, handled here: equal q and kv head counts (K/V are repeated to N heads for it, here only), segment ids
at full global length (replicated into its shard_map), causal masking by *global array index* (so it is only
comparable on the contiguous layout with positions increasing inside each segment), ``check_vma=False``.
"""

from __future__ import annotations

import importlib
import sys
import types

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def import_ringattention():
    """Return ``ringattention.ringattention_jax.ring_attention``, installing the xla_bridge stand-in if needed."""
    if not hasattr(jax.lib, "xla_bridge"):
        shim = types.ModuleType("jax.lib.xla_bridge")
        shim.get_backend = lambda platform=None: types.SimpleNamespace(platform=jax.default_backend())
        sys.modules["jax.lib.xla_bridge"] = shim
        jax.lib.xla_bridge = shim
    # the package rebinds the name ``ringattention_jax`` to the function; take the submodule itself
    return importlib.import_module("ringattention.ringattention_jax").ring_attention


def oracle_ring_attention(q, k, v, segment_ids=None, *, chunk: int | None = None):
    """Causal ring attention by the ``ringattention`` package on global q [B, T, N, H], k/v [B, T, K, H].

    Call inside jit under ``jax.set_mesh(mesh)`` with a ``seq`` axis; contiguous layout only.
    """
    ring = import_ringattention()
    mesh = jax.sharding.get_abstract_mesh()
    n, kh = q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, n // kh, axis=2), jnp.repeat(v, n // kh, axis=2)  # its ring needs N == K
    t_local = q.shape[1] // mesh.shape["seq"]
    chunk = chunk or t_local
    kwargs = dict(
        causal_block_size=1,
        deterministic=True,
        dropout_rng=None,
        attn_pdrop=0.0,
        query_chunk_size=chunk,
        key_chunk_size=chunk,
        dtype=jnp.float32,
        policy=jax.checkpoint_policies.nothing_saveable,
        precision=jax.lax.Precision.HIGHEST,
        prevent_cse=True,
    )

    def body(q, k, v, seg):
        return ring(q, k, v, None, seg, None, "seq", True, kwargs)

    spec = P("data", "seq", "model", None)
    return jax.shard_map(
        body, mesh=mesh, in_specs=(spec, spec, spec, P() if segment_ids is not None else None), out_specs=spec,
        check_vma=False,
    )(q, k, v, segment_ids)  # fmt: skip

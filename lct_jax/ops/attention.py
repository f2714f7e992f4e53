"""Attention entry point: one function for the model, dense reference or ring.

Axis alphabet: B batch, T query length, S key length, N query heads, K kv heads, G = N // K groups, H head dim.

Masking comes from per-token positions and segment ids, never from array indices: key s is visible to query t
iff ``kv_pos[s] <= q_pos[t]`` and ``kv_seg[s] == q_seg[t]``. That makes any token permutation (zigzag layout for
ring attention) correct as long as positions and segment ids travel with the tokens. Rows whose keys are all
masked return zeros, not NaN.
"""

from __future__ import annotations

import jax.numpy as jnp

ATTENTION_IMPLS = ("dense", "ring")


def causal_mask(q_pos, kv_pos, q_seg=None, kv_seg=None):
    """bool[B, T, S]: key visible to query (position-causal, same segment)."""
    mask = kv_pos[:, None, :] <= q_pos[:, :, None]
    if q_seg is not None:
        mask &= q_seg[:, :, None] == kv_seg[:, None, :]
    return mask


def dense_attention(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None):
    """Reference attention in fp32, GQA by grouping (no K/V repeat).

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] with K dividing N; q_pos: int[B, T]; kv_pos: int[B, S];
      q_seg/kv_seg: optional int[B, T]/[B, S].
    Returns:
      [B, T, N, H] in q.dtype.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    if n % kh:
        raise ValueError(f"query heads {n=} must be a multiple of kv heads {kh=}")
    qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32)) * h**-0.5  # [B, K, G, T, S]
    mask = causal_mask(q_pos, kv_pos, q_seg, kv_seg)[:, None, None]  # [B, 1, 1, T, S]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l == 0.0, 1.0, l)
    o = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(jnp.float32))  # [B, T, K, G, H]
    return o.reshape(b, t, n, h).astype(q.dtype)


def attention(q, k, v, positions, segment_ids=None, *, impl: str = "dense", **ring_options):
    """Causal self-attention over a (possibly sequence-sharded) batch.

    Args:
      q: [B, T, N, H]; k, v: [B, T, K, H]; positions: int[B, T]; segment_ids: optional int[B, T].
      impl: ``'dense'`` (reference, any sharding; XLA gathers the sequence) or ``'ring'`` (ring attention over
        the mesh's ``seq`` axis); ``ring_options`` (e.g. ``kernel='xla'|'pallas_tpu'|'pallas_gpu'``) go to
        :func:`lct_jax.ops.ring_attention.ring_attention`.
    """
    if impl == "dense":
        return dense_attention(q, k, v, positions, positions, segment_ids, segment_ids)
    if impl == "ring":
        from lct_jax.ops.ring_attention import ring_attention  # noqa: PLC0415 - optional heavy path

        return ring_attention(q, k, v, positions, segment_ids, **ring_options)
    raise ValueError(f"unknown attention {impl=}; expected one of {ATTENTION_IMPLS}")

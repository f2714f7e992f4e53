"""Blockwise jnp ring-hop kernel ('xla'): runs on every backend, the reference the Pallas kernels must match.

Layouts and masking: :mod:`lct_jax.kernels.blocks`. Query blocks are visited with ``lax.map`` and key blocks with
``lax.scan``; a block whose pair the block ranges rule out is skipped by ``lax.cond`` (no matmul, no exp), which is what
makes the zigzag layout balance work across shards. Nothing larger than one [B, K, G, bq, bk] score block is live.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lct_jax.kernels.blocks import MASK_VALUE, visible_mask


def _split(x, axis: int, block: int):
    """Cut ``axis`` into blocks and move the block index to the front: [..., L, ...] → [L/blk, ..., blk, ...]."""
    shape = x.shape[:axis] + (x.shape[axis] // block, block) + x.shape[axis + 1 :]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _merge(x, axis: int):
    """Inverse of :func:`_split`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def _scores(q, k, qp, kp, qs, ks, scale):
    """q [B, K, G, bq, H], k [B, K, bk, H] → (s f32[B, K, G, bq, bk] masked, mask bool[B, 1, 1, bq, bk])."""
    s = jnp.einsum("bkgqh,bksh->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    mask = visible_mask(qp, kp, qs, ks)[:, None, None]  # [B, 1, 1, bq, bk]
    return jnp.where(mask, s, MASK_VALUE), mask


def _visible_rows(ranges):
    """int32[nq, nk]: a block pair runs if it may be visible in any batch row (the jnp kernel computes a block for
    all rows at once); formed from the O(T / block) ranges inside the fused op."""
    return ranges.table().any(0).astype(jnp.int32)


def fwd_hop(q, k, v, q_pos, kv_pos, q_seg, kv_seg, ranges, o, m, l, *, scale, block_q, block_k, **_):
    """One hop of the forward: fold K/V [B, K, S, H] into the online-softmax carry (o, m, l)."""
    qb, ob, mb, lb = (
        _split(q, 3, block_q),
        _split(o, 3, block_q),
        _split(m, 3, block_q),
        _split(l, 3, block_q),
    )
    qpb, qsb = _split(q_pos, 1, block_q), _split(q_seg, 1, block_q)  # [nq, B, bq]
    kb, vb = _split(k, 2, block_k), _split(v, 2, block_k)  # [nk, B, K, bk, H]
    kpb, ksb = _split(kv_pos, 1, block_k), _split(kv_seg, 1, block_k)  # [nk, B, bk]
    vis = _visible_rows(ranges)  # [nq, nk]

    def one_q_block(args):
        q_i, qp, qs, carry, vis_row = args

        def step(carry, xs):
            k_j, v_j, kp, ks, run = xs

            def compute(carry):
                o_i, m_i, l_i = carry
                s, mask = _scores(q_i, k_j, qp, kp, qs, ks, scale)
                m_new = jnp.maximum(m_i, s.max(-1))  # [B, K, G, bq]
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                alpha = jnp.exp(m_i - m_new)
                l_new = alpha * l_i + p.sum(-1)
                pv = jnp.einsum(
                    "bkgqs,bksh->bkgqh", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32
                )
                return alpha[..., None] * o_i + pv, m_new, l_new

            return lax.cond(run > 0, compute, lambda c: c, carry), None

        carry, _ = lax.scan(step, carry, (kb, vb, kpb, ksb, vis_row))
        return carry

    o, m, l = lax.map(one_q_block, (qb, qpb, qsb, (ob, mb, lb), vis))
    return _merge(o, 3), _merge(m, 3), _merge(l, 3)


def bwd_hop(
    q,
    k,
    v,
    q_pos,
    kv_pos,
    q_seg,
    kv_seg,
    ranges,
    do,
    lse,
    delta,
    dq,
    dk,
    dv,
    *,
    scale,
    block_q,
    block_k,
    **_,
):
    """One hop of the backward: recompute p from lse, add this K/V block's share to dq and to dk, dv."""
    qb, dob, lseb, deltab, dqb = (_split(x, 3, block_q) for x in (q, do, lse, delta, dq))
    qpb, qsb = _split(q_pos, 1, block_q), _split(q_seg, 1, block_q)
    kb, vb, dkb, dvb = (_split(x, 2, block_k) for x in (k, v, dk, dv))  # [nk, B, K, bk, H]
    kpb, ksb = _split(kv_pos, 1, block_k), _split(kv_seg, 1, block_k)
    vis = _visible_rows(ranges)  # [nq, nk]
    nk = kb.shape[0]

    def one_q_block(carry, xs):
        dkb, dvb = carry  # [nk, B, K, bk, H] f32, carried whole so each q block adds into them in place
        q_i, do_i, lse_i, delta_i, dq_i, qp, qs, vis_row = xs

        def step(carry, j):
            def compute(carry):
                dq_i, dkb, dvb = carry
                k_j, v_j = kb[j], vb[j]
                s, mask = _scores(q_i, k_j, qp, kpb[j], qs, ksb[j], scale)
                p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)  # [B, K, G, bq, bk]
                dp = jnp.einsum("bkgqh,bksh->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_i[..., None]) * scale
                dq_i = dq_i + jnp.einsum(
                    "bkgqs,bksh->bkgqh", ds.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32
                )
                dk_j = jnp.einsum(
                    "bkgqs,bkgqh->bksh", ds.astype(q_i.dtype), q_i, preferred_element_type=jnp.float32
                )
                dv_j = jnp.einsum(
                    "bkgqs,bkgqh->bksh", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32
                )
                return dq_i, dkb.at[j].add(dk_j), dvb.at[j].add(dv_j)

            return lax.cond(vis_row[j] > 0, compute, lambda c: c, carry), None

        (dq_i, dkb, dvb), _ = lax.scan(step, (dq_i, dkb, dvb), jnp.arange(nk))
        return (dkb, dvb), dq_i

    (dkb, dvb), dqb = lax.scan(one_q_block, (dkb, dvb), (qb, dob, lseb, deltab, dqb, qpb, qsb, vis))
    return _merge(dqb, 3), _merge(dkb, 2), _merge(dvb, 2)

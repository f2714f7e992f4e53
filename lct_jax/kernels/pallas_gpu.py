"""Pallas GPU (Triton) ring-hop kernels: forward, backward dK/dV, backward dQ.

Layout contract: :mod:`lct_jax.kernels.blocks`. Triton programs run in parallel (no sequential grid axis), so the
reduction over blocks is a ``fori_loop`` inside each program and skipped blocks are a ``lax.cond`` on the
visibility table formed from the block ranges:

    forward  grid (B, K*G, T/bq): one query head's q block, loop over kv blocks (kv head = query head // G)
    dK/dV    grid (B, K, S/bk):   one kv block, loop over its G query heads and the q blocks
    dQ       grid (B, K*G, T/bq): one query head's q block, loop over kv blocks

Each program reads K/V of its own kv head directly (GQA without repeating K/V in memory). The ring's carry enters
through aliased inputs. Without a GPU the kernels run with ``interpret=True`` (tests do; see
benchmarks/ring_attention.py for the GPU throughput command).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lct_jax.kernels.blocks import MASK_VALUE

NT_DIMS = (((1,), (1,)), ((), ()))  # a [M, H] . b [N, H] -> [M, N]
TN_DIMS = (((0,), (0,)), ((), ()))  # a [M, N] . b [M, H] -> [N, H]
NN_DIMS = (((1,), (0,)), ((), ()))  # a [M, K] . b [K, N] -> [M, N]


def _dot(a, b, dims=NN_DIMS):
    """fp32 accumulate with an explicit precision (a global 'highest' default must not reach bf16 operands)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _params(interpret, head_dim):
    return dict(
        compiler_params=plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2),
        interpret=interpret,
    )


def _scores(q, k, qp, qs, kp, ks, scale):
    """q [bq, H], k [bk, H], query [bq] / key [bk] positions and segments → (masked s f32[bq, bk], mask)."""
    s = _dot(q, k, NT_DIMS) * scale
    mask = (kp[None, :] <= qp[:, None]) & (ks[None, :] == qs[:, None])
    return jnp.where(mask, s, MASK_VALUE), mask


def _fwd_kernel(vis_ref, q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, o_in, m_in, l_in, o_ref, m_ref, l_ref,
                *, scale, block_k, nk):  # fmt: skip
    q, qp, qs = q_ref[...], qp_ref[...], qs_ref[...]  # [bq, H], [bq], [bq]

    def body(j, carry):
        def compute(carry):
            o, m, l = carry
            kv = pl.ds(j * block_k, block_k)
            v = v_ref[kv, :]
            s, mask = _scores(q, k_ref[kv, :], qp, qs, kp_ref[kv], ks_ref[kv], scale)  # [bq, bk]
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
            alpha = jnp.exp(m - m_new)
            o = alpha[:, None] * o + _dot(p.astype(v.dtype), v)
            return o, m_new, alpha * l + p.sum(axis=-1)

        return lax.cond(vis_ref[j] > 0, compute, lambda c: c, carry)

    o, m, l = lax.fori_loop(0, nk, body, (o_in[...], m_in[...], l_in[...]))
    o_ref[...], m_ref[...], l_ref[...] = o, m, l


def _head_specs(s, h, bq, g, nk):
    """Specs for grid (b, query head n, q block i) over [B, K*G, T, *] query arrays and [B, K, S, *] kv arrays."""
    return dict(
        q=pl.BlockSpec((None, None, bq, h), lambda b, n, i: (b, n, i, 0)),
        row=pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i)),
        kv=pl.BlockSpec((None, None, s, h), lambda b, n, i: (b, n // g, 0, 0)),
        q_tok=pl.BlockSpec((None, bq), lambda b, n, i: (b, i)),
        kv_tok=pl.BlockSpec((None, s), lambda b, n, i: (b, 0)),
        vis=pl.BlockSpec((None, None, nk), lambda b, n, i: (b, i, 0)),
    )


def fwd_hop(
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, ranges, o, m, l, *, scale, block_q, block_k, interpret=False
):
    visible = ranges.table()  # [B, T/bq, S/bk] in HBM (no SMEM limit on GPU); each program reads its row
    b, kh, g, t, h = q.shape
    s = k.shape[2]
    nk = s // block_k
    qf, of, mf, lf = (x.reshape(b, kh * g, t, *x.shape[4:]) for x in (q, o, m, l))  # [B, K*G, T, ...]
    sp = _head_specs(s, h, block_q, g, nk)
    o, m, l = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, block_k=block_k, nk=nk),
        grid=(b, kh * g, t // block_q),
        in_specs=[
            sp["vis"],
            sp["q"],
            sp["kv"],
            sp["kv"],
            sp["q_tok"],
            sp["q_tok"],
            sp["kv_tok"],
            sp["kv_tok"],
        ]
        + [sp["q"], sp["row"], sp["row"]],
        out_specs=[sp["q"], sp["row"], sp["row"]],
        out_shape=[jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (of, mf, lf)],
        input_output_aliases={8: 0, 9: 1, 10: 2},
        **_params(interpret, h),
    )(visible, qf, k, v, q_pos, q_seg, kv_pos, kv_seg, of, mf, lf)
    return o.reshape(q.shape), m.reshape(q.shape[:-1]), l.reshape(q.shape[:-1])


def _dkv_kernel(vis_ref, q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_in, dv_in,
                dk_ref, dv_ref, *, scale, block_q, nq, groups):  # fmt: skip
    k, v, kp, ks = k_ref[...], v_ref[...], kp_ref[...], ks_ref[...]  # [bk, H], [bk]

    def body(g, i, carry):
        def compute(carry):
            dk, dv = carry
            rows = pl.ds(i * block_q, block_q)
            q, do = q_ref[g, rows, :], do_ref[g, rows, :]  # [bq, H]
            s, mask = _scores(q, k, qp_ref[rows], qs_ref[rows], kp, ks, scale)
            p = jnp.where(mask, jnp.exp(s - lse_ref[g, rows][:, None]), 0.0)  # [bq, bk]
            dv = dv + _dot(p.astype(do.dtype), do, TN_DIMS)
            dp = _dot(do, v, NT_DIMS)
            ds = p * (dp - delta_ref[g, rows][:, None]) * scale
            dk = dk + _dot(ds.astype(q.dtype), q, TN_DIMS)
            return dk, dv

        return lax.cond(vis_ref[i] > 0, compute, lambda c: c, carry)

    carry = (dk_in[...], dv_in[...])
    for g in range(groups):  # static: the query heads sharing this kv head
        carry = lax.fori_loop(0, nq, functools.partial(body, g), carry)
    dk, dv = carry
    dk_ref[...], dv_ref[...] = dk, dv


def _dq_kernel(vis_ref, q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, do_ref, lse_ref, delta_ref, dq_in, dq_ref,
               *, scale, block_k, nk):  # fmt: skip
    q, do, qp, qs = q_ref[...], do_ref[...], qp_ref[...], qs_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]  # [bq, 1]

    def body(j, dq):
        def compute(dq):
            kv = pl.ds(j * block_k, block_k)
            k, v = k_ref[kv, :], v_ref[kv, :]
            s, mask = _scores(q, k, qp, qs, kp_ref[kv], ks_ref[kv], scale)
            p = jnp.where(mask, jnp.exp(s - lse), 0.0)
            dp = _dot(do, v, NT_DIMS)
            ds = p * (dp - delta) * scale
            return dq + _dot(ds.astype(k.dtype), k)

        return lax.cond(vis_ref[j] > 0, compute, lambda d: d, dq)

    dq_ref[...] = lax.fori_loop(0, nk, body, dq_in[...])


def bwd_hop(q, k, v, q_pos, kv_pos, q_seg, kv_seg, ranges, do, lse, delta, dq, dk, dv, *, scale, block_q, block_k,
            interpret=False):  # fmt: skip
    visible = ranges.table()
    b, kh, g, t, h = q.shape
    s = k.shape[2]
    nq, nk = t // block_q, s // block_k

    # dK/dV: grid (b, kv head n, kv block j); whole q / do / lse / delta of the group, looped over inside.
    full_q = pl.BlockSpec((None, None, g, t, h), lambda b, n, j: (b, n, 0, 0, 0))
    full_row = pl.BlockSpec((None, None, g, t), lambda b, n, j: (b, n, 0, 0))
    kv_blk = pl.BlockSpec((None, None, block_k, h), lambda b, n, j: (b, n, j, 0))
    q_tok = pl.BlockSpec((None, t), lambda b, n, j: (b, 0))
    kv_tok = pl.BlockSpec((None, block_k), lambda b, n, j: (b, j))
    vis_col = pl.BlockSpec((None, None, nq), lambda b, n, j: (b, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=block_q, nq=nq, groups=g),
        grid=(b, kh, nk),
        in_specs=[vis_col, full_q, kv_blk, kv_blk, q_tok, q_tok, kv_tok, kv_tok, full_q, full_row, full_row]
        + [kv_blk, kv_blk],
        out_specs=[kv_blk, kv_blk],
        out_shape=[jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (dk, dv)],
        input_output_aliases={11: 0, 12: 1},
        **_params(interpret, h),
    )(jnp.swapaxes(visible, 1, 2), q, k, v, q_pos, q_seg, kv_pos, kv_seg, do, lse, delta, dk, dv)

    # dQ: grid (b, query head n, q block i), loop over kv blocks.
    qf, dof, lsef, deltaf, dqf = (x.reshape(b, kh * g, t, *x.shape[4:]) for x in (q, do, lse, delta, dq))
    sp = _head_specs(s, h, block_q, g, nk)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=block_k, nk=nk),
        grid=(b, kh * g, nq),
        in_specs=[
            sp["vis"],
            sp["q"],
            sp["kv"],
            sp["kv"],
            sp["q_tok"],
            sp["q_tok"],
            sp["kv_tok"],
            sp["kv_tok"],
        ]
        + [sp["q"], sp["row"], sp["row"], sp["q"]],
        out_specs=sp["q"],
        out_shape=jax.ShapeDtypeStruct(dqf.shape, jnp.float32),
        input_output_aliases={11: 0},
        **_params(interpret, h),
    )(visible, qf, k, v, q_pos, q_seg, kv_pos, kv_seg, dof, lsef, deltaf, dqf)
    return dq.reshape(q.shape), dk, dv

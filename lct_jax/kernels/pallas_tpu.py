"""Pallas TPU (Mosaic) ring-hop kernels: forward, backward dK/dV, backward dQ.

Layout contract: :mod:`lct_jax.kernels.blocks`. One grid step is one q-block x kv-block pair of one batch row and
one kv head (all G query heads of that kv head together, so K/V are read once per group: GQA without repeat):

    forward  grid (B, K, T/bq, S/bk)  kv innermost ("arbitrary"): the o/m/l output blocks stay in VMEM across it
    dK/dV    grid (B, K, S/bk, T/bq)  q innermost: dk/dv blocks accumulate in VMEM
    dQ       grid (B, K, T/bq, S/bk)  kv innermost: the dq block accumulates in VMEM

The ring's carry enters through aliased inputs (``input_output_aliases``): at the first inner step the kernel copies
it into the resident output block, then folds in every visible block. Which blocks are visible is decided per grid
step from the per-block position / segment ranges (:class:`lct_jax.kernels.blocks.BlockRanges`, six int32 arrays of
B x T/bq or B x S/bk, prefetched to SMEM: linear in the local length, so SMEM does not cap it); a skipped step does
no matmul or exp.
Positions / segment ids arrive as [B, T, 1] (query rows) and [B, 1, S] (key lanes) so the mask is one broadcast
compare. On CPU the kernels run with ``interpret=True``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lct_jax.kernels.blocks import MASK_VALUE, BlockRanges

NT_DIMS = (((1,), (1,)), ((), ()))  # a [M, H] . b [N, H] -> [M, N]
NN_DIMS = (((1,), (0,)), ((), ()))  # a [M, K] . b [K, N] -> [M, N]


def _dot(a, b, dims=NN_DIMS):
    """fp32 accumulate; explicit precision so a global ``jax_default_matmul_precision`` (tests set 'highest')
    cannot ask Mosaic for an fp32-precision contraction of bf16 operands, which it rejects ("Bad lhs type")."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


_SQ = pl.squeezed


def _bytes(*xs) -> int:
    return sum(x.size * x.dtype.itemsize for x in xs)


def _cost(q, k, matmuls: int, *operands) -> pl.CostEstimate:
    """Dense upper bound (skipped blocks make the real cost lower): ``matmuls`` [T, S] x H products per head."""
    b, kh, g, t, h = q.shape
    s = k.shape[2]
    pairs = b * kh * g * t * s
    return pl.CostEstimate(
        flops=2 * matmuls * pairs * h, transcendentals=pairs, bytes_accessed=_bytes(*operands)
    )


def _mask(qp_ref, qs_ref, kp_ref, ks_ref):
    """bool[bq, bk] from query [bq, 1] and key [1, bk] positions / segment ids."""
    return (kp_ref[...] <= qp_ref[...]) & (ks_ref[...] == qs_ref[...])


def _rows(x):
    """Row statistics [B, K, G, T] → [B, K, T, G] for the kernels: [bq, G] blocks, a head's [bq, 1] column per
    query row. (As [B, K, G, T, 1] each value would occupy a whole 128-lane row of HBM tile: 128x the bytes,
    14 KB per token for LongVA-7B's 28 heads per array; [T, G] pads G = 7 to 128 lanes per kv head: 2 KB.)"""
    return jnp.swapaxes(x, 2, 3)


def _unrows(x):
    return jnp.swapaxes(x, 2, 3)


def _token_layout(q_pos, q_seg, kv_pos, kv_seg):
    return q_pos[:, :, None], q_seg[:, :, None], kv_pos[:, None, :], kv_seg[:, None, :]


def _specs(g, h, bq, bk, q_major: bool):
    """BlockSpecs for the grid (b, kv head, i, j): q index is i when ``q_major`` else j, kv the other one."""

    def qi(i, j):
        return i if q_major else j

    def ki(i, j):
        return j if q_major else i

    return dict(
        q=pl.BlockSpec((_SQ, _SQ, g, bq, h), lambda b, n, i, j, *_: (b, n, 0, qi(i, j), 0)),
        row=pl.BlockSpec((_SQ, _SQ, bq, g), lambda b, n, i, j, *_: (b, n, qi(i, j), 0)),
        kv=pl.BlockSpec((_SQ, _SQ, bk, h), lambda b, n, i, j, *_: (b, n, ki(i, j), 0)),
        q_tok=pl.BlockSpec((_SQ, bq, 1), lambda b, n, i, j, *_: (b, qi(i, j), 0)),
        kv_tok=pl.BlockSpec((_SQ, 1, bk), lambda b, n, i, j, *_: (b, 0, ki(i, j))),
    )


NUM_RANGES = len(BlockRanges._fields)  # scalar-prefetch operands before the array operands


def _visible(refs, b, i, j, nq, nk):
    """Scalar test in the kernel: q block i x kv block j of row b may hold a visible pair (BlockRanges order)."""
    q_pos_max, q_seg_min, q_seg_max, kv_pos_min, kv_seg_min, kv_seg_max = refs
    qi, kj = b * nq + i, b * nk + j
    return (
        (kv_pos_min[kj] <= q_pos_max[qi])
        & (kv_seg_min[kj] <= q_seg_max[qi])
        & (q_seg_min[qi] <= kv_seg_max[kj])
    )


def _params(interpret):
    return dict(
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
    )


# ---------------------------------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, scale, nq, nk):
    ranges, (q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, o_in, m_in, l_in, o_ref, m_ref, l_ref) = (
        refs[:NUM_RANGES], refs[NUM_RANGES:])  # fmt: skip
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _load_carry():
        o_ref[...], m_ref[...], l_ref[...] = o_in[...], m_in[...], l_in[...]

    @pl.when(_visible(ranges, b, i, j, nq, nk))
    def _step():
        k, v = k_ref[...], v_ref[...]  # [bk, H]
        mask = _mask(qp_ref, qs_ref, kp_ref, ks_ref)  # [bq, bk]
        for g in range(q_ref.shape[0]):  # query heads sharing this kv head
            s = _dot(q_ref[g], k, NT_DIMS) * scale  # [bq, bk]
            s = jnp.where(mask, s, MASK_VALUE)
            col = (slice(None), pl.ds(g, 1))  # this head's [bq, 1] column of the [bq, G] row statistics
            m_prev = m_ref[col]
            m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            l_ref[col] = alpha * l_ref[col] + p.sum(axis=-1, keepdims=True)
            o_ref[g] = alpha * o_ref[g] + _dot(p.astype(v.dtype), v)
            m_ref[col] = m_new


def fwd_hop(
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, ranges, o, m, l, *, scale, block_q, block_k, interpret=False
):
    b, kh, g, t, h = q.shape
    s = k.shape[2]
    nq, nk = t // block_q, s // block_k
    sp = _specs(g, h, block_q, block_k, q_major=True)
    qp, qs, kp, ks = _token_layout(q_pos, q_seg, kv_pos, kv_seg)
    m, l = _rows(m), _rows(l)
    operands = (q, k, v, qp, qs, kp, ks, o, m, l)
    o, m, l = pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, nq=nq, nk=nk),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=NUM_RANGES,
            grid=(b, kh, nq, nk),
            in_specs=[sp["q"], sp["kv"], sp["kv"], sp["q_tok"], sp["q_tok"], sp["kv_tok"], sp["kv_tok"]]
            + [sp["q"], sp["row"], sp["row"]],
            out_specs=[sp["q"], sp["row"], sp["row"]],
        ),
        out_shape=[jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (o, m, l)],
        # operand indices count the prefetched ranges
        input_output_aliases={NUM_RANGES + 7: 0, NUM_RANGES + 8: 1, NUM_RANGES + 9: 2},
        cost_estimate=_cost(q, k, 2, *operands, o, m, l),
        **_params(interpret),
    )(*ranges.flat(), *operands)
    return o, _unrows(m), _unrows(l)


# ---------------------------------------------------------------------------------------------------- backward


def _probs(q, k, mask, lse, scale):
    s = _dot(q, k, NT_DIMS) * scale  # [bq, bk]
    return jnp.where(mask, jnp.exp(s - lse), 0.0)


def _dkv_kernel(*refs, scale, nq, nk):
    ranges, (q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_in, dv_in, dk_ref,
             dv_ref) = refs[:NUM_RANGES], refs[NUM_RANGES:]  # fmt: skip
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)  # kv block j outer, q block i inner

    @pl.when(i == 0)
    def _load_carry():
        dk_ref[...], dv_ref[...] = dk_in[...], dv_in[...]

    @pl.when(_visible(ranges, b, i, j, nq, nk))
    def _step():
        k, v = k_ref[...], v_ref[...]  # [bk, H]
        mask = _mask(qp_ref, qs_ref, kp_ref, ks_ref)
        for g in range(q_ref.shape[0]):
            q, do = q_ref[g], do_ref[g]  # [bq, H]
            col = (slice(None), pl.ds(g, 1))
            p = _probs(q, k, mask, lse_ref[col], scale)  # [bq, bk]
            dv_ref[...] += _dot(p.T.astype(do.dtype), do)
            dp = _dot(do, v, NT_DIMS)  # [bq, bk]
            ds = p * (dp - delta_ref[col]) * scale
            dk_ref[...] += _dot(ds.T.astype(q.dtype), q)


def _dq_kernel(*refs, scale, nq, nk):
    ranges, (q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, do_ref, lse_ref, delta_ref, dq_in, dq_ref) = (
        refs[:NUM_RANGES], refs[NUM_RANGES:])  # fmt: skip
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _load_carry():
        dq_ref[...] = dq_in[...]

    @pl.when(_visible(ranges, b, i, j, nq, nk))
    def _step():
        k, v = k_ref[...], v_ref[...]
        mask = _mask(qp_ref, qs_ref, kp_ref, ks_ref)
        for g in range(q_ref.shape[0]):
            q, do = q_ref[g], do_ref[g]
            col = (slice(None), pl.ds(g, 1))
            p = _probs(q, k, mask, lse_ref[col], scale)
            dp = _dot(do, v, NT_DIMS)
            ds = p * (dp - delta_ref[col]) * scale
            dq_ref[g] += _dot(ds.astype(k.dtype), k)


def bwd_hop(q, k, v, q_pos, kv_pos, q_seg, kv_seg, ranges, do, lse, delta, dq, dk, dv, *, scale, block_q, block_k,
            interpret=False):  # fmt: skip
    b, kh, g, t, h = q.shape
    s = k.shape[2]
    nq, nk = t // block_q, s // block_k
    qp, qs, kp, ks = _token_layout(q_pos, q_seg, kv_pos, kv_seg)
    lse, delta = _rows(lse), _rows(delta)
    flat_ranges = ranges.flat()
    common = (q, k, v, qp, qs, kp, ks, do, lse, delta)
    kw = dict(scale=scale, nq=nq, nk=nk)

    sp = _specs(g, h, block_q, block_k, q_major=False)
    common_specs = lambda sp: [sp["q"], sp["kv"], sp["kv"], sp["q_tok"], sp["q_tok"], sp["kv_tok"], sp["kv_tok"]] + [
        sp["q"], sp["row"], sp["row"]
    ]  # fmt: skip
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=NUM_RANGES,
            grid=(b, kh, nk, nq),
            in_specs=common_specs(sp) + [sp["kv"], sp["kv"]],
            out_specs=[sp["kv"], sp["kv"]],
        ),
        out_shape=[jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (dk, dv)],
        input_output_aliases={NUM_RANGES + 10: 0, NUM_RANGES + 11: 1},
        cost_estimate=_cost(q, k, 4, *common, dk, dv, dk, dv),
        **_params(interpret),
    )(*flat_ranges, *common, dk, dv)

    sp = _specs(g, h, block_q, block_k, q_major=True)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=NUM_RANGES,
            grid=(b, kh, nq, nk),
            in_specs=common_specs(sp) + [sp["q"]],
            out_specs=sp["q"],
        ),
        out_shape=jax.ShapeDtypeStruct(dq.shape, jnp.float32),
        input_output_aliases={NUM_RANGES + 10: 0},
        cost_estimate=_cost(q, k, 3, *common, dq, dq),
        **_params(interpret),
    )(*flat_ranges, *common, dq)
    return dq, dk, dv

"""Each ring-hop kernel (Pallas ones in interpret mode on CPU) vs dense fp32 attention, one shard, two hops.

Queries and keys get *different* positions so some query rows see no key at all (in the ring this happens on
every hop whose K/V block lies in a row's future): those rows must come out as zeros with zero, finite gradients.
The two K/V halves are folded in as two hops, so the online-softmax carry between hops is exercised, and some
blocks are skipped by the visibility table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lct_jax.kernels import KERNELS, get_kernel
from lct_jax.kernels.blocks import block_ranges, finalize, init_carry
from lct_jax.ops.attention import dense_attention

B, T, S, K, G, H, BLK = 2, 16, 16, 2, 3, 8, 4


def inputs(dtype):
    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(B, T, K * G, H)), dtype)
    k, v = (jnp.asarray(r.normal(size=(B, S, K, H)), dtype) for _ in range(2))
    q_pos = jnp.asarray(
        np.stack([np.arange(T), np.arange(T)[::-1]]) + 4, jnp.int32
    )  # rows 0..3 of b=0: no key
    kv_pos = jnp.asarray(np.stack([np.arange(S) + 8, np.arange(S)]), jnp.int32)
    q_seg = jnp.asarray(np.stack([np.ones(T), np.arange(T) % 2]), jnp.int32)
    kv_seg = jnp.asarray(np.stack([np.ones(S), (np.arange(S) // 4) % 2]), jnp.int32)
    return q, k, v, q_pos, kv_pos, q_seg, kv_seg


def kernel_attention(kernel, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    """fwd = two hops of the kernel + finalize; bwd = two hops of its backward from the saved lse (custom VJP)."""
    mod = get_kernel(kernel)
    b, t, n, h = q.shape
    qk = q.reshape(b, t, K, G, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kk, vk = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    kw = dict(scale=h**-0.5, block_q=BLK, block_k=BLK, interpret=True)
    halves = [slice(0, S // 2), slice(S // 2, S)]

    def hop_args(kk, vk, half):
        kp, ks = kv_pos[:, half], kv_seg[:, half]
        ranges = block_ranges(q_pos, kp, q_seg, ks, BLK, BLK)
        return kk[:, :, half], vk[:, :, half], q_pos, kp, q_seg, ks, ranges

    @jax.custom_vjp
    def attn(qk, kk, vk):
        return fwd(qk, kk, vk)[0]

    def fwd(qk, kk, vk):
        carry = init_carry(qk)
        for half in halves:
            kh, vh, *rest = hop_args(kk, vk, half)
            carry = mod.fwd_hop(qk, kh, vh, *rest, *carry, **kw)
        out, lse = finalize(*carry, qk.dtype)
        return out, (qk, kk, vk, out, lse)

    def bwd(res, g):
        qk, kk, vk, out, lse = res
        delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), -1)
        dq, dks, dvs = jnp.zeros(qk.shape, jnp.float32), [], []
        for half in halves:
            kh, vh, *rest = hop_args(kk, vk, half)
            zeros = jnp.zeros(kh.shape, jnp.float32)
            dq, dk, dv = mod.bwd_hop(
                qk, kh, vh, *rest, g.astype(qk.dtype), lse, delta, dq, zeros, zeros, **kw
            )
            dks.append(dk), dvs.append(dv)
        return (
            dq.astype(qk.dtype),
            jnp.concatenate(dks, 2).astype(kk.dtype),
            jnp.concatenate(dvs, 2).astype(vk.dtype),
        )

    attn.defvjp(fwd, bwd)
    out = attn(qk, kk, vk)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def fwd_and_grads(f, q, k, v):
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(jnp.asarray(0.25 * np.random.default_rng(1).normal(size=out.shape), out.dtype)))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_two_hops_matches_dense(kernel, dtype, tol):
    q, k, v, *masks = inputs(jnp.dtype(dtype))
    f32 = lambda x: x.astype(jnp.float32)
    want = jax.jit(lambda q, k, v: fwd_and_grads(lambda q, k, v: dense_attention(f32(q), f32(k), f32(v), *masks),
                                                 q, k, v))(q, k, v)  # fmt: skip
    got = jax.jit(lambda q, k, v: fwd_and_grads(lambda *a: kernel_attention(kernel, *a, *masks), q, k, v))(
        q, k, v
    )
    errs = [float(jnp.max(jnp.abs(f32(a) - f32(b)))) for a, b in zip(got, want, strict=True)]
    assert all(np.isfinite(errs)) and max(errs) <= tol, errs
    # rows with no visible key: exactly zero output and zero query gradient
    assert int(jnp.sum(~jnp.any(masks[1][:, None, :] <= masks[0][:, :, None], -1))) >= 4
    empty = ~jnp.any(
        (masks[1][:, None, :] <= masks[0][:, :, None]) & (masks[3][:, None, :] == masks[2][:, :, None]), -1
    )
    assert bool(jnp.all(jnp.where(empty[..., None, None], got[0], 0) == 0))
    assert bool(jnp.all(jnp.where(empty[..., None, None], got[1], 0) == 0))
    assert bool(jnp.any(block_ranges(*masks, BLK, BLK).table() == 0)), "some blocks must be skipped"


def test_pallas_gpu_lowers_to_triton_without_a_gpu():
    """No GPU here: lower (not compile) the fwd and bwd hop kernels for CUDA; Pallas emits Triton custom calls."""
    from lct_jax.kernels import pallas_gpu  # noqa: PLC0415

    b, kh, g, t, h, blk = 1, 2, 2, 128, 64, 64
    q = jnp.zeros((b, kh, g, t, h), jnp.bfloat16)
    k = jnp.zeros((b, kh, t, h), jnp.bfloat16)
    pos = jnp.zeros((b, t), jnp.int32)
    kw = dict(scale=0.125, block_q=blk, block_k=blk, interpret=False)

    def fwd_bwd(q, k):
        ranges = block_ranges(pos, pos, pos, pos, blk, blk)
        o, m, l = pallas_gpu.fwd_hop(q, k, k, pos, pos, pos, pos, ranges, *init_carry(q), **kw)
        zk = jnp.zeros(k.shape, jnp.float32)
        return pallas_gpu.bwd_hop(q, k, k, pos, pos, pos, pos, ranges, q, m, l, o, zk, zk, **kw)

    text = jax.jit(fwd_bwd).trace(q, k).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3, text.count("xla.gpu.triton")  # fwd, dK/dV, dQ


def _old_table(q_pos, kv_pos, q_seg, kv_seg, bq, bk):
    """The [B, T/bq, S/bk] table the kernels used to take (main before the ranges), written out again."""
    b = q_pos.shape[0]
    qp, qs = q_pos.reshape(b, -1, bq), q_seg.reshape(b, -1, bq)
    kp, ks = kv_pos.reshape(b, -1, bk), kv_seg.reshape(b, -1, bk)
    pos_ok = kp.min(-1)[:, None, :] <= qp.max(-1)[:, :, None]
    seg_ok = (ks.min(-1)[:, None, :] <= qs.max(-1)[:, :, None]) & (
        qs.min(-1)[:, :, None] <= ks.max(-1)[:, None, :]
    )
    return (pos_ok & seg_ok).astype(np.int32)


@pytest.mark.parametrize("bq,bk", [(4, 4), (2, 8), (8, 2)])
def test_visibility_from_block_ranges(bq, bk):
    """Per-block ranges give the old table exactly, in every kernel's form (the table, the Pallas TPU kernel's
    scalar test on the flattened ranges), and never skip a block that holds a visible pair."""
    from lct_jax.kernels.pallas_tpu import _visible  # noqa: PLC0415

    r = np.random.default_rng(3)
    b, t = 3, 32
    q_pos = np.stack([r.permutation(t) for _ in range(b)]).astype(np.int32)  # any token order (zigzag, ...)
    kv_pos = np.stack([r.permutation(t) for _ in range(b)]).astype(np.int32)
    q_seg = np.sort(r.integers(0, 3, (b, t)), axis=1).astype(np.int32)
    kv_seg = np.sort(r.integers(0, 3, (b, t)), axis=1).astype(np.int32)
    ranges = block_ranges(*(jnp.asarray(x) for x in (q_pos, kv_pos, q_seg, kv_seg)), bq, bk)
    table = np.asarray(ranges.table())
    np.testing.assert_array_equal(table, _old_table(q_pos, kv_pos, q_seg, kv_seg, bq, bk))
    nq, nk = ranges.num_blocks
    assert all(x.size in (b * nq, b * nk) for x in ranges.flat())  # linear in the local length
    flat = [np.asarray(x) for x in ranges.flat()]
    scalar = np.array([[[bool(_visible(flat, i, j, k, nq, nk)) for k in range(nk)] for j in range(nq)]
                       for i in range(b)])  # fmt: skip
    np.testing.assert_array_equal(scalar, table.astype(bool))
    dense = (kv_pos[:, None, :] <= q_pos[:, :, None]) & (kv_seg[:, None, :] == q_seg[:, :, None])  # [B, T, S]
    holds = dense.reshape(b, nq, bq, nk, bk).any(axis=(2, 4))
    assert np.all(table[holds] == 1), "a block with a visible pair was skipped"
    assert (table == 0).any() and holds.any()

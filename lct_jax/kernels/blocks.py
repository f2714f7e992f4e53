"""What every ring block kernel shares: the kernel-layout contract, block sizes, the mask, block visibility.

Axis alphabet: B batch, T local query tokens, S local key tokens, K kv heads, G = N // K query heads per kv head,
H head dim. A *hop* is one step of the ring: the local queries against the K/V block currently held.

Kernel layout (what ``fwd_hop`` / ``bwd_hop`` of every kernel take; the ring transposes once, outside the scan):

    q        [B, K, G, T, H]  (input dtype)         k, v      [B, K, S, H]  (input dtype)
    q_pos    int32[B, T]       q_seg int32[B, T]     kv_pos    int32[B, S]   kv_seg int32[B, S]
    ranges   BlockRanges: per-block position / segment-id ranges, int32[B, T/bq] for q blocks and
             int32[B, S/bk] for kv blocks (O(T / block) numbers; which pairs to skip is derived from them)
    fwd carry: o f32[B, K, G, T, H] (unnormalized), m f32[B, K, G, T] (running max), l f32[B, K, G, T] (sum)
    bwd: do [B, K, G, T, H] (input dtype), lse / delta f32[B, K, G, T]; accumulators dq f32[B, K, G, T, H],
         dk / dv f32[B, K, S, H]

Masking is only ``kv_pos <= q_pos`` and ``kv_seg == q_seg``; masked scores become :data:`MASK_VALUE` (finite,
so a fully masked row never computes ``-inf - -inf``) and their probabilities are forced to exactly 0. A row
with no visible key keeps ``l == 0``; the ring turns it into output 0 and ``lse = +inf`` (so the backward
recomputes ``p = exp(s - inf) = 0``: zero gradients, never NaN).

Block skipping: a q-block x kv-block pair may hold a visible pair unless its smallest key position is after its
largest query position, or the two blocks' segment-id ranges do not overlap. The kernels get those per-block
ranges (:class:`BlockRanges`, linear in the local length) and evaluate the test per pair, so nothing quadratic in
the local length is stored (a [T/bq, S/bk] table in SMEM capped the local length on v5p). Worked example, bq = bk
= 2, q positions [4 5 | 0 1], key positions [2 3 | 6 7], one segment: ``q_pos_max = [5, 1]``, ``kv_pos_min =
[2, 6]``; pair (0, 0): 2 <= 5 run; (0, 1): 6 > 5 skip; (1, 0): 2 > 1 skip; (1, 1): skip.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
DEFAULT_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query / key block sizes of one hop; both must divide the local lengths."""

    block_q: int = DEFAULT_BLOCK
    block_k: int = DEFAULT_BLOCK

    def for_length(self, length: int) -> tuple[BlockSizes, int]:
        """(blocks, padded local length) for ``length`` local tokens. Blocks are clipped to the length; if they
        then do not tile it, the length is padded: to a multiple of ``block_q`` under one kv block when that fits
        ``block_k``, else to a multiple of lcm(block_q, block_k). E.g. (256, 512): 512 → 512, 876 → 1024,
        300 → 512 with blocks (256, 512); (8, 512): 20 → 24 with blocks (8, 24)."""
        bq0, bk0 = self.block_q, self.block_k
        if bq0 < 1 or bk0 < 1 or length < 1:
            raise ValueError(f"block sizes and length must be >= 1, got {bq0=} {bk0=} {length=}")
        bq, bk = min(bq0, length), min(bk0, length)
        if length % bq == 0 and length % bk == 0:
            return BlockSizes(bq, bk), length
        by_q = -(-length // bq0) * bq0
        if by_q <= bk0:
            return BlockSizes(bq0, by_q), by_q
        step = math.lcm(bq0, bk0)
        return BlockSizes(bq0, bk0), -(-length // step) * step


def visible_mask(q_pos, kv_pos, q_seg, kv_seg):
    """bool[..., Tq, Sk] from int[..., Tq] / int[..., Sk]: key visible to query."""
    return (kv_pos[..., None, :] <= q_pos[..., :, None]) & (kv_seg[..., None, :] == q_seg[..., :, None])


class BlockRanges(NamedTuple):
    """Per-block ranges that decide which q-block x kv-block pairs a hop computes (all int32)."""

    q_pos_max: jax.Array  # [B, T/bq] largest query position in each q block
    q_seg_min: jax.Array  # [B, T/bq]
    q_seg_max: jax.Array  # [B, T/bq]
    kv_pos_min: jax.Array  # [B, S/bk] smallest key position in each kv block
    kv_seg_min: jax.Array  # [B, S/bk]
    kv_seg_max: jax.Array  # [B, S/bk]

    @property
    def num_blocks(self) -> tuple[int, int]:
        return self.q_pos_max.shape[1], self.kv_pos_min.shape[1]

    def pair_visible(self, q_block, kv_block, row=None):
        """bool: pair (q_block, kv_block) may hold a visible pair. Indices are scalars or broadcastable arrays;
        ``row`` selects a batch row (None: all rows, broadcast over a leading [B] axis)."""
        pick = (lambda x, i: x[:, i]) if row is None else (lambda x, i: x[row, i])
        return (
            (pick(self.kv_pos_min, kv_block) <= pick(self.q_pos_max, q_block))
            & (pick(self.kv_seg_min, kv_block) <= pick(self.q_seg_max, q_block))
            & (pick(self.q_seg_min, q_block) <= pick(self.kv_seg_max, kv_block))
        )

    def table(self) -> jax.Array:
        """int32[B, T/bq, S/bk]: :meth:`pair_visible` for every pair (quadratic: for tests and small hops)."""
        nq, nk = self.num_blocks
        return self.pair_visible(jnp.arange(nq)[:, None], jnp.arange(nk)[None, :]).astype(jnp.int32)

    def flat(self) -> tuple[jax.Array, ...]:
        """The six arrays flattened to 1-D ([B * T/bq] and [B * S/bk]) for scalar prefetch."""
        return tuple(x.reshape(-1) for x in self)


def block_ranges(q_pos, kv_pos, q_seg, kv_seg, block_q: int, block_k: int) -> BlockRanges:
    """Per-block ranges from int[B, T] query / int[B, S] key positions and segment ids."""
    b, t = q_pos.shape
    s = kv_pos.shape[1]
    qp = q_pos.reshape(b, t // block_q, block_q)
    qs = q_seg.reshape(b, t // block_q, block_q)
    kp = kv_pos.reshape(b, s // block_k, block_k)
    ks = kv_seg.reshape(b, s // block_k, block_k)
    i32 = lambda x: x.astype(jnp.int32)  # noqa: E731
    return BlockRanges(
        i32(qp.max(-1)), i32(qs.min(-1)), i32(qs.max(-1)), i32(kp.min(-1)), i32(ks.min(-1)), i32(ks.max(-1))
    )


def block_visibility(q_pos, kv_pos, q_seg, kv_seg, block_q: int, block_k: int):
    """int32[B, T/bq, S/bk]: 1 where a q-block x kv-block may contain a visible pair (the table of
    :func:`block_ranges`; conservative: never skips a visible pair)."""
    return block_ranges(q_pos, kv_pos, q_seg, kv_seg, block_q, block_k).table()


def init_carry(q):
    """Empty fwd carry (o, m, l) for kernel-layout q [B, K, G, T, H]."""
    o = jnp.zeros(q.shape, jnp.float32)
    m = jnp.full(q.shape[:-1], MASK_VALUE, jnp.float32)
    l = jnp.zeros(q.shape[:-1], jnp.float32)
    return o, m, l


def finalize(o, m, l, dtype):
    """Carry → (output [B, K, G, T, H] in dtype, lse f32[B, K, G, T]); rows with no visible key → 0 / +inf."""
    seen = l > 0.0
    out = jnp.where(seen[..., None], o / jnp.where(seen, l, 1.0)[..., None], 0.0).astype(dtype)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
    return out, lse

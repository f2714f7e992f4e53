"""What every ring block kernel shares: the kernel-layout contract, block sizes, the mask, block visibility.

Axis alphabet: B batch, T local query tokens, S local key tokens, K kv heads, G = N // K query heads per kv head,
H head dim. A *hop* is one step of the ring: the local queries against the K/V block currently held.

Kernel layout (what ``fwd_hop`` / ``bwd_hop`` of every kernel take; the ring transposes once, outside the scan):

    q        [B, K, G, T, H]  (input dtype)         k, v      [B, K, S, H]  (input dtype)
    q_pos    int32[B, T]       q_seg int32[B, T]     kv_pos    int32[B, S]   kv_seg int32[B, S]
    visible  int32[B, T/bq, S/bk]  (1 = the q-block x kv-block may hold a visible pair; 0 = skip it)
    fwd carry: o f32[B, K, G, T, H] (unnormalized), m f32[B, K, G, T] (running max), l f32[B, K, G, T] (sum)
    bwd: do [B, K, G, T, H] (input dtype), lse / delta f32[B, K, G, T]; accumulators dq f32[B, K, G, T, H],
         dk / dv f32[B, K, S, H]

Masking is only ``kv_pos <= q_pos`` and ``kv_seg == q_seg``; masked scores become :data:`MASK_VALUE` (finite,
so a fully masked row never computes ``-inf - -inf``) and their probabilities are forced to exactly 0. A row
with no visible key keeps ``l == 0``; the ring turns it into output 0 and ``lse = +inf`` (so the backward
recomputes ``p = exp(s - inf) = 0``: zero gradients, never NaN).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
DEFAULT_BLOCK = 512


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query / key block sizes of one hop; both must divide the local lengths."""

    block_q: int = DEFAULT_BLOCK
    block_k: int = DEFAULT_BLOCK

    def fit(self, t_local: int, s_local: int) -> BlockSizes:
        """Clip to the local lengths and validate; raise naming the sizes and what would fit."""
        bq, bk = min(self.block_q, t_local), min(self.block_k, s_local)
        for name, blk, length in (("block_q", bq, t_local), ("block_k", bk, s_local)):
            if blk < 1:
                raise ValueError(f"{name}={blk} must be >= 1")
            if length % blk:
                fits = [d for d in range(1, length + 1) if length % d == 0 and d <= blk]
                raise ValueError(
                    f"{name}={blk} does not divide the local (per seq shard) length {length}; "
                    f"pick a divisor such as {fits[-1]} or pad the sequence to a multiple of {blk} * seq"
                )
        return BlockSizes(bq, bk)


def visible_mask(q_pos, kv_pos, q_seg, kv_seg):
    """bool[..., Tq, Sk] from int[..., Tq] / int[..., Sk]: key visible to query."""
    return (kv_pos[..., None, :] <= q_pos[..., :, None]) & (kv_seg[..., None, :] == q_seg[..., :, None])


def block_visibility(q_pos, kv_pos, q_seg, kv_seg, block_q: int, block_k: int):
    """int32[B, T/bq, S/bk]: 1 where a q-block x kv-block may contain a visible pair.

    Conservative (never skips a visible pair): a block is skipped only when its smallest key position is
    after its largest query position, or its segment-id ranges do not overlap.
    """
    b, t = q_pos.shape
    s = kv_pos.shape[1]
    qp = q_pos.reshape(b, t // block_q, block_q)
    kp = kv_pos.reshape(b, s // block_k, block_k)
    qs = q_seg.reshape(b, t // block_q, block_q)
    ks = kv_seg.reshape(b, s // block_k, block_k)
    pos_ok = kp.min(-1)[:, None, :] <= qp.max(-1)[:, :, None]  # [B, nq, nk]
    seg_ok = (ks.min(-1)[:, None, :] <= qs.max(-1)[:, :, None]) & (
        qs.min(-1)[:, :, None] <= ks.max(-1)[:, None, :]
    )
    return (pos_ok & seg_ok).astype(jnp.int32)


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

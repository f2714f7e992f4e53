"""Ring attention: exact causal attention over a sequence sharded on the mesh's ``seq`` axis.

Axis alphabet: B batch, T tokens (global in the public API, local inside the shard_map), S key tokens, N query
heads, K kv heads, G = N // K, H head dim. W = size of the ``seq`` axis.

Each ``seq`` shard keeps its queries and passes its K/V block (with the keys' positions and segment ids) around
the ring with ``ppermute``; a ``lax.scan`` over hops folds every visiting block into an fp32 online softmax. Masks
come only from positions and segment ids, so any token order works (the zigzag layout of
:mod:`lct_jax.ops.zigzag` balances the causal work). Only the K kv heads travel; query heads are grouped onto them.

Worked example of the schedule, W = 4 shards, 16 tokens, zigzag layout (chunks of 2 tokens, c0..c7):

    shard:                 0          1          2          3
    holds q (and kv)     c0 c7      c1 c6      c2 c5      c3 c4
    hop 0: kv from       self       self       self       self        (diagonal: c0|c0, c7|c0 c7 ...)
    hop 1: kv from       shard 3    shard 0    shard 1    shard 2     ppermute i -> i+1
    hop 2: kv from       shard 2    shard 3    shard 0    shard 1
    hop 3: kv from       shard 1    shard 2    shard 3    shard 0     (W-1 = 3 rotations in the forward)

At hop 1 shard 0 (q: c0 c7) sees kv c3 c4: q-block c0 x kv-blocks c3, c4 is fully masked (positions 6..9 > 0..1)
and skipped inside the kernel; c7 x c3, c7 x c4 run. Every shard runs 2 of 4 block pairs on every off-diagonal hop,
so the work is even; with the contiguous layout shard 0 would skip all of hops 1..3 while shard 3 runs them all.
Blocks are ``block_q`` x ``block_k`` tokens; they must divide a zigzag chunk for this skipping to balance.

Backward (custom VJP): the same hops recompute block probabilities from the saved log-sum-exp (nothing quadratic
in T is stored). dQ stays home; dK/dV accumulators travel with their K/V block and take one extra rotation after
the last hop (W in all), which brings every block's gradient back to its owner.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from lct_jax.kernels import DEFAULT_BLOCKS, KERNELS, get_kernel
from lct_jax.kernels.blocks import BlockSizes, block_ranges, block_visibility, finalize, init_carry

SEQ_AXIS, MODEL_AXIS, DATA_AXIS = "seq", "model", "data"


@dataclasses.dataclass(frozen=True)
class _RingConfig:
    axis_name: str | None  # None: one shard, no collectives
    axis_size: int
    kernel: str
    block_q: int
    block_k: int
    scale: float
    interpret: bool
    local_len: int  # tokens per shard after padding to the blocks (>= the real local length)
    head_passes: int  # kv-head groups run one after another (each a full ring)


def _rotate(xs, cfg: _RingConfig):
    """Send every array one shard forward on the ring (shard i → i + 1)."""
    perm = [(i, (i + 1) % cfg.axis_size) for i in range(cfg.axis_size)]
    return jax.tree.map(lambda x: lax.ppermute(x, cfg.axis_name, perm), xs)


def _hop_kwargs(cfg: _RingConfig):
    return dict(scale=cfg.scale, block_q=cfg.block_q, block_k=cfg.block_k, interpret=cfg.interpret)


def _fwd_block(q, q_pos, q_seg, kv, carry, cfg: _RingConfig):
    """Fold one visiting K/V block into the carry. The kernel skips every q-block x kv-block pair the block ranges
    rule out; there is no ``lax.cond`` around the whole hop: a conditional cannot update the carry in place, and
    its output would be one more fp32 [T, N, H] buffer per hop (14 KB per token for LongVA-7B)."""
    k, v, kv_pos, kv_seg = kv
    ranges = block_ranges(q_pos, kv_pos, q_seg, kv_seg, cfg.block_q, cfg.block_k)  # O(T / block)
    hop = get_kernel(cfg.kernel).fwd_hop
    return hop(q, k, v, q_pos, kv_pos, q_seg, kv_seg, ranges, *carry, **_hop_kwargs(cfg))


def _bwd_block(q, q_pos, q_seg, do, lse, delta, kv, grads, cfg: _RingConfig):
    k, v, kv_pos, kv_seg = kv
    ranges = block_ranges(q_pos, kv_pos, q_seg, kv_seg, cfg.block_q, cfg.block_k)
    hop = get_kernel(cfg.kernel).bwd_hop
    return hop(q, k, v, q_pos, kv_pos, q_seg, kv_seg, ranges, do, lse, delta, *grads, **_hop_kwargs(cfg))


def _ring_fwd_impl(q, k, v, pos, seg, cfg: _RingConfig):
    """Local kernel-layout arrays → (out [B, K, G, T, H] in q.dtype, lse f32[B, K, G, T])."""
    carry = init_carry(q)
    kv = (k, v, pos, seg)
    if cfg.axis_size > 1:

        def hop(state, _):
            carry, kv = state
            with jax.named_scope("ring_rotate_kv"):
                nxt = _rotate(kv, cfg)  # issued before the compute so the transfer can overlap it
            with jax.named_scope("ring_block_fwd"):
                carry = _fwd_block(q, pos, seg, kv, carry, cfg)
            return (carry, nxt), None

        (carry, kv), _ = lax.scan(hop, (carry, kv), length=cfg.axis_size - 1)
    with jax.named_scope("ring_block_fwd"):
        carry = _fwd_block(q, pos, seg, kv, carry, cfg)
    with jax.named_scope("ring_finalize"):
        return finalize(*carry, q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, pos, seg, cfg: _RingConfig):
    return _ring_fwd_impl(q, k, v, pos, seg, cfg)[0]


def _ring_fwd(q, k, v, pos, seg, cfg):
    out, lse = _ring_fwd_impl(q, k, v, pos, seg, cfg)
    return out, (q, k, v, pos, seg, out, lse)


def _ring_bwd(cfg, res, g):
    q, k, v, pos, seg, out, lse = res
    with jax.named_scope("ring_bwd_delta"):
        delta = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, T]
    do = g.astype(q.dtype)
    dq = jnp.zeros(q.shape, jnp.float32)
    dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    kv = (k, v, pos, seg)

    def block(kv, dq, dkv):
        dq, dk, dv = _bwd_block(q, pos, seg, do, lse, delta, kv, (dq, *dkv), cfg)
        return dq, (dk, dv)

    if cfg.axis_size > 1:

        def hop(state, _):
            dq, kv, dkv = state
            with jax.named_scope("ring_rotate_kv"):
                nxt = _rotate(kv, cfg)
            with jax.named_scope("ring_block_bwd"):
                dq, dkv = block(kv, dq, dkv)
            with jax.named_scope("ring_rotate_dkv"):
                dkv = _rotate(dkv, cfg)  # gradients travel with the block they belong to
            return (dq, nxt, dkv), None

        (dq, kv, dkv), _ = lax.scan(hop, (dq, kv, dkv), length=cfg.axis_size - 1)
    with jax.named_scope("ring_block_bwd"):
        dq, dkv = block(kv, dq, dkv)
    if cfg.axis_size > 1:
        with jax.named_scope("ring_rotate_dkv"):
            dkv = _rotate(dkv, cfg)  # W-th rotation: home
    dk, dv = dkv
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# padding tokens (local lengths the blocks do not tile): no real query sees them as keys (position after every
# real one), and their own queries see only each other (a segment id no real token has); their outputs are dropped
PAD_POSITION = np.iinfo(np.int32).max
PAD_SEGMENT = np.iinfo(np.int32).min


def _local_ring(q, k, v, pos, seg, cfg: _RingConfig):
    """Per-shard body: [B, T, N, H] ↔ kernel layout (padded to the blocks), around the custom-VJP ring."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    pos, seg = pos.astype(jnp.int32), seg.astype(jnp.int32)
    pad = cfg.local_len - t
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        pos = jnp.pad(pos, ((0, 0), (0, pad)), constant_values=PAD_POSITION)
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)
    tp = t + pad
    qk = q.reshape(b, tp, kh, n // kh, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    kk, vk = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    passes = math.gcd(cfg.head_passes, kh)
    if passes == 1:
        out = _ring(qk, kk, vk, pos, seg, cfg)  # [B, K, G, T, H]
    else:  # kv heads in `passes` groups, one ring each: fp32 accumulators of one group at a time
        group = lambda x: jnp.moveaxis(x.reshape(b, passes, kh // passes, *x.shape[2:]), 1, 0)  # noqa: E731
        outs = lax.map(lambda a: _ring(*a, pos, seg, cfg), (group(qk), group(kk), group(vk)))
        out = jnp.moveaxis(outs, 0, 1).reshape(qk.shape)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, n, h)[:, :t]


def shard_heads(q, k, v, model: int):
    """Make the heads split evenly over ``model`` tensor-parallel shards, every query head with its kv head.

    - K divisible by ``model``: unchanged (each shard holds K/model kv heads and their query groups);
    - ``model`` divisible by K and N divisible by ``model``: each kv head repeated model/K times, so each shard gets
      the one kv head its query heads use (not a repeat to N);
    - otherwise (e.g. N = 28, K = 4 on model = 8): kv heads repeated to N (one per query head) and q, k, v padded
      with zero heads to a multiple of ``model``; the padded heads' outputs are dropped by the caller (``[..., :N,
      :]``) and, with zero cotangents, add nothing to any gradient.
    """
    n, kh = q.shape[2], k.shape[2]
    if kh % model == 0:
        return q, k, v
    if model % kh == 0 and n % model == 0:
        return q, jnp.repeat(k, model // kh, axis=2), jnp.repeat(v, model // kh, axis=2)
    k, v = jnp.repeat(k, n // kh, axis=2), jnp.repeat(v, n // kh, axis=2)
    extra = -n % model
    if extra:
        q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0))) for x in (q, k, v))
    return q, k, v


def _default_interpret(mesh) -> bool:
    platform = getattr(getattr(mesh, "abstract_device", None), "platform", None) if not mesh.empty else None
    return (platform or jax.default_backend()) == "cpu"


def ring_attention(
    q,
    k,
    v,
    positions,
    segment_ids=None,
    *,
    kernel: str = "xla",
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    head_passes: int = 1,
):
    """Causal ring attention on global arrays; call inside jit under ``jax.set_mesh(mesh)``.

    Args:
      q: [B, T, N, H]; k, v: [B, T, K, H] with K dividing N (bf16 or fp32). Sharded batch over ``data``, tokens
        over ``seq``, heads over ``model`` (heads the ``model`` size does not split: :func:`shard_heads`).
      positions: int[B, T]; key s is visible to query t iff ``positions[s] <= positions[t]``.
      segment_ids: optional int[B, T]; additionally requires equal ids.
      kernel: block kernel, one of :data:`lct_jax.kernels.KERNELS`.
      block_q, block_k: block sizes (default per kernel: :data:`lct_jax.kernels.DEFAULT_BLOCKS`); clipped to the
        local length; a local length they do not tile is padded inside each shard
        (:meth:`lct_jax.kernels.blocks.BlockSizes.for_length`) with tokens no real query sees.
      interpret: run Pallas kernels in interpret mode; default: when the mesh's devices (or backend) are CPU.
      head_passes: run the ring once per group of kv heads (this many groups, rounded to a divisor of the local kv
        heads): the fp32 output / dq / dk / dv accumulators then exist for one group at a time (LongVA-7B: 14 KB
        per token each for all 28 query heads, 3.5 KB with 4 passes), for ``head_passes`` times the hops.
    Returns:
      [B, T, N, H] in q.dtype; rows with no visible key are 0. Gradients in the input dtypes.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown ring attention {kernel=}; expected one of {KERNELS}")
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q [B, T, N, H] and k, v [B, T, K, H]; got {q.shape=} {k.shape=} {v.shape=}"
        )
    b, t, n, h = q.shape
    kh = k.shape[2]
    if k.shape[:2] != (b, t) or k.shape[3] != h:
        raise ValueError(f"k/v {k.shape=} must match q {q.shape=} in batch, length and head dim")
    if n % kh:
        raise ValueError(f"query heads {n=} must be a multiple of kv heads K={kh}")
    if positions.shape != (b, t):
        raise ValueError(f"positions.shape={positions.shape} must be [B, T] = {(b, t)}")
    if segment_ids is None:
        segment_ids = jnp.zeros((b, t), jnp.int32)
    elif segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids.shape={segment_ids.shape} must be [B, T] = {(b, t)}")

    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(mesh.shape)
    w, tp, dp = sizes.get(SEQ_AXIS, 1), sizes.get(MODEL_AXIS, 1), sizes.get(DATA_AXIS, 1)
    if t % w:
        raise ValueError(
            f"sequence length T={t} must be a multiple of the mesh's seq={w} (and of 2*seq={2 * w} for the zigzag "
            f"layout); pad to {-(-t // (2 * w)) * 2 * w}"
        )
    if b % dp:
        raise ValueError(f"batch B={b} must be a multiple of the mesh's data={dp}")
    q, k, v = shard_heads(q, k, v, tp)
    block_q = DEFAULT_BLOCKS[kernel][0] if block_q is None else block_q
    block_k = DEFAULT_BLOCKS[kernel][1] if block_k is None else block_k
    blocks, local_len = BlockSizes(block_q, block_k).for_length(t // w)
    cfg = _RingConfig(
        axis_name=SEQ_AXIS if w > 1 else None,
        axis_size=w,
        kernel=kernel,
        block_q=blocks.block_q,
        block_k=blocks.block_k,
        scale=float(h) ** -0.5,
        interpret=_default_interpret(mesh) if interpret is None else interpret,
        local_len=local_len,
        head_passes=head_passes,
    )
    body = functools.partial(_local_ring, cfg=cfg)
    if mesh.empty:
        return body(q, k, v, positions, segment_ids)[:, :, :n]
    batch_axis = DATA_AXIS if DATA_AXIS in sizes else None
    seq_axis = SEQ_AXIS if SEQ_AXIS in sizes else None
    head_axis = MODEL_AXIS if MODEL_AXIS in sizes else None
    qkv_spec = P(batch_axis, seq_axis, head_axis, None)
    tok_spec = P(batch_axis, seq_axis)
    return jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, tok_spec, tok_spec),
        out_specs=qkv_spec,
        check_vma=False,  # Pallas calls inside need it on jax 0.10
    )(q, k, v, positions, segment_ids)[:, :, :n]


def blocks_per_shard(positions, segment_ids, num_shards: int, block_q: int, block_k: int) -> np.ndarray:
    """int[W]: q-block x kv-block pairs each ``seq`` shard computes over all hops (batch row 0), as the kernels skip.

    ``positions`` / ``segment_ids``: int[B, T] in the layout fed to the model (contiguous or zigzag).
    """
    pos = np.asarray(positions)[:1].reshape(1, num_shards, -1)
    seg = (
        np.zeros_like(pos) if segment_ids is None else np.asarray(segment_ids)[:1].reshape(1, num_shards, -1)
    )
    blocks, local = BlockSizes(block_q, block_k).for_length(pos.shape[-1])
    if local != pos.shape[-1]:
        raise ValueError(f"blocks ({block_q}, {block_k}) do not tile {pos.shape[-1]} tokens per shard")
    counts = np.zeros(num_shards, np.int64)
    for r in range(num_shards):
        for j in range(num_shards):
            vis = block_visibility(pos[:, r], pos[:, j], seg[:, r], seg[:, j], blocks.block_q, blocks.block_k)
            counts[r] += int(np.asarray(vis).sum())
    return counts

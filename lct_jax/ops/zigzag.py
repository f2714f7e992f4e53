"""Zigzag (causally load-balanced) sequence layout for ring attention.

The sequence is cut into 2W equal chunks (W = size of the ``seq`` mesh axis); shard r holds chunks r and
2W-1-r, so under a causal mask every shard does the same work. Worked example, L = 8 tokens, W = 2
(chunks of 2 tokens: c0=[0,1] c1=[2,3] c2=[4,5] c3=[6,7]):

    contiguous layout:  shard 0 = [0 1 2 3]   shard 1 = [4 5 6 7]
    zigzag layout:      shard 0 = [0 1 6 7]   shard 1 = [2 3 4 5]
    zigzag_permutation(8, 2) = [0 1 6 7 2 3 4 5]

Apply it to every per-token field of a batch (tokens, labels, positions, segment ids, loss masks) before the
model; attention masks come from the positions, so the model needs no other change.
"""

from __future__ import annotations

import numpy as np


def check_zigzag_length(length: int, num_shards: int) -> None:
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards} must be >= 1")
    if length % (2 * num_shards):
        lo = length // (2 * num_shards) * 2 * num_shards
        raise ValueError(
            f"sequence length {length} must be a multiple of 2*seq = {2 * num_shards} for the zigzag layout; "
            f"pad to {lo + 2 * num_shards} (or truncate to {lo})"
        )


def zigzag_permutation(length: int, num_shards: int) -> np.ndarray:
    """int[length]: ``x_zigzag = x[perm]``."""
    check_zigzag_length(length, num_shards)
    chunks = np.arange(length).reshape(2 * num_shards, -1)  # [2W, L/2W]
    order = [c for r in range(num_shards) for c in (r, 2 * num_shards - 1 - r)]
    return chunks[order].reshape(-1)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv


def zigzag(x, num_shards: int, axis: int = 1):
    """Reorder ``x`` (numpy or jax array) along ``axis`` into the zigzag layout."""
    return x.take(zigzag_permutation(x.shape[axis], num_shards), axis=axis)


def unzigzag(x, num_shards: int, axis: int = 1):
    """Inverse of :func:`zigzag`."""
    return x.take(inverse_permutation(zigzag_permutation(x.shape[axis], num_shards)), axis=axis)

"""Next-token cross-entropy over a large vocabulary, computed in chunks of the sequence.

Axis alphabet: B batch, T tokens, C chunks, D model dim, V vocab.

Qwen2's 152K vocabulary makes full fp32 logits 608 KB per token, so [T, V] must never exist. The loss walks the
sequence in ``C`` chunks inside a ``lax.scan`` whose body is rematerialized: the forward keeps only two running
sums, and the backward recomputes one chunk's [B, T/C, V] logits at a time. With ``vocab_chunk`` each token chunk
also walks the head in strided vocabulary chunks (an online log-sum-exp), so per device only a [T/C, V/nV] slab of
logits and a [D, V/nV] slice of the head (and of its gradient) exist at once, on any mesh.

Chunks are *strided*: chunk ``c`` holds tokens ``t`` with ``t % C == c``. Reshaping [B, T] to [B, T/C, C] keeps
the token dimension's sequence sharding on the leading ``T/C`` dim, so every device works on its own tokens in
every scan step (a contiguous chunking would hand whole chunks to single devices). The loss is a sum, so the
order of tokens does not matter (zigzag layouts included).

Global correctness: :func:`chunked_cross_entropy` returns the *sum* of per-token losses over the whole global
batch and the number of loss tokens; the train step divides by the token count of the full optimizer batch, so
the mean is exact under sequence sharding and gradient accumulation alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lct_jax.model.layers import pick_num_chunks
from lct_jax.sharding import constrain, gather_weight, mesh_axis_size


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross entropy. logits float32[..., V], targets int[...] → float32[...]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def full_cross_entropy(hidden, head_weight, targets, loss_mask):
    """Reference: materializes the full float32[B, T, V] logits. Returns (loss_sum, num_tokens)."""
    logits = jnp.einsum(
        "btd,dv->btv", hidden, head_weight.astype(hidden.dtype), preferred_element_type=jnp.float32
    )
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(token_losses(logits, targets) * mask), jnp.sum(mask)


def chunked_cross_entropy(
    hidden, head_weight, targets, loss_mask, *, chunk_size: int = 1024, multiple_of=1, vocab_chunk: int = 0
):
    """Sum of next-token losses without materializing [T, V] logits.

    Args:
      hidden: [B, T, D] final hidden states (compute dtype); head_weight: [D, V] output projection;
      targets: int32[B, T] (already shifted); loss_mask: float32[B, T] (1 = trained);
      chunk_size: about how many tokens per row go through the head at once;
      multiple_of: keep T / C divisible by this (the ``seq`` mesh size) so chunks stay sequence-sharded;
      vocab_chunk: about how many vocabulary columns at once (0 = all): each token chunk then walks the head in
        strided vocabulary chunks with an online log-sum-exp, so no device ever holds the whole head, its whole
        gradient, or [chunk, V] logits.
    Returns:
      (loss_sum float32[], num_tokens float32[]).
    """
    b, t, d = hidden.shape
    if targets.shape != (b, t) or loss_mask.shape != (b, t):
        raise ValueError(
            f"{hidden.shape=} needs targets/loss_mask of shape {(b, t)}, got {targets.shape=}, "
            f"{loss_mask.shape=}"
        )
    if head_weight.shape[0] != d:
        raise ValueError(f"{head_weight.shape=} must be [D={d}, V]")
    v = head_weight.shape[1]
    c = pick_num_chunks(t, chunk_size, multiple_of)
    nv = pick_num_chunks(v, vocab_chunk, mesh_axis_size("model")) if vocab_chunk > 0 else 1
    # The weight enters the scans in its own (fp32) dtype and is cast per chunk (gather_weight: cast on its shards,
    # then gathered): the backward accumulates dW over all C chunks in the dtype of what the scan closes over, and
    # bf16 there swamps the small per-chunk terms (2% error in dW at C = 256, vs 0.3% for one chunk); the gather's
    # transpose reduce-scatters each chunk's dW, so the accumulated dW stays on its shards.
    # strided vocab chunks: column u -> (u // nv, u % nv), so the V / nv columns keep the head's vocab sharding
    w = jnp.moveaxis(head_weight.reshape(d, v // nv, nv), 2, 0)  # [nV, D, V/nV]
    # strided chunks: token t -> (t // C, t % C); the chunk axis is moved to the front for the scan
    h = jnp.moveaxis(hidden.reshape(b, t // c, c, d), 2, 0)  # [C, B, T/C, D]
    y = jnp.moveaxis(targets.reshape(b, t // c, c), 2, 0)  # [C, B, T/C]
    m = jnp.moveaxis(loss_mask.astype(jnp.float32).reshape(b, t // c, c), 2, 0)  # [C, B, T/C]

    def logits_of(h_c, w_j):  # [B, T/C, D] x [D, V/nV] -> float32[B, T/C, V/nV], vocab-sharded
        w_j = gather_weight(w_j, ("embed", "vocab"), hidden.dtype)
        logits = jnp.einsum("btd,dv->btv", h_c.astype(hidden.dtype), w_j, preferred_element_type=jnp.float32)
        return constrain(logits, ("act_batch", "act_seq", "act_vocab"))

    @jax.checkpoint
    def chunk_loss(h_c, y_c, m_c):
        h_c = constrain(h_c, ("act_batch", "act_seq", "act_embed"))
        if nv == 1:
            return jnp.sum(token_losses(logits_of(h_c, w[0]), y_c) * m_c)
        # fp32 inside the vocab loop: its backward sums the nV partial dh in the dtype of what the loop closes over
        h32 = h_c.astype(jnp.float32)

        @jax.checkpoint
        def vocab_step(carry, xs):  # online log-sum-exp over vocabulary chunks
            run_max, run_sum, picked = carry  # float32[B, T/C] each
            w_j, j = xs
            logits = logits_of(h32, w_j)
            new_max = jnp.maximum(run_max, logits.max(-1))
            run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.exp(logits - new_max[..., None]).sum(-1)
            here = jnp.take_along_axis(logits, (y_c // nv)[..., None], axis=-1)[..., 0]
            picked = picked + jnp.where(y_c % nv == j, here, 0.0)
            return (new_max, run_sum, picked), None

        init = (jnp.full(y_c.shape, -jnp.inf), jnp.zeros(y_c.shape), jnp.zeros(y_c.shape))
        (run_max, run_sum, picked), _ = jax.lax.scan(vocab_step, init, (w, jnp.arange(nv)))
        return jnp.sum((run_max + jnp.log(run_sum) - picked) * m_c)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    loss_sum, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, y, m))
    return loss_sum, jnp.sum(m)

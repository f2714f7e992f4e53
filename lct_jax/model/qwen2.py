"""Qwen2 decoder (Flax NNX), numerically equal to transformers' ``Qwen2ForCausalLM``.

Axis alphabet: B batch, T tokens, D model dim, N query heads, K kv heads, H head dim, F MLP dim, V vocab.

- RMSNorm in fp32, weight applied after casting back (HF order).
- RoPE in the HF rotate-half layout, cos/sin computed in fp32 from position ids (no fixed-length table), so
  positions can reach millions; theta is configurable (1e6 for Qwen2, 1e9 after LongVA's text extension).
- GQA attention with q/k/v biases and no o bias, through :func:`lct_jax.ops.attention.attention`
  (dense reference or ring attention); SwiGLU MLP; tied or untied LM head.
- Layers are stacked and scanned, rematerialized per layer with a configurable policy (``'offload'`` keeps the saved
  layer inputs in host memory).

Memory layout under the ('data', 'seq', 'model') mesh, for million-token rows:

- the residual stream between layers (the scan carry, i.e. the saved layer inputs) is split over ``seq`` on tokens
  and over ``model`` on D (``act_resid``); each layer gathers D after its norms (``act_embed``) and its output
  projections' partial sums are reduce-scattered back onto the residual's shards;
- the MLP runs blockwise (``mlp_chunk`` tokens of each shard at a time, rematerialized per chunk), so its
  [T, F] intermediates never exist for the whole shard;
- the embedding lookup never gathers the table: the table stays FSDP-sharded, every device looks up its slice of
  D for a chunk of the row's tokens (``embed_chunk``) and an all-to-all returns token-sharded rows; the gradient
  is the transpose, a scatter-add into the device's own slice of the table.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lct_jax.model.layers import (
    Dense,
    RMSNorm,
    param,
    pick_num_chunks,
    scan_layers,
    stack_layers,
    token_chunks,
)
from lct_jax.ops.attention import attention
from lct_jax.sharding import constrain, mesh_axis_size

RESIDUAL = ("act_batch", "act_seq", "act_resid")  # the residual stream between layers
GATHERED = ("act_batch", "act_seq", "act_embed")  # where a layer computes: D whole
Q_NAMES = ("act_batch", "act_seq", "act_heads", None)  # q [B, T, N, H]
KV_NAMES = ("act_batch", "act_seq", "act_kv_heads", None)  # k, v [B, T, K, H]


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int
    hidden_size: int  # D
    num_layers: int
    num_heads: int  # N
    num_kv_heads: int  # K
    intermediate_size: int  # F
    head_dim: int | None = None  # H; defaults to D // N
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"  # compute
    param_dtype: str = "float32"
    remat: str = (
        "full"  # see lct_jax.model.layers.REMAT_POLICIES ('offload': saved layer inputs in host memory)
    )
    mlp_chunk: int = (
        0  # blockwise feed-forward: tokens per seq shard per MLP chunk (0 = the whole shard at once)
    )
    embed_chunk: int = 0  # token-embedding lookup in chunks of this many tokens per row (0 = all at once)
    attention: str = "auto"  # 'dense' | 'ring' | 'auto' (= ring when the mesh's seq axis > 1)
    ring_kernel: str = "xla"  # ring attention block kernel: 'xla' | 'pallas_tpu' | 'pallas_gpu'
    ring_head_passes: int = 1  # kv-head groups the ring runs one after another (less fp32 memory, more hops)
    init_std: float = 0.02

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} does not divide by num_heads={self.num_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.attention not in ("dense", "ring", "auto"):
            raise ValueError(f"attention={self.attention!r}; expected 'dense', 'ring' or 'auto'")

    def replace(self, **kw) -> Qwen2Config:
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, Qwen2Config] = {
    "tiny": Qwen2Config(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128
    ),
    "qwen2_0_5b": Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        tie_word_embeddings=True,
    ),
    "qwen2_1_5b": Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        intermediate_size=8960,
        tie_word_embeddings=True,
    ),
    "qwen2_7b": Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        intermediate_size=18944,
        tie_word_embeddings=False,
    ),
}


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """float32[H/2] = 1 / theta^(2i/H), rounded exactly as transformers computes it in fp32 (fp32 exponent, pow
    rounded to fp32, fp32 reciprocal). A one-ulp difference here is a 2e-4 rad phase error at position 100K, so
    the table follows the arithmetic the checkpoints were trained with rather than the exact real value."""
    exponent = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
    powered = (np.float64(np.float32(theta)) ** exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / powered


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, HF rotate-half layout.  x: [B, T, *, H], positions: int[B, T]."""
    h = x.shape[-1]
    inv_freq = jnp.asarray(rope_inv_freq(h, theta))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs,
            init_std=cfg.init_std,
        )
        self.cfg = cfg
        self.q = Dense((d,), (n, h), ("embed",), ("heads", "head_dim"), use_bias=True, **kw)
        self.k = Dense((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), use_bias=True, **kw)
        self.v = Dense((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), use_bias=True, **kw)
        self.o = Dense((n, h), (d,), ("heads", "head_dim"), ("embed",), use_bias=False, **kw)

    def project(self, x, positions):
        """[B, T, D] → q [B, T, N, H], k, v [B, T, K, H] (RoPE applied to q and k)."""
        cfg = self.cfg
        q = rope(self.q(x), positions, cfg.rope_theta)  # [B, T, N, H]
        k = rope(self.k(x), positions, cfg.rope_theta)  # [B, T, K, H]
        v = self.v(x)  # [B, T, K, H]
        q, k, v = constrain(q, Q_NAMES), constrain(k, KV_NAMES), constrain(v, KV_NAMES)
        return q, k, v

    def __call__(self, x, positions, segment_ids):
        return self.attend(*self.project(x, positions), positions, segment_ids)

    def attend(self, q, k, v, positions, segment_ids):
        """Attention over projected q, k, v and the output projection → [B, T, D]."""
        cfg = self.cfg
        impl = cfg.attention
        if impl == "auto":
            impl = "ring" if mesh_axis_size("seq") > 1 else "dense"
        ring_options = (
            {"kernel": cfg.ring_kernel, "head_passes": cfg.ring_head_passes} if impl == "ring" else {}
        )
        o = attention(q, k, v, positions, segment_ids, impl=impl, **ring_options)  # [B, T, N, H]
        return self.o(o)  # [B, T, D]


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs,
            init_std=cfg.init_std,
        )
        self.gate = Dense((d,), (f,), ("embed",), ("mlp",), use_bias=False, **kw)
        self.up = Dense((d,), (f,), ("embed",), ("mlp",), use_bias=False, **kw)
        self.down = Dense((f,), (d,), ("mlp",), ("embed",), use_bias=False, **kw)
        self.chunk = cfg.mlp_chunk

    def ffn(self, x):
        h = jax.nn.silu(self.gate(x)) * self.up(x)  # [B, T, F]
        h = constrain(h, ("act_batch", "act_seq", "act_mlp"))
        return self.down(h)

    def __call__(self, x, norm=None):  # [B, T, D] residual layout → [B, T, D] residual layout
        """``ffn(norm(x))`` chunk by chunk: the (optional) pre-MLP norm runs inside each chunk, so neither the
        normed activations nor the [T, F] intermediates ever exist for the whole shard."""

        def one(y):
            y = constrain(y if norm is None else norm(y), GATHERED)
            return constrain(self.ffn(y), RESIDUAL)

        return token_chunks(one, x, self.chunk, RESIDUAL)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        kw = dict(
            eps=cfg.rms_norm_eps,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            rngs=rngs,
        )
        self.input_norm = RMSNorm(cfg.hidden_size, **kw)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, segment_ids):  # x: residual [B, T, D], D split over model
        x = constrain(x, RESIDUAL)
        # norm + q/k/v projection is rematerialized from the residual stream on its own, so the gathered normed
        # activations [T, D] are not held while the attention runs its backward. The MLP takes its norm into its
        # rematerialized chunks instead (no checkpoint around it: that kept another [T, D] alive)
        qkv = jax.checkpoint(lambda x: self.attn.project(constrain(self.input_norm(x), GATHERED), positions))(
            x
        )
        x = x + constrain(self.attn.attend(*qkv, positions, segment_ids), RESIDUAL)
        x = x + self.mlp(x, norm=self.post_attn_norm)
        return constrain(x, RESIDUAL)


class Qwen2(nnx.Module):
    """Qwen2 causal LM.

    ``model(input_ids)`` → logits float32[B, T, V]. ``model.encode(...)`` gives the final normed hidden states
    [B, T, D] (for a chunked loss that never materializes [T, V]); ``model.logits(hidden)`` applies the head.
    Either ``input_ids`` int[B, T] or ``inputs_embeds`` [B, T, D] (visual tokens spliced in) may be given.
    ``positions`` default to 0..T-1; ``segment_ids`` (optional) restrict attention to equal ids.
    """

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed = param(
            rngs,
            nnx.initializers.normal(cfg.init_std),
            (cfg.vocab_size, cfg.hidden_size),
            ("vocab", "embed"),
            pdt,
        )
        self.layers = stack_layers(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=pdt, rngs=rngs
        )
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else param(
                rngs,
                nnx.initializers.normal(cfg.init_std),
                (cfg.hidden_size, cfg.vocab_size),
                ("embed", "vocab"),
                pdt,
            )
        )

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """int[B, T] → [B, T, D] in the compute dtype (the residual layout), from the FSDP-sharded table.

        The table is never gathered: for each strided chunk of ``embed_chunk`` tokens per row (token t in chunk
        t % C, as the chunked loss), every device looks up *all* the chunk's tokens in its own [V / model, D /
        (data x seq)] slice (ids all-gathered, a few bytes per token), and one all-to-all hands each device its own
        tokens with D whole. The backward is the transpose: an all-to-all of the rows' gradients and a scatter-add
        into the device's own slice, accumulated over chunks in fp32 (never a whole [V, D] gradient anywhere)."""
        table = constrain(self.embed[...], ("vocab", "embed"))  # [V, D], kept on its shards
        b, t = input_ids.shape
        chunk = self.cfg.embed_chunk if self.cfg.embed_chunk > 0 else t
        c = pick_num_chunks(t, chunk, multiple_of=mesh_axis_size("seq"))  # chunks stay sequence-sharded
        ids = jnp.moveaxis(input_ids.reshape(b, t // c, c), 2, 0)  # [C, B, T/C]

        def lookup(ids_c):
            ids_c = constrain(ids_c, (None, None))  # every device: all of the chunk's ids
            rows = jnp.take(table, ids_c, axis=0)  # [B, T/C, D]: D on its FSDP shards
            rows = constrain(rows.astype(self.cfg.dtype), (None, None, "embed"))
            return constrain(rows, RESIDUAL)  # all-to-all: own tokens, D as the residual stream

        x = jax.lax.map(lookup, ids)  # [C, B, T/C, D]
        x = jnp.moveaxis(x, 0, 2).reshape(b, t, -1)
        return constrain(x, RESIDUAL)

    def encode(self, input_ids=None, *, inputs_embeds=None, positions=None, segment_ids=None) -> jax.Array:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        b, t = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        seq = mesh_axis_size("seq")
        if t % seq:
            raise ValueError(f"sequence length {t} does not divide by the mesh's seq axis ({seq}); pad it")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.cfg.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = constrain(x, RESIDUAL)
        x = scan_layers(self.layers, x, positions, segment_ids, policy=self.cfg.remat)
        return constrain(self.norm(x), GATHERED)

    def head_weight(self) -> jax.Array:
        """[D, V] output projection (the transposed embedding when tied)."""
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, T, D] → float32[B, T, V]."""
        w = self.head_weight().astype(self.cfg.dtype)
        out = jnp.einsum("btd,dv->btv", hidden, w, preferred_element_type=jnp.float32)
        return constrain(out, ("act_batch", "act_seq", "act_vocab"))

    def __call__(self, input_ids=None, *, inputs_embeds=None, positions=None, segment_ids=None) -> jax.Array:
        hidden = self.encode(
            input_ids, inputs_embeds=inputs_embeds, positions=positions, segment_ids=segment_ids
        )
        return self.logits(hidden)


def count_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

"""Ring attention vs dense fp32 attention, vs the `ringattention` package, and inside the Qwen2 decoder.

Default run: a covering set of cases (every kernel, every mesh, segments on/off, zigzag/contiguous, GQA 1/2/7,
fp32 and bf16 each appear). ``@pytest.mark.slow`` adds the cases that hold every combination of values of any
three of those axes (:func:`three_way_cover`):

    .venv/bin/pytest tests/ops/test_ring_attention.py -q              # default (~1-2 min)
    .venv/bin/pytest tests/ops/test_ring_attention.py -q -m slow      # 3-way grid
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lct_jax.model.qwen2 import PRESETS, Qwen2
from lct_jax.ops.attention import dense_attention
from lct_jax.ops.ring_attention import blocks_per_shard, ring_attention
from lct_jax.ops.zigzag import unzigzag, zigzag
from lct_jax.sharding import make_mesh
from lct_jax.testing.ringattention_oracle import oracle_ring_attention

T, H = 64, 8
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def make_inputs(seed, b, n, kh, dtype, segments):
    """Random q/k/v and a contiguous batch: packed documents (positions restart per segment, a padding tail)."""
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.normal(size=(b, T, h_, H)), dtype) for h_ in (n, kh, kh))
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (b, T)).copy()
    seg = np.ones((b, T), np.int32)
    if segments:
        for row in range(b):
            # both cuts before the 5-token padding tail, so every document keeps at least one token
            cuts = np.sort(r.choice(np.arange(3, T - 6), size=2, replace=False))
            seg[row, cuts[0] :] = 2
            seg[row, cuts[1] :] = 3
            seg[row, T - 5 :] = 0  # padding
            for s in (2, 3):
                pos[row, seg[row] == s] -= pos[row, seg[row] == s][0]
    return q, k, v, jnp.asarray(pos), jnp.asarray(seg) if segments else None


def heads(mesh_model, gqa):
    kh = mesh_model if mesh_model > 1 else (1 if gqa == 7 else 2)
    return gqa * kh, kh


def fwd_and_grads(attn, q, k, v, seed=1, scale=0.25):
    """(out, dq, dk, dv) for a random cotangent; ``scale`` keeps gradients O(1) (|g| < 2), where bf16's rounding
    step (2^-7 relative) stays under the absolute 2e-2 bf16 tolerance: the tolerance is absolute, not relative."""
    out, vjp = jax.vjp(attn, q, k, v)
    g = jnp.asarray(scale * np.random.default_rng(seed).normal(size=out.shape), out.dtype)
    return (out, *vjp(g))


def check_against_dense(kernel, seq, model, segments, layout, gqa, dtype):
    n, kh = heads(model, gqa)
    q, k, v, pos, seg = make_inputs(0, 2, n, kh, jnp.dtype(dtype), segments)
    if layout == "zigzag":
        q, k, v, pos = (zigzag(x, seq) for x in (q, k, v, pos))
        seg = None if seg is None else zigzag(seg, seq)
    block = T // (2 * seq)  # one zigzag chunk: the skipping that balances zigzag is exercised
    # reference: fp32 dense attention on the same (rounded) inputs
    dense = lambda q, k, v: dense_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                            pos, pos, seg, seg)  # fmt: skip
    want = jax.jit(lambda q, k, v: fwd_and_grads(dense, q, k, v))(q, k, v)
    ring = lambda q, k, v: ring_attention(q, k, v, pos, seg, kernel=kernel, block_q=block, block_k=block)
    with jax.set_mesh(make_mesh(data=1, seq=seq, model=model)):
        got = jax.jit(lambda q, k, v: fwd_and_grads(ring, q, k, v))(q, k, v)
    errs = [
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        for a, b in zip(got, want, strict=True)
    ]
    for name, a in zip(("out", "dq", "dk", "dv"), got, strict=True):
        assert a.dtype == jnp.dtype(dtype), (name, a.dtype)
    scale = [float(jnp.max(jnp.abs(b))) for b in want]
    report = {
        n: (e, s) for n, e, s in zip(("out", "dq", "dk", "dv"), errs, scale, strict=True)
    }  # (max abs err, max abs ref)
    assert all(np.isfinite(errs)) and max(errs) <= TOL[dtype], report
    return errs


# kernel, (seq, model), segments, layout, gqa, dtype: every value of every axis appears at least once.
COVER = [
    ("xla", (8, 1), True, "zigzag", 2, "float32"),
    ("xla", (4, 2), False, "contiguous", 1, "float32"),
    ("xla", (2, 4), True, "zigzag", 7, "float32"),
    ("xla", (8, 1), True, "zigzag", 7, "bfloat16"),
    ("xla", (4, 2), True, "contiguous", 2, "bfloat16"),
    ("pallas_tpu", (8, 1), True, "zigzag", 2, "float32"),
    ("pallas_tpu", (2, 4), False, "contiguous", 7, "bfloat16"),
    ("pallas_tpu", (4, 2), True, "zigzag", 1, "float32"),
    ("pallas_gpu", (4, 2), True, "zigzag", 1, "float32"),
    ("pallas_gpu", (8, 1), True, "contiguous", 7, "bfloat16"),
    ("pallas_gpu", (2, 4), False, "zigzag", 2, "float32"),
]


@pytest.mark.parametrize("kernel,mesh,segments,layout,gqa,dtype", COVER)
def test_ring_matches_dense(kernel, mesh, segments, layout, gqa, dtype):
    check_against_dense(kernel, *mesh, segments, layout, gqa, dtype)


AXES = (
    ("xla", "pallas_tpu", "pallas_gpu"), ((8, 1), (4, 2), (2, 4)), (False, True), ("zigzag", "contiguous"),
    (1, 2, 7), ("float32", "bfloat16"),
)  # fmt: skip


def three_way_cover(axes, given):
    """Cases that, together with ``given``, hold every combination of values of every 3 axes (greedy: each next
    case is the first of the full product that covers the most combinations still missing). 3-way interactions
    are where ring bugs live (a kernel with a mesh and a layout); the 216-case product costs ~7x the time."""

    def triples(case):
        return {(ix, tuple(case[i] for i in ix)) for ix in itertools.combinations(range(len(axes)), 3)}

    missing = set().union(*map(triples, itertools.product(*axes))) - set().union(*map(triples, given))
    out = []
    while missing:
        best = max(itertools.product(*axes), key=lambda c: len(triples(c) & missing))
        out.append(best)
        missing -= triples(best)
    return out


FULL = three_way_cover(AXES, COVER)


def test_three_way_cover_holds_every_triple_of_values():
    cases = COVER + FULL
    for ix in itertools.combinations(range(len(AXES)), 3):
        seen = {tuple(c[i] for i in ix) for c in cases}
        assert seen == set(itertools.product(*(AXES[i] for i in ix))), ix
    assert len(cases) == len(set(cases)) == 32  # of the 216 in the product (27 at least: kernel x mesh x gqa)


@pytest.mark.slow
@pytest.mark.parametrize("kernel,mesh,segments,layout,gqa,dtype", FULL)
def test_ring_matches_dense_full_grid(kernel, mesh, segments, layout, gqa, dtype):
    check_against_dense(kernel, *mesh, segments, layout, gqa, dtype)


def test_fewer_kv_heads_than_model_shards():
    """K=1 kv head on model=4: each model shard gets the one kv head (repeated to 4, not to N=4*G)."""
    q, k, v, pos, seg = make_inputs(3, 1, 8, 1, jnp.float32, True)
    want = fwd_and_grads(lambda q, k, v: dense_attention(q, k, v, pos, pos, seg, seg), q, k, v)
    with jax.set_mesh(make_mesh(seq=2, model=4)):
        got = jax.jit(
            lambda q, k, v: fwd_and_grads(lambda *a: ring_attention(*a, pos, seg, block_q=8), q, k, v)
        )(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "n,kh,seq,model,kernel",
    [
        (6, 3, 2, 2, "xla"),  # K=3 on model=2: neither divides the other, kv heads repeated to N
        (6, 2, 2, 4, "pallas_tpu"),  # N=6 on model=4 (as Qwen2-7B's 28 on 8): heads padded to 8, kv repeated
    ],
)
def test_heads_that_model_cannot_split(n, kh, seq, model, kernel):
    q, k, v, pos, seg = make_inputs(4, 1, n, kh, jnp.float32, True)
    want = fwd_and_grads(lambda q, k, v: dense_attention(q, k, v, pos, pos, seg, seg), q, k, v)
    ring = lambda *a: ring_attention(*a, pos, seg, kernel=kernel, block_q=8, block_k=8)
    with jax.set_mesh(make_mesh(seq=seq, model=model, devices=jax.devices()[: seq * model])):
        got = jax.jit(lambda q, k, v: fwd_and_grads(ring, q, k, v))(q, k, v)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel,block_q,block_k,passes", [("xla", 8, 16, 2), ("pallas_tpu", 16, 16, 1)])
def test_local_length_the_blocks_do_not_tile(kernel, block_q, block_k, passes):
    """T=48 on seq=4 is 12 tokens per shard, which blocks of 8x16 / 16x16 do not tile: each shard pads to 16 with
    tokens no real query sees; the results equal dense attention (zigzag layout, packed segments). ``passes=2``:
    the two kv heads run as two rings, one after the other."""
    t, seq = 48, 4
    q, k, v, pos, seg = make_inputs(6, 2, 4, 2, jnp.float32, True)
    q, k, v = (x[:, :t] for x in (q, k, v))
    pos, seg = pos[:, :t], seg[:, :t]
    q, k, v, pos, seg = (zigzag(x, seq) for x in (q, k, v, pos, seg))
    want = fwd_and_grads(lambda q, k, v: dense_attention(q, k, v, pos, pos, seg, seg), q, k, v)
    ring = lambda *a: ring_attention(*a, pos, seg, kernel=kernel, block_q=block_q, block_k=block_k,
                                     head_passes=passes)  # fmt: skip
    with jax.set_mesh(make_mesh(seq=seq, model=1, devices=jax.devices()[:seq])):
        got = jax.jit(lambda q, k, v: fwd_and_grads(ring, q, k, v))(q, k, v)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_block_sizes_for_length():
    from lct_jax.kernels.blocks import BlockSizes  # noqa: PLC0415

    b = BlockSizes(256, 512)
    assert b.for_length(512) == (BlockSizes(256, 512), 512)
    assert b.for_length(876) == (BlockSizes(256, 512), 1024)
    assert b.for_length(300) == (BlockSizes(256, 512), 512)
    assert b.for_length(200) == (BlockSizes(200, 200), 200)
    assert BlockSizes(8, 512).for_length(20) == (BlockSizes(8, 24), 24)
    assert BlockSizes(8, 512).for_length(16) == (BlockSizes(8, 16), 16)


@pytest.mark.parametrize("segments,mesh", [(True, (4, 2)), (False, (8, 1))])
def test_matches_ringattention_package(segments, mesh):
    """Same masks, contiguous layout (its causal mask is by global index); its K/V repeated to N heads."""
    q, k, v, pos, seg = make_inputs(5, 2, 4, 2, jnp.float32, segments)
    with jax.set_mesh(make_mesh(data=1, seq=mesh[0], model=mesh[1])):
        ours = jax.jit(
            lambda q, k, v: fwd_and_grads(lambda *a: ring_attention(*a, pos, seg, block_q=4), q, k, v)
        )
        theirs = jax.jit(
            lambda q, k, v: fwd_and_grads(lambda *a: oracle_ring_attention(*a, seg, chunk=4), q, k, v)
        )
        got, want = ours(q, k, v), theirs(q, k, v)
    errs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want, strict=True)]
    assert max(errs) <= 1e-5, errs


@pytest.mark.parametrize("segments", [False, True])
def test_qwen2_ring_zigzag_equals_dense_single_device(segments):
    cfg = PRESETS["tiny"].replace(dtype="float32", attention="auto", num_layers=2)
    model = Qwen2(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    b, t, seq = 2, 32, 4
    r = np.random.default_rng(0)
    ids = jnp.asarray(r.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg = None
    if segments:
        seg = jnp.asarray(np.where(np.arange(t) < 13, 1, 2)[None].repeat(b, 0), jnp.int32)
        pos = jnp.where(seg == 2, pos - 13, pos)
    call = lambda state, ids, pos, seg: nnx.merge(graphdef, state)(ids, positions=pos, segment_ids=seg)
    want = jax.jit(call)(state, ids, pos, seg)  # one device, no mesh: dense attention
    mesh = make_mesh(data=1, seq=seq, model=2)
    zz = lambda x: None if x is None else zigzag(x, seq)
    with jax.set_mesh(mesh):
        lowered = jax.jit(call).lower(state, zz(ids), zz(pos), zz(seg))
        assert "collective_permute" in lowered.as_text(), "attention='auto' with seq > 1 must pick the ring"
        got = unzigzag(jax.jit(call)(state, zz(ids), zz(pos), zz(seg)), seq)
    err = float(jnp.max(jnp.abs(got - want)))
    assert err <= 1e-5, err


def test_zigzag_balances_blocks():
    w, t, blk = 8, 8 * 2 * 64, 64
    pos = np.arange(t, dtype=np.int32)[None]
    contiguous = blocks_per_shard(pos, None, w, blk, blk)
    balanced = blocks_per_shard(zigzag(pos, w), None, w, blk, blk)
    # independent count: q-block x kv-block pairs holding at least one causal pair, from the dense mask
    for layout, counts in (("contiguous", contiguous), ("zigzag", balanced)):
        p = pos if layout == "contiguous" else zigzag(pos, w)
        blocks = p[0].reshape(w, -1, blk)  # [W, nq, bq]
        brute = [
            sum(
                bool((kb[None, :] <= qb[:, None]).any())
                for qb in blocks[r]
                for j in range(w)
                for kb in blocks[j]
            )
            for r in range(w)
        ]
        np.testing.assert_array_equal(counts, brute)
    assert balanced.sum() == contiguous.sum()
    assert balanced.max() / balanced.mean() <= 1.05
    assert contiguous.max() / contiguous.mean() > 1.5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(t=60, seq=8), r"T=60 must be a multiple of the mesh's seq=8.*pad to 64"),
        (dict(kernel="cuda"), r"unknown ring attention kernel='cuda'"),
        (dict(n=6, kh=4), r"query heads n=6 must be a multiple of kv heads K=4"),
    ],
)
def test_clear_errors(kwargs, match):
    kwargs = dict(kwargs)
    t, seq, model = kwargs.pop("t", 32), kwargs.pop("seq", 2), kwargs.pop("model", 1)
    n, kh = kwargs.pop("n", 4), kwargs.pop("kh", 2)
    q = jnp.zeros((1, t, n, 8))
    k = jnp.zeros((1, t, kh, 8))
    pos = jnp.zeros((1, t), jnp.int32)
    with jax.set_mesh(make_mesh(seq=seq, model=model, devices=jax.devices()[: seq * model])):
        with pytest.raises(ValueError, match=match):
            jax.jit(lambda q, k: ring_attention(q, k, k, pos, **kwargs)).lower(q, k)

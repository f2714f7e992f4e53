"""The shared scoring forward: teacher-forced argmax equals the dense full-logits reference, the 8-device ring equals
1 device bit for bit, each device's input slice is built alone, no [T, V] exists at any length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lct_jax.eval.scoring import Layout, Scorer, build_score_forward, device_inputs, padded_length
from lct_jax.model.longva import IMAGE_TOKEN
from lct_jax.model.qwen2 import PRESETS
from lct_jax.ops.zigzag import unzigzag
from lct_jax.sharding import make_mesh
from lct_jax.testing.models import random_model

P, D = 4, 64  # tokens per frame, model dim of the tiny preset


def _mesh(seq):
    return make_mesh(1, seq, 1, devices=jax.devices()[:seq])


def test_padded_length_worked_examples():
    assert padded_length(49, 2) == 52  # a multiple of 2 * seq
    assert padded_length(49, 1) == 50
    assert padded_length(49, 2, bucket=32) == 64
    # more than one 512-token block per shard: whole blocks in each of the 2 * seq zigzag chunks
    assert padded_length(1100, 1) == 2048 and padded_length(5000, 4) == 8192
    assert padded_length(2000, 4) == 2000  # 500 per shard: the block is clipped to the local length
    assert padded_length(4000, 4) == 4096  # 1000 per shard: 2 blocks of 512 in each of 8 chunks
    assert padded_length(432184, 8) == 434176  # V-NIAH at 3000 frames on 8 chips: 53 x 8192


def _frames(n, seed=1):
    tokens = np.random.default_rng(seed).normal(size=(n, P, D)).astype(np.float32)
    calls = []

    def read(f0, f1):
        calls.append((f0, f1))
        return tokens[f0:f1]

    return tokens, read, calls


def _layout(answer, n_frames=5, prefix=7, suffix=6, seed=0):
    rng = np.random.default_rng(seed)
    tokens, read, calls = _frames(n_frames, seed + 1)
    ids = np.concatenate(
        [
            rng.integers(0, 256, prefix),
            np.full(n_frames * P, IMAGE_TOKEN),
            rng.integers(0, 256, suffix),
            np.asarray(answer),
        ]
    )
    lay = Layout(
        ids,
        len(answer),
        pad_id=256,
        visual_start=prefix,
        num_frames=n_frames,
        tokens_per_frame=P,
        frames=read,
    )
    return lay, tokens, calls


@nnx.jit
def _dense_logits(lm, ids, visual):
    x = jnp.where((ids == IMAGE_TOKEN)[:, :, None], visual, lm.embed_tokens(jnp.maximum(ids, 0)))
    return lm(inputs_embeds=x)


def _reference_logits(lm, lay, tokens):
    """Dense fp32 forward on one device in natural order, full [L, V] logits (what scoring must never build)."""
    visual = lay.visual(0, lay.length, D, np.float32)
    return np.asarray(_dense_logits(lm, jnp.asarray(lay.ids)[None], jnp.asarray(visual)[None]))[0]  # [L, V]


def test_scores_equal_dense_reference_and_ring_equals_one_device():
    cfg = PRESETS["tiny"].replace(dtype="float32")
    lm, _ = random_model("qwen2", cfg, std=0.1)  # logits far from ties
    # the model's own greedy continuation is a correct answer under teacher forcing
    answer = []
    for j in range(3):  # placeholders after position j are causally invisible to it: one length, one compile
        lay, tokens, _ = _layout(answer + [0] * (3 - j))
        answer.append(int(_reference_logits(lm, lay, tokens)[lay.scored_positions[j]].argmax()))
    lay, tokens, _ = _layout(answer)
    ref = _reference_logits(lm, lay, tokens)[lay.scored_positions].argmax(-1)
    np.testing.assert_array_equal(ref, answer)
    wrong, _, _ = _layout([answer[0], (answer[1] + 1) % 512, answer[2]])
    ref_wrong = _reference_logits(lm, wrong, tokens)[wrong.scored_positions].argmax(-1)
    for seq in (1, 8):
        scorer = Scorer(lm, _mesh(seq))
        np.testing.assert_array_equal(scorer(lay), answer)  # correct: every answer token predicted
        got = scorer(wrong)
        np.testing.assert_array_equal(got, ref_wrong)
        assert got[0] == answer[0] and not np.array_equal(got, wrong.answer)


def test_each_device_builds_only_its_slice():
    lay, tokens, calls = _layout([1, 2], n_frames=40, prefix=3, suffix=5)
    t = padded_length(lay.length, 8)  # 172 -> 176, 22 tokens per shard
    mesh = _mesh(8)
    ids, positions, score_at, visual = device_inputs(lay, t, 2, mesh, D, np.float32)
    local = t // 8
    # one read per run of consecutive positions in a shard: 16 zigzag chunks of 11 tokens, 15 touch frames, and
    # shard 7's chunks 7 and 8 are one run
    assert len(calls) == 14
    assert max(f1 - f0 for f0, f1 in calls) <= -(-local // P) + 1  # never more than one shard's frames
    assert all(s.data.shape == (1, local, D) for s in visual.addressable_shards)
    dense = lay.visual(0, t, D, np.float32)
    np.testing.assert_array_equal(unzigzag(np.asarray(visual), 8)[0], dense)
    np.testing.assert_array_equal(unzigzag(np.asarray(positions), 8)[0], np.arange(t))
    want_ids = np.concatenate([lay.ids, np.full(t - lay.length, 256)])
    np.testing.assert_array_equal(unzigzag(np.asarray(ids), 8)[0], want_ids)
    np.testing.assert_array_equal(np.asarray(positions)[0, np.asarray(score_at)], lay.scored_positions)


def test_device_memory_is_flat_in_length_no_t_by_v():
    # a 32K vocabulary against D = 64: [T, V] fp32 logits would dwarf everything else
    cfg = PRESETS["tiny"].replace(vocab_size=32768, dtype="float32")
    temps = {}
    for t in (2048, 8192):
        fwd = build_score_forward(cfg, _mesh(8), t, 8)
        # peak, not temp_size_in_bytes: temp sums buffers whether or not they are live at once
        temps[t] = fwd.lower().compile().memory_analysis().peak_memory_in_bytes
    print({t: f"{m / 2**20:.1f} MiB" for t, m in temps.items()})
    logits_per_device = 8192 // 8 * 32768 * 4  # 128 MiB at T = 8192
    assert temps[8192] < logits_per_device / 4, temps
    assert temps[8192] < 2 * temps[2048], temps  # 4x the tokens, well under 2x the temp memory


def test_forward_checks_its_inputs():
    cfg = PRESETS["tiny"]
    with pytest.raises(ValueError, match="multiple of 2 \\* seq"):
        build_score_forward(cfg, _mesh(8), 100, 2)
    with pytest.raises(ValueError, match="data axis must be 1"):
        build_score_forward(cfg, make_mesh(2, 4, 1), 64, 2)
    with pytest.raises(ValueError, match="visual slots must be the run"):
        Layout(
            np.array([1, IMAGE_TOKEN, 2, IMAGE_TOKEN, 3]), 1, visual_start=1, num_frames=1, tokens_per_frame=1
        )

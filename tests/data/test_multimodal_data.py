"""Stage 1/2 rows: placeholder expansion, visual_index, label masks, packing, and every bad input as a counted skip."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from lct_jax.data import unires
from lct_jax.data.loader import PipelineOptions, multimodal_dataset, zigzag_batch
from lct_jax.data.multimodal import MultimodalDataConfig, PrepareSample
from lct_jax.data.skips import BadRecord
from lct_jax.data.templates import IMAGE_TOKEN, encode_qwen_1_5
from lct_jax.data.tokenizer import ByteTokenizer

TILE, TPT = 28, 2  # tiny tiles; 2 visual tokens per tile keep rows short
TOK = ByteTokenizer()


def _img(path, w, h, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return os.path.basename(path)


@pytest.fixture()
def root(tmp_path):
    _img(tmp_path / "wide.png", 60, 28, 1)  # UniRes at tile 28: 3x1 tiles (84x28 canvas)
    _img(tmp_path / "sq.jpg", 20, 20, 2)  # 1x2 tiles (square -> tall canvas, first in order)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    os.makedirs(tmp_path / "vid")
    for i in range(5):
        _img(tmp_path / "vid" / f"{i:03d}.png", 40, 30, 10 + i)
    return tmp_path


def _write(root, records, name="data.json"):
    path = root / name
    path.write_text(json.dumps(records))
    return str(path)


def _cfg(ann, root, **kw):
    base = dict(
        annotations=ann, image_root=str(root), tile=TILE, tokens_per_tile=TPT, max_len=128, max_tiles=6
    )
    opts = kw.pop("options", PipelineOptions(batch_size=1, num_epochs=1, shuffle=False))
    return MultimodalDataConfig(**{**base, **kw}, options=opts)


def _conv(q="<image>\nHi?", a="Yo."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def test_plain_worked_example(root):
    """Stage 1 (crop, 1 tile): the literal row from the multimodal module docstring."""
    ann = _write(root, [{"image": "sq.jpg", "conversations": _conv(a="ab")}])
    cfg = _cfg(ann, root, template="plain", image_mode="crop", max_len=6, max_tiles=1)
    (b,) = list(multimodal_dataset(cfg))
    pad = TOK.pad_id
    assert b["inputs"][0].tolist() == [IMAGE_TOKEN, IMAGE_TOKEN, ord("a"), ord("b"), pad, pad]
    assert b["targets"][0].tolist() == [pad, ord("a"), ord("b"), ord("\n"), pad, pad]
    assert b["loss_mask"][0].tolist() == [0, 1, 1, 1, 0, 0]
    assert b["positions"][0].tolist() == [0, 1, 2, 3, 0, 0]
    assert b["segment_ids"][0].tolist() == [1, 1, 1, 1, 0, 0]
    assert b["visual_index"][0].tolist() == [0, 1, -1, -1, -1, -1]
    want = unires.frame_tiles([unires.load_image(str(root / "sq.jpg"))], tile=TILE)
    assert b["pixels"].dtype == np.uint8  # bytes on the wire; the model normalizes on device
    np.testing.assert_array_equal(b["pixels"][0], want)
    assert b["pixel_mask"][0].tolist() == [True]


def test_stage2_unires_expansion_and_loss(root):
    """Two images, multi-turn: slots per image = tiles * TPT, loss exactly on the template's trained tokens."""
    conv = [
        {"from": "human", "value": "<image>\n<image>\nA?"},
        {"from": "gpt", "value": "B."},
        {"from": "human", "value": "C?"},
        {"from": "gpt", "value": "D."},
    ]
    ann = _write(root, [{"image": ["wide.png", "sq.jpg"], "conversations": conv}])
    cfg = _cfg(ann, root, max_len=160, max_tiles=6, system="S")
    (b,) = list(multimodal_dataset(cfg))
    w = unires.image_tiles(unires.load_image(str(root / "wide.png")), tile=TILE)
    s = unires.image_tiles(unires.load_image(str(root / "sq.jpg")), tile=TILE)
    assert (len(w), len(s)) == (3, 2)
    np.testing.assert_array_equal(b["pixels"][0, :5], np.concatenate([w, s]))
    assert b["pixel_mask"][0].tolist() == [True] * 5 + [False]
    # reference: template ids with each placeholder replaced by its slots
    enc = encode_qwen_1_5(conv, TOK, system="S")
    ids, trained = [], []
    for i, t in zip(enc.ids.tolist(), enc.trained.tolist(), strict=True):
        n = (
            {0: 3 * TPT, 1: 2 * TPT}[sum(x == IMAGE_TOKEN for x in ids) // (3 * TPT)]
            if i == IMAGE_TOKEN
            else 1
        )
        ids += [i] * n
        trained += [t] * n
    n = len(ids) - 1
    assert b["inputs"][0, :n].tolist() == ids[:-1]
    assert b["loss_mask"][0, :n].tolist() == [float(t) for t in trained[1:]]
    assert b["loss_mask"][0, n:].sum() == 0 and (b["segment_ids"][0, n:] == 0).all()
    vi = b["visual_index"][0]
    assert vi[vi >= 0].tolist() == list(range(5 * TPT))  # image 1 then image 2, in order
    assert ((vi >= 0) == (b["inputs"][0] == IMAGE_TOKEN)).all()
    # the trained targets, decoded: every <|im_start|> (but the very first token, which nothing predicts),
    # every <|im_end|> and the "\n" after it, and the answers
    got = TOK.decode(b["targets"][0][b["loss_mask"][0] > 0])
    want = (
        "<|im_end|>\n"  # system turn (its <|im_start|> is token 0)
        "<|im_start|><|im_end|>\n"  # user: images and text masked
        "<|im_start|>B.<|im_end|>\n"  # assistant: answer trained, role name and its newline masked
        "<|im_start|><|im_end|>\n"
        "<|im_start|>D.<|im_end|>\n"
    )
    assert got == want


def test_video_frames(root):
    ann = _write(root, [{"video": "vid", "conversations": _conv()}])
    (b,) = list(multimodal_dataset(_cfg(ann, root, num_frames=4, max_tiles=4)))
    frames = [
        unires.load_image(str(root / "vid" / f"{i:03d}.png"))
        for i in unires.sample_frame_indices(5, num_frames=4)
    ]
    np.testing.assert_array_equal(b["pixels"][0], unires.frame_tiles(frames, tile=TILE))
    assert (b["inputs"][0] == IMAGE_TOKEN).sum() == 4 * TPT


def test_packing_segments_and_visual_offsets(root):
    recs = [
        {"image": "sq.jpg", "conversations": _conv(a="a")},  # 2 tiles
        {"conversations": _conv(q="text only", a="b")},  # 0 tiles
        {"image": "wide.png", "conversations": _conv(a="c")},  # 3 tiles
    ]
    ann = _write(root, recs)
    cfg = _cfg(ann, root, template="qwen_1_5", system="", max_len=200, max_tiles=5, pack=True)
    rows = list(multimodal_dataset(cfg))
    assert len(rows) == 1  # all three fit: 5 tiles, < 200 tokens
    r = {k: v[0] for k, v in rows[0].items()}
    unpacked = [
        {k: v[0] for k, v in b.items()}
        for b in multimodal_dataset(_cfg(ann, root, system="", max_len=200, max_tiles=5, pack=False))
    ]
    t0, m0 = 0, 0
    for seg, u in enumerate(unpacked, start=1):
        n = int((u["segment_ids"] > 0).sum())
        sl = slice(t0, t0 + n)
        assert (r["segment_ids"][sl] == seg).all() and r["positions"][sl].tolist() == list(range(n))
        for k in ("inputs", "targets", "loss_mask"):
            np.testing.assert_array_equal(r[k][sl], u[k][:n])
        np.testing.assert_array_equal(r["visual_index"][sl], np.where(u["visual_index"][:n] >= 0,
                                                                      u["visual_index"][:n] + m0 * TPT, -1))  # fmt: skip
        k = int(u["pixel_mask"].sum())
        np.testing.assert_array_equal(r["pixels"][m0 : m0 + k], u["pixels"][:k])
        t0, m0 = t0 + n, m0 + k
    assert (r["segment_ids"][t0:] == 0).all() and r["pixel_mask"].sum() == 5


def test_every_bad_input_is_skipped_counted_and_the_run_goes_on(root, caplog):
    good = {"image": "sq.jpg", "conversations": _conv()}
    recs = [
        good,
        {"image": "nope.jpg", "conversations": _conv()},  # missing image
        {"image": "broken.jpg", "conversations": _conv()},  # unreadable image
        {"conversations": [{"from": "human", "value": "hi"}]},  # no assistant turn
        {"image": "sq.jpg", "conversations": _conv(q="<image><image>")},  # more placeholders than images
        {"image": "sq.jpg", "conversations": _conv(a="x" * 500)},  # over-long
        {
            "image": ["wide.png", "wide.png", "sq.jpg"],
            "conversations": _conv(q="<image><image><image>"),
        },  # 8 tiles
        {"conversations": [{"from": "alien", "value": "?"}]},  # malformed turn
        good,
    ]
    it = iter(multimodal_dataset(_cfg(_write(root, recs), root)))
    rows = list(it)
    assert len(rows) == 2  # both good records came through, in order, around the bad ones
    c = it.counts()
    assert {k: v for k, v in c.items() if k.startswith("skipped/") and v} == {
        "skipped/missing_image": 1,
        "skipped/bad_image": 1,
        "skipped/no_assistant_turn": 1,
        "skipped/placeholder_mismatch": 1,
        "skipped/too_long": 1,
        "skipped/too_many_tiles": 1,
        "skipped/bad_conversation": 1,
    }
    assert c["rows"] == 2 and c["batches"] == 2
    skips = [r.message for r in caplog.records if r.message.startswith("skipping ")]
    assert len(skips) == 7
    # each warning names its source record (the annotation file and the record's index in it)
    assert [m.split()[1] for m in skips] == [f"{root / 'data.json'}[{k}]" for k in range(1, 8)]
    assert any("broken.jpg" in m for m in skips)  # and the image file


def test_strict_mode_raises(root):
    ann = _write(root, [{"image": "nope.jpg", "conversations": _conv()}])
    opts = PipelineOptions(batch_size=1, num_epochs=1, shuffle=False, strict=True)
    with pytest.raises(BadRecord, match="nope.jpg"):
        list(multimodal_dataset(_cfg(ann, root, options=opts)))
    with pytest.raises(BadRecord, match="placeholder"):
        PrepareSample(_cfg(ann, root)).prepare({"conversations": _conv()} | {"image": ["a", "b"]})


def test_zigzag_multimodal_rows(root):
    ann = _write(root, [{"image": "wide.png", "conversations": _conv()}])
    opts = lambda w: PipelineOptions(batch_size=1, num_epochs=1, shuffle=False, seq_shards=w)  # noqa: E731
    plain = next(iter(multimodal_dataset(_cfg(ann, root, max_len=126, options=opts(1)))))
    zz = next(iter(multimodal_dataset(_cfg(ann, root, max_len=126, options=opts(4)))))  # 126 -> 128
    assert zz["inputs"].shape == (1, 128)
    back = zigzag_batch(zz, 4, inverse=True)
    for k in ("inputs", "targets", "loss_mask", "positions", "segment_ids", "visual_index"):
        np.testing.assert_array_equal(back[k][:, :126], plain[k], err_msg=k)
    assert back["loss_mask"][:, 126:].sum() == 0 and (back["segment_ids"][:, 126:] == 0).all()
    np.testing.assert_array_equal(zz["pixels"], plain["pixels"])

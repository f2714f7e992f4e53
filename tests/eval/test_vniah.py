"""V-NIAH: the worked token layout, the prompt equals the stage-2 template, needle placement, results/heatmap/events,
resume after an interruption, and one-line errors."""

import json
import re

import jax
import numpy as np
import pytest
from PIL import Image

from lct_jax.data.templates import encode_qwen_1_5
from lct_jax.data.tokenizer import ByteTokenizer, load_tokenizer
from lct_jax.eval import vniah
from lct_jax.eval.__main__ import main as eval_main
from lct_jax.eval.cli import EvalError
from lct_jax.eval.grid import GridRun
from lct_jax.eval.loading import load_eval_model
from lct_jax.eval.needles import Needle
from lct_jax.eval.scoring import padded_length
from lct_jax.eval.store import EmbeddingStore
from lct_jax.model.longva import IMAGE_TOKEN
from lct_jax.ops.zigzag import zigzag_permutation
from lct_jax.sharding import make_mesh
from lct_jax.testing.events import read_images, read_scalars


class FakeHaystack:
    """Frame f is filled with f + 1 (the needle will be -1)."""

    def __init__(self, n, p=4, d=3):
        self.shape, self.reads = (n, p, d), []

    def read(self, f0, f1):
        self.reads.append((f0, f1))
        return np.arange(f0 + 1, f1 + 1, dtype=np.float32)[:, None, None] + np.zeros(
            (f1 - f0, *self.shape[1:])
        )


def test_worked_example_layout():
    """The module docstring's example, literally."""
    tok = ByteTokenizer()
    hay = FakeHaystack(2)
    lay = vniah.cell_layout(tok, Needle(None, "Q?", "ab"), np.full((4, 3), -1.0), hay, 2, 0.5, system="Hi.")
    enc = lambda s: tok.encode(s)  # noqa: E731
    head = enc("<|im_start|>system\nHi.<|im_end|>\n<|im_start|>user\n")
    tail = enc("\nQ?<|im_end|>\n<|im_start|>assistant\n")
    assert len(head) == 19 and len(tail) == 16
    want = head + [IMAGE_TOKEN] * 12 + tail + [97, 98]
    np.testing.assert_array_equal(lay.ids, want)
    assert lay.length == 49 and lay.visual_slots == (19, 31) and lay.answer_start == 47
    np.testing.assert_array_equal(lay.scored_positions, [46, 47])  # predict 'a' at 46 and 'b' at 47
    t = padded_length(lay.length, 2)
    assert t == 52  # 3 padding tokens at 49..51
    visual = lay.visual(0, t, 3, np.float32)[:, 0]
    np.testing.assert_array_equal(visual[19:31], [1] * 4 + [-1] * 4 + [2] * 4)  # frame 0, needle, frame 1
    assert not visual[:19].any() and not visual[31:].any()
    perm = zigzag_permutation(t, 2)
    np.testing.assert_array_equal(perm[:26], list(range(0, 13)) + list(range(39, 52)))  # shard 0
    np.testing.assert_array_equal(perm[26:], range(13, 39))  # shard 1


def test_prompt_equals_the_stage2_template_and_spec_text():
    tok = load_tokenizer("qwen")
    question = "What is the color of the umbrella?\nA. red\nB. blue"
    for system in ("You are a helpful assistant.", "Answer in one word."):
        before, after = vniah.prompt_ids(tok, question, system)
        conv = [{"from": "human", "value": f"<image>\n{question}"}]
        template = encode_qwen_1_5(conv, tok, system, add_generation_prompt=True).ids
        np.testing.assert_array_equal(np.concatenate([before, [IMAGE_TOKEN], after]), template)
        # and the spec §7 inference prompt, tokenized as one string on each side of the frames
        np.testing.assert_array_equal(
            before, tok.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
        )
        np.testing.assert_array_equal(after, tok.encode(f"\n{question}<|im_end|>\n<|im_start|>assistant\n"))
    with pytest.raises(EvalError, match="must not contain <image>"):
        vniah.prompt_ids(tok, "<image> again?")


@pytest.mark.parametrize("depth, k", [(0.0, 0), (0.2, 1), (0.6, 3), (1.0, 5)])
def test_needle_goes_in_at_int_depth_times_n(depth, k):
    hay = FakeHaystack(5)
    lay = vniah.cell_layout(ByteTokenizer(), Needle(None, "Q?", "a"), np.full((4, 3), -1.0), hay, 5, depth)
    v0, v1 = lay.visual_slots
    per_frame = lay.visual(v0, v1, 3, np.float32)[::4, 0]  # one value per frame
    want = [1, 2, 3, 4, 5]
    want.insert(k, -1)
    np.testing.assert_array_equal(per_frame, want)
    assert vniah.insert_index(depth, 5) == k


def _run(tiny, out, **kw):
    # one device and a 128-token bucket: both frame counts share one compile (the ring is tested in test_scoring)
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    kw = {"frames": [4, 8], "depths": [0.0, 0.5, 1.0], "tokenizer": "byte", "mesh": one, "bucket": 128,
          "progress": False, **kw}  # fmt: skip
    return vniah.run_vniah(tiny["ckpt"], tiny["haystack"], tiny["needles"], out, **kw)


def test_results_heatmap_events_and_resume_after_interruption(tiny_vniah, tmp_path, monkeypatch):
    full = _run(tiny_vniah, tmp_path / "full")
    assert full["complete"] and len(full["cells"]) == 6
    assert [(c["frames"], c["depth"]) for c in full["cells"]] == [
        (f, d) for f in (4, 8) for d in (0.0, 0.5, 1.0)
    ]
    for c in full["cells"]:
        assert c["insert_at"] == int(c["depth"] * c["frames"])
        assert c["score"] == np.mean([s["correct"] for s in c["samples"]])
        for s in c["samples"]:
            assert s["correct"] == (s["predicted"] == s["expected"])
            assert s["expected_text"] in ("red", "blue") and len(s["predicted"]) == len(s["expected"])
            assert s["padded_length"] == 128
    assert full["config"]["checkpoint"] == str(tiny_vniah["ckpt"]) and full["config"]["system"]
    assert np.isclose(full["mean"], np.mean([c["score"] for c in full["cells"]]))
    png = Image.open(tmp_path / "full" / "heatmap.png")
    assert png.size[0] > 100 and png.size[1] > 100
    scalars = read_scalars(tmp_path / "full" / "tb")
    assert set(scalars["vniah/depth_50"]) == {4, 8} and scalars["vniah/mean"][0] == pytest.approx(
        full["mean"]
    )
    assert "vniah/heatmap" in read_images(tmp_path / "full" / "tb")

    # interrupted after 2 cells: the file holds exactly those; the rerun scores only the other 4
    added = []
    original = GridRun.add

    def add_then_stop(self, cell):
        original(self, cell)
        added.append(cell)
        if len(added) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(GridRun, "add", add_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_vniah, tmp_path / "resumed")
    partial = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert len(partial["cells"]) == 2 and not partial["complete"]
    monkeypatch.setattr(GridRun, "add", original)
    scored = []
    monkeypatch.setattr(vniah, "cell_layout", lambda *a, **k: scored.append(a[4:6]) or CELL_LAYOUT(*a, **k))
    resumed = _run(tiny_vniah, tmp_path / "resumed")
    assert sorted(set(scored)) == [(4, 1.0), (8, 0.0), (8, 0.5), (8, 1.0)]
    assert resumed == full
    assert (tmp_path / "resumed" / "results.json").read_text() == (
        tmp_path / "full" / "results.json"
    ).read_text()
    # a different run into the same directory is refused, naming the difference
    with pytest.raises(EvalError, match="different vniah run \\(depths"):
        _run(tiny_vniah, tmp_path / "resumed", depths=[0.0, 1.0])


CELL_LAYOUT = vniah.cell_layout


def _cli(argv):
    return eval_main(["vniah", *argv])


def test_user_errors_are_one_line(tiny_vniah, tmp_path, capsys):
    t = tiny_vniah
    base = ["--ckpt", str(t["ckpt"]), "--haystack", str(t["haystack"]), "--needles", str(t["needles"])]
    base += [
        "--out",
        str(tmp_path / "o"),
        "--tokenizer",
        "byte",
        "--no-progress",
        "--frames",
        "4",
        "--depths",
        "0",
    ]
    other = tmp_path / "other_hay"
    store = EmbeddingStore.open(t["haystack"])
    copy = EmbeddingStore.create(other, shape=store.shape, dtype=store.meta["dtype"], chunk_frames=12,
                                 meta={"checkpoint": "/elsewhere/checkpoints/7"})  # fmt: skip
    copy.write(0, store.read())
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image": "x.png"}]')
    cases = [
        (["--ckpt", str(tmp_path / "nope")], "no 'params' there"),
        (["--haystack", str(tmp_path)], "is not an embedding store"),
        (["--haystack", str(other)], "was encoded by checkpoint /elsewhere/checkpoints/7"),
        (["--needles", str(bad)], "entry 0 needs non-empty strings image, question, answer"),
        (["--frames", "4:40:4"], "must lie in 1..12"),
        (["--depths", "0,1.5"], "must lie in \\[0, 1\\]"),
        (["--frames", "a:b"], "expected MIN:MAX:STEP"),
        (["--seq", "16"], "--seq 16 --model 1: .* 8 are available"),
    ]
    for extra, message in cases:
        assert _cli(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert re.search(message, err), (message, err)
    # the override: a haystack from another checkpoint is accepted when asked for (the CLI run: test_vniah_resume)
    model = load_eval_model(t["ckpt"], make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    vniah.check_haystack(EmbeddingStore.open(other), model, allow_other_checkpoint=True)
    with pytest.raises(EvalError, match="was encoded by checkpoint"):
        vniah.check_haystack(EmbeddingStore.open(other), model)

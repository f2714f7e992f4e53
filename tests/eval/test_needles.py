"""Needles: the same seed gives the same bytes, each image shows its answer, and bad needle files are named."""

import json

import numpy as np
import pytest
from PIL import Image

from lct_jax.eval.__main__ import main
from lct_jax.eval.cli import EvalError
from lct_jax.eval.needles import COLORS, KINDS, load_needles, make_needles


def _bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_seeded_needles_show_their_answers(tmp_path):
    path = make_needles(tmp_path / "a", seed=0, count=7)
    assert _bytes(tmp_path / "a") == _bytes(make_needles(tmp_path / "b", seed=0, count=7).parent)
    other = json.loads(make_needles(tmp_path / "c", seed=1, count=7).read_text())
    needles = load_needles(path)
    assert [n.answer for n in needles] != [r["answer"] for r in other]
    assert len(needles) == 7 and all(n.answer.isalnum() and " " not in n.answer for n in needles)
    by_kind = dict(zip(KINDS, needles, strict=False))
    img = {k: np.asarray(Image.open(n.image)) for k, n in by_kind.items()}
    # color: the disc's centre has the named color
    assert tuple(img["color"][150, 200]) == COLORS[by_kind["color"].answer]
    # count: the filled cells of the 3x2 grid
    cells = [img["count"][int((r + 0.5) * 150), int((c + 0.5) * 400 / 3)] for r in range(2) for c in range(3)]
    assert sum(tuple(p) == (200, 40, 40) for p in cells) == int(by_kind["count"].answer)
    # shape: the fill fraction of the shape's bounding box tells the four apart; the letter names that option
    q = by_kind["shape"]
    option = {line[1]: line[4:] for line in q.question.splitlines() if line.startswith("(")}[q.answer]
    mask = (img["shape"] == (30, 70, 220)).all(-1)
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    want = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5, "star": 0.36}[option]
    assert abs(fill - want) < 0.05, (option, fill)
    for kind in ("digit", "letter"):
        n = by_kind[kind]
        assert (n.answer.isdigit() if kind == "digit" else n.answer.isupper()) and len(n.answer) == 1
        assert (img[kind] < 100).any()  # something is drawn


def test_bad_needle_files_are_named(tmp_path):
    good = make_needles(tmp_path / "n", seed=0)
    cases = {
        "[]": "non-empty JSON list",
        "{": "not valid JSON",
        json.dumps([{"image": "needle_0.png", "question": "q?"}]): "entry 0 needs non-empty strings",
        json.dumps([{"image": "gone.png", "question": "q?", "answer": "a"}]): "gone.png does not exist",
    }
    for text, why in cases.items():
        bad = tmp_path / "n" / "bad.json"
        bad.write_text(text)
        with pytest.raises(EvalError, match=why):
            load_needles(bad)
    with pytest.raises(EvalError, match="no such file"):
        load_needles(tmp_path / "missing.json")
    assert len(load_needles(good.parent)) == 5  # a directory holding needles.json


def test_make_needles_cli(tmp_path, capsys):
    assert main(["make-needles", "--out", str(tmp_path / "n"), "--seed", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["make-needles", "--out", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pass --overwrite" in err and err.count("\n") == 1

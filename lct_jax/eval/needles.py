"""V-NIAH needles: images with a question and a one-word (or one-letter) answer; generated from a seed, or your own.

    python -m lct_jax.eval make-needles --out needles/ --seed 0 [--count 5]

writes ``needles/needles.json``, a list of ``{"image": "needle_0.png", "question": ..., "answer": ...}`` (image
paths relative to the JSON file), and the images next to it. :func:`load_needles` reads such a file (generated or
written by hand) and checks it. The generated needles cycle through five kinds, each drawn large on a plain
400x300 background so that it survives the letterbox and a 336 (or 56) pixel tile:

    color    a big disc              "What is the color of the big disc? Answer with one word."  → "red"
    digit    one digit               "What digit is shown in the image? Answer with the digit."   → "7"
    shape    one shape, 4 options    "Which shape is shown? (A) ... Answer with the option's letter" → "C"
    count    1-6 squares             "How many squares are in the image? Answer with a number."   → "4"
    letter   one capital letter      "What letter is shown in the image? Answer with the letter." → "K"

Answers are drawn from the seed (numpy PCG64 per needle), so the same command gives the same bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lct_jax.convert.checkpoint import atomic_directory
from lct_jax.eval.cli import EvalError

NEEDLES_JSON = "needles.json"
SIZE = (400, 300)
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "purple": (130, 40, 170),
    "orange": (250, 130, 10),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle", "star")
KINDS = ("color", "digit", "shape", "count", "letter")


@dataclasses.dataclass(frozen=True)
class Needle:
    image: str  # absolute path
    question: str
    answer: str


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "star":  # 5 points, inner radius 0.45 r
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        return [
            (cx + rr * math.sin(k * math.pi / 5), cy - rr * math.cos(k * math.pi / 5))
            for k, rr in enumerate(radii)
        ]
    raise ValueError(shape)


def _needle(kind: str, rng: np.random.Generator) -> tuple[Image.Image, str, str]:
    """(image, question, answer) of one needle of ``kind``."""
    w, h = SIZE
    img = Image.new("RGB", SIZE, (235, 235, 235) if kind != "color" else (128, 128, 128))
    draw = ImageDraw.Draw(img)
    ink = (20, 20, 20)
    if kind == "color":
        name = str(rng.choice(list(COLORS)))
        draw.ellipse((w / 2 - 120, h / 2 - 120, w / 2 + 120, h / 2 + 120), fill=COLORS[name])
        return img, "What is the color of the big disc in the image? Answer with one word.", name
    if kind in ("digit", "letter"):
        text = str(rng.integers(0, 10)) if kind == "digit" else chr(ord("A") + int(rng.integers(0, 26)))
        font = ImageFont.load_default(size=240)
        draw.text((w / 2, h / 2), text, fill=ink, font=font, anchor="mm")
        what = "digit" if kind == "digit" else "letter"
        return img, f"What {what} is shown in the image? Answer with the {what}.", text
    if kind == "shape":
        shape = str(rng.choice(SHAPES))
        if shape == "circle":
            draw.ellipse((w / 2 - 120, h / 2 - 120, w / 2 + 120, h / 2 + 120), fill=(30, 70, 220))
        else:
            draw.polygon(_polygon(shape, w / 2, h / 2, 120), fill=(30, 70, 220))
        options = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
        letters = "ABCD"
        listed = "\n".join(f"({letters[i]}) {o}" for i, o in enumerate(options))
        question = (
            f"Which shape is shown in the image?\n{listed}\n"
            "Answer with the option's letter from the given choices directly."
        )
        return img, question, letters[options.index(shape)]
    if kind == "count":
        n = int(rng.integers(1, 7))
        cells = rng.permutation(6)[:n]  # a 3x2 grid of cells, n of them filled
        for c in cells:
            cx, cy = (c % 3 + 0.5) * w / 3, (c // 3 + 0.5) * h / 2
            draw.rectangle((cx - 40, cy - 40, cx + 40, cy + 40), fill=(200, 40, 40))
        return img, "How many squares are in the image? Answer with a number.", str(n)
    raise ValueError(f"unknown needle kind {kind!r}")


def make_needles(out, *, seed: int = 0, count: int = 5, overwrite: bool = False) -> Path:
    """Write ``count`` needles (kinds in :data:`KINDS` order, repeating) to the directory ``out`` atomically;
    returns the path of its ``needles.json``."""
    if count < 1:
        raise EvalError(f"--count {count} must be >= 1")
    records = []
    with atomic_directory(out, overwrite=overwrite) as tmp:
        for i in range(count):
            img, question, answer = _needle(KINDS[i % len(KINDS)], np.random.default_rng([seed, i]))
            name = f"needle_{i}.png"
            img.save(tmp / name)
            records.append({"image": name, "question": question, "answer": answer})
        (tmp / NEEDLES_JSON).write_text(json.dumps(records, indent=1) + "\n")
    return Path(out) / NEEDLES_JSON


def load_needles(path) -> list[Needle]:
    """Needles from a JSON file (or a directory holding ``needles.json``): a non-empty list of objects with an
    ``image`` (relative to the JSON's directory, or absolute) that exists, a ``question`` and a non-empty
    ``answer``. Anything else is an :class:`EvalError` naming the entry."""
    path = Path(path)
    if path.is_dir():
        path = path / NEEDLES_JSON
    if not path.is_file():
        raise EvalError(f"needles {path}: no such file; write one with `python -m lct_jax.eval make-needles`")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EvalError(f"needles {path}: not valid JSON ({e})") from e
    if not isinstance(records, list) or not records:
        raise EvalError(f"needles {path}: expected a non-empty JSON list of {{image, question, answer}}")
    needles = []
    for i, r in enumerate(records):
        ok = isinstance(r, dict) and all(
            isinstance(r.get(k), str) and r.get(k) for k in ("image", "question", "answer")
        )
        if not ok:
            raise EvalError(
                f"needles {path}: entry {i} needs non-empty strings image, question, answer; got {r!r}"
            )
        image = (path.parent / r["image"]).absolute()
        if not image.is_file():
            raise EvalError(f"needles {path}: entry {i}: image {image} does not exist")
        needles.append(Needle(str(image), r["question"], r["answer"]))
    return needles


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help=f"directory to write ({NEEDLES_JSON} + images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=5, help=f"needles, cycling through the kinds {KINDS}")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args) -> int:
    path = make_needles(args.out, seed=args.seed, count=args.count, overwrite=args.overwrite)
    for n in load_needles(path):
        print(f"{Path(n.image).name}: {n.question.splitlines()[0]} -> {n.answer}")
    print(f"wrote {path}")
    return 0

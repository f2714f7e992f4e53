r"""Text NIAH (LongVA's stage-0 check, spec §9): is a 7-digit number found deep inside a long document?

    python -m lct_jax.eval text-niah --ckpt CKPT --out OUT [--lengths 32768:524288:32768] [--depths 0:1:0.1] \
        [--filler essays.txt] [--samples 5] [--distractors 0] [--seed 0] [--seq -1 --model 1]

Works on stage-0 (Qwen2) and stage-1/2 (LongVA: its ``lm``) checkpoints and on imported Hugging Face ones.

For a cell (length L, depth d) and a sample with the number N: the haystack is the first L tokens of the filler
(a local text file, repeated until long enough, or a built-in seeded sentence generator), tokenized once; the
needle ``"\nThe special magic Singapore number is: N.\n"`` goes in at ``int(d·L)``, moved forward to just after
the next period token (the tokenizer's own ``.`` id; depth 0 = the very start, no period after = the end);
optional distractors (other cities, their own numbers) go in at random positions snapped the same way. The
sequence (no chat template) is::

    "This is a very long story book: <book>" + haystack with needles + "</book>.\n Based on the content of the
    book, Question: What is the special magic Singapore number? Answer: The special magic Singapore number is: "
    + the digits of N

and it scores as V-NIAH does (:mod:`lct_jax.eval.scoring`): correct iff the argmax at every digit is that digit.
The cell score is the mean over the samples (the same seeded numbers in every cell). Worked example
(tests/eval/test_text_niah.py): byte tokenizer, L = 20 filler tokens ``"aaaa. bbbb. cccc. dd"``, depth 0.3:
``int(0.3·20) = 6`` is inside ``"bbbb."``, whose period at index 10 puts the needle at 11, so the haystack reads
``"aaaa. bbbb." + needle + " cccc. dd"``; prefix 38 + haystack 20 + needle 49 + question 145 = 252 tokens, then
the 7 digits at 252..258, scored at positions 251..257.

Library use::

    from lct_jax.eval.text_niah import run_text_niah
    results = run_text_niah("runs/stage0", "out/text_niah", lengths=[256, 512], depths=[0.0, 0.5, 1.0])
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from lct_jax.convert.checkpoint import config_to_dict
from lct_jax.eval.cli import EvalError, start_distributed
from lct_jax.eval.grid import GridRun, parse_grid, print_summary
from lct_jax.eval.loading import (
    add_model_arguments,
    eval_setup,
    resolve_checkpoint,
    run_kwargs,
)
from lct_jax.eval.scoring import Layout, Scorer, sample_record

PREFIX = "This is a very long story book: <book>"
NEEDLE = "\nThe special magic {city} number is: {number}.\n"
QUESTION = (
    "</book>.\n Based on the content of the book, Question: What is the special magic {city} number? "
    "Answer: The special magic {city} number is: "
)
CITY = "Singapore"
DISTRACTOR_CITIES = ("New York", "London", "Paris", "Tokyo", "Beijing", "Berlin")
DEFAULT_LENGTHS = "32768:524288:32768"
DEFAULT_DEPTHS = "0:1:0.1"

_SUBJECTS = (
    "the painter",
    "an old sailor",
    "my neighbour",
    "the young founder",
    "a quiet student",
    "the city",
)
_VERBS = ("remembered", "built", "questioned", "described", "forgot", "admired", "measured")
_OBJECTS = (
    "a long winter",
    "the first startup",
    "an unfinished essay",
    "the harbour at night",
    "a simple idea",
)
_TAILS = ("before anyone noticed", "with great care", "for many years", "without a plan", "in the end")


def builtin_filler(seed: int = 0) -> Iterator[str]:
    """Endless seeded prose of short plain sentences, each ending in ``". "`` (sentence ends for the snap)."""
    r = random.Random(f"filler-{seed}")
    while True:
        s = f"{r.choice(_SUBJECTS)} {r.choice(_VERBS)} {r.choice(_OBJECTS)} {r.choice(_TAILS)}."
        yield s[0].upper() + s[1:] + " "


def filler_tokens(tok, length: int, filler: str | os.PathLike | None = None, seed: int = 0) -> np.ndarray:
    """int32[length]: the first ``length`` tokens of the filler (a text file, repeated until long enough; or the
    built-in generator), tokenized once."""
    if filler is not None:
        try:
            text = Path(filler).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EvalError(f"--filler {filler}: cannot read it as UTF-8 text ({e})") from e
        ids = np.asarray(tok.encode(text), np.int32)
        if len(ids) == 0:
            raise EvalError(f"--filler {filler} is empty")
        return np.tile(ids, -(-length // len(ids)))[:length]
    parts, n, gen = [], 0, builtin_filler(seed)
    while n < length:  # bounded: every chunk adds at least 200 sentences' tokens
        ids = np.asarray(tok.encode("".join(next(gen) for _ in range(200))), np.int32)
        parts.append(ids)
        n += len(ids)
    return np.concatenate(parts)[:length]


def period_id(tok) -> int:
    ids = tok.encode(".")
    if len(ids) != 1:
        raise EvalError(
            f"the tokenizer encodes '.' as {ids}, not one token: there is no period id to snap to"
        )
    return ids[0]


def snap_after_period(tokens: np.ndarray, start: int, period: int) -> int:
    """Just after the first period at or after ``start`` (``len(tokens)`` when there is none)."""
    hits = np.flatnonzero(tokens[start:] == period)
    return start + int(hits[0]) + 1 if len(hits) else len(tokens)


def needle_position(haystack: np.ndarray, depth: float, period: int) -> int:
    """``int(depth·L)`` moved forward to just after the next period; depth 0 is the very start."""
    if depth == 0:
        return 0
    return snap_after_period(haystack, int(len(haystack) * depth), period)


def sample_numbers(samples: int, seed: int) -> list[int]:
    """The 7-digit numbers every cell asks about (the same in every cell)."""
    r = random.Random(f"numbers-{seed}")
    return [r.randint(10**6, 10**7 - 1) for _ in range(samples)]


def text_layout(
    tok,
    haystack: np.ndarray,
    depth: float,
    number: int,
    *,
    distractors: Sequence[tuple[str, int]] = (),
    rng: random.Random | None = None,
) -> Layout:
    """The scored sequence for one sample (module docstring); ``distractors`` are (city, number) pairs placed at
    ``rng`` positions."""
    enc = lambda s: np.asarray(tok.encode(s), np.int32)  # noqa: E731
    period = period_id(tok)
    at = needle_position(haystack, depth, period)
    body = np.concatenate([haystack[:at], enc(NEEDLE.format(city=CITY, number=number)), haystack[at:]])
    for city, n in distractors:
        at = snap_after_period(body, rng.randrange(len(body)), period)
        body = np.concatenate([body[:at], enc(NEEDLE.format(city=city, number=n)), body[at:]])
    answer = enc(str(number))
    ids = np.concatenate([enc(PREFIX), body, enc(QUESTION.format(city=CITY)), answer])
    return Layout(ids, answer_len=len(answer), pad_id=tok.pad_id)


def distractor_needles(count: int, seed: int) -> list[tuple[str, int]]:
    """(city, number) of each distractor, the same in every cell."""
    r = random.Random(f"distractors-{seed}")
    return [(city, r.randint(10**6, 10**7 - 1)) for city in DISTRACTOR_CITIES[:count]]


def cell_layouts(
    tok, haystack: np.ndarray, depth: float, numbers: Sequence[int], distractors, seed: int
) -> list[Layout]:
    """One :func:`text_layout` per number; distractor positions are seeded per (length, depth, sample), so any
    cell can be scored alone (a resumed run gets the same sequences)."""
    out = []
    for i, n in enumerate(numbers):
        rng = random.Random(f"{seed}-{len(haystack)}-{depth}-{i}")
        out.append(text_layout(tok, haystack, depth, n, distractors=distractors, rng=rng))
    return out


def run_text_niah(
    model,
    out,
    *,
    lengths: Sequence[int] = tuple(parse_grid(DEFAULT_LENGTHS, int)),
    depths: Sequence[float] = tuple(parse_grid(DEFAULT_DEPTHS)),
    samples: int = 5,
    distractors: int = 0,
    filler: str | os.PathLike | None = None,
    seed: int = 0,
    tokenizer=None,
    mesh: Mesh | None = None,
    param_dtype: str | None = None,
    dtype: str | None = None,
    attention: str | None = None,
    ring_kernel: str | None = None,
    bucket: int = 1,
    progress: bool = True,
) -> dict:
    """Run (or resume) the text-NIAH grid ``lengths x depths`` into ``out`` and return the results dict.

    ``model``: a Qwen2 or LongVA checkpoint path (restored onto ``mesh``, default: every device on ``seq``) or an
    :class:`~lct_jax.eval.loading.EvalModel`; ``lengths`` are haystack tokens (the prompt adds ~230 with the byte
    tokenizer, ~60 with Qwen's); the other arguments as in :func:`lct_jax.eval.vniah.run_vniah`."""
    lengths, depths = sorted(int(x) for x in lengths), sorted(float(d) for d in depths)
    if not lengths or lengths[0] < 1:
        raise EvalError(f"--lengths {lengths}: must be >= 1 token")
    if not depths or depths[0] < 0 or depths[-1] > 1:
        raise EvalError(f"--depths {depths}: must lie in [0, 1]")
    if samples < 1 or not 0 <= distractors <= len(DISTRACTOR_CITIES):
        raise EvalError(f"--samples {samples} must be >= 1 and --distractors {distractors} in 0..6")
    overrides = dict(param_dtype=param_dtype, dtype=dtype, attention=attention, ring_kernel=ring_kernel)
    mesh, model, tok = eval_setup(model, mesh, tokenizer, **overrides)
    config = {
        "checkpoint": str(model.checkpoint),
        "model": {"kind": model.kind, **config_to_dict(model.cfg)},
        "lengths": lengths,
        "depths": depths,
        "samples": samples,
        "distractors": distractors,
        "filler": str(Path(filler).absolute()) if filler is not None else "builtin",
        "seed": seed,
        "bucket": bucket,
    }
    grid = GridRun(out, "text_niah", "length", config)
    numbers = sample_numbers(samples, seed)
    others = distractor_needles(distractors, seed)
    scorer = Scorer(model.lm, mesh, bucket=bucket)
    hay = None  # tokenized once, only if a cell is left to score

    def score_cell(length: int, depth: float) -> dict:
        nonlocal hay
        if hay is None:
            hay = filler_tokens(tok, lengths[-1], filler, seed)
        layouts = cell_layouts(tok, hay[:length], depth, numbers, others, seed)
        padded = scorer.padded_length(max(lay.length for lay in layouts))  # one compile per length
        num_answer = max(lay.answer_len for lay in layouts)
        recs = []
        for i, (n, lay) in enumerate(zip(numbers, layouts, strict=True)):
            pred = scorer(lay, length=padded, num_answer=num_answer)
            recs.append(sample_record(i, f"{CITY} number {n}", lay, pred, tok, padded))
        return {
            "needle_at": needle_position(hay[:length], depth, period_id(tok)),
            "score": float(np.mean([s["correct"] for s in recs])),
            "samples": recs,
        }

    return grid.run(
        lengths, depths, score_cell, title="Text NIAH", x_label="haystack tokens", progress=progress
    )


# ---------------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="Qwen2 or LongVA checkpoint (step dir, workdir, model dir)")
    p.add_argument("--out", required=True, help="results.json, heatmap.png and tb/ go here (resumable)")
    p.add_argument("--lengths", default=DEFAULT_LENGTHS, help="haystack tokens, MIN:MAX:STEP or a comma list")
    p.add_argument("--depths", default=DEFAULT_DEPTHS, help="needle depths in [0, 1], MIN:MAX:STEP or a list")
    p.add_argument("--samples", type=int, default=5, help="needles (random 7-digit numbers) per cell")
    p.add_argument("--distractors", type=int, default=0, help="other cities' numbers in the haystack (0..6)")
    p.add_argument(
        "--filler", default=None, help="UTF-8 text file for the haystack (default: built-in prose)"
    )
    p.add_argument("--seed", type=int, default=0, help="numbers, distractor positions and built-in filler")
    add_model_arguments(p)


def run(args) -> int:
    ckpt = resolve_checkpoint(args.ckpt)  # the user's mistakes end before JAX starts its backends
    lengths, depths = parse_grid(args.lengths, int), parse_grid(args.depths)
    start_distributed(args)
    results = run_text_niah(
        ckpt,
        args.out,
        lengths=lengths,
        depths=depths,
        samples=args.samples,
        distractors=args.distractors,
        filler=args.filler,
        seed=args.seed,
        **run_kwargs(args),
    )
    print_summary("text NIAH", results, args.out)
    return 0

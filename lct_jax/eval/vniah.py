r"""V-NIAH, the visual needle in a haystack (LongVA spec §9): is a needle frame found among N haystack frames?

    python -m lct_jax.eval vniah --ckpt STAGE2_CKPT --haystack HAYSTACK_DIR --needles needles.json --out OUT \
        [--frames 200:3000:200] [--depths 0:1:0.2] [--system TEXT] [--seq -1 --model 1] [--param-dtype bfloat16]

Axis alphabet: N haystack frames, P visual tokens per frame (144 at full size), D model dim, A answer tokens.

For every cell (N frames, depth d) and every needle {image, question, answer}: the needle image (letterboxed and
encoded by the checkpoint's own tower, projector and pool) is inserted at frame index ``k = int(d·N)`` among the
first N haystack frames (read from the embedding store that ``python -m lct_jax.eval haystack`` wrote with the
same checkpoint), and the LM scores the answer under teacher forcing (:mod:`lct_jax.eval.scoring`): the needle is
found iff the argmax at every answer position is the answer token. A cell's score is the mean over the needles.

The prompt is the stage-2 ``qwen_1_5`` template of the conversation ``[{"from": "human", "value": "<image>\n" +
question}]`` with the generation prompt (spec §7), its ``<image>`` replaced by the N + 1 frames, then the answer
tokens (spec §9). Worked example (tests/eval/test_vniah.py): byte tokenizer, ``system="Hi."``, question ``"Q?"``,
answer ``"ab"``, P = 4 tokens per frame, N = 2 haystack frames, depth 0.5 (k = int(0.5·2) = 1), seq = 2::

    positions  0..18   <|im_start|>system\nHi.<|im_end|>\n<|im_start|>user\n      19 text tokens
              19..22   haystack frame 0                                            4 visual tokens
              23..26   needle frame (k = 1)                                        4 visual tokens
              27..30   haystack frame 1                                            4 visual tokens
              31..46   \nQ?<|im_end|>\n<|im_start|>assistant\n                     16 text tokens
              47..48   a b                                                         answer (A = 2)
              49..51   padding (<|endoftext|>)                                     T = 52 (a multiple of 2·seq)
    scored:   the head at position 46 must predict 'a' (97), at 47 'b' (98)
    zigzag:   chunks of 13; shard 0 holds positions 0..12 and 39..51, shard 1 holds 13..38

Results, heatmap and events: :mod:`lct_jax.eval.grid` (``OUT/results.json``, resumable cell by cell;
``OUT/heatmap.png``; ``OUT/tb``).

Library use (issue 10 style)::

    from lct_jax.eval.vniah import Needle, run_vniah
    results = run_vniah("runs/stage2", "haystacks/movie", "needles.json", "out/vniah",
                        frames=[20, 40, 60], depths=[0.0, 0.5, 1.0], system="You are a helpful assistant.")
    results["mean"], results["cells"][0]["samples"][0]["predicted_text"]
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh
from PIL import Image

from lct_jax.convert.checkpoint import config_to_dict
from lct_jax.data.templates import DEFAULT_SYSTEM, IMAGE_PLACEHOLDER, encode_qwen_1_5
from lct_jax.data.unires import load_image
from lct_jax.eval.cli import EvalError, start_distributed
from lct_jax.eval.encode import FrameEncoder, letterbox
from lct_jax.eval.grid import GridRun, parse_grid, print_summary
from lct_jax.eval.loading import (
    EvalModel,
    add_model_arguments,
    eval_setup,
    resolve_checkpoint,
    run_kwargs,
)
from lct_jax.eval.needles import Needle, load_needles
from lct_jax.eval.scoring import Layout, Scorer, sample_record
from lct_jax.eval.store import EmbeddingStore, StoreError
from lct_jax.model.longva import IMAGE_TOKEN

DEFAULT_FRAMES = "200:3000:200"
DEFAULT_DEPTHS = "0:1:0.2"


def _needle_pixels(needle: Needle, tile: int) -> np.ndarray:
    image = needle.image
    if isinstance(image, np.ndarray):  # library callers may pass pixels instead of a path
        image = Image.fromarray(image)
    return letterbox(image if isinstance(image, Image.Image) else load_image(image), tile)


def encode_needles(model, needles: Sequence[Needle], mesh: Mesh) -> np.ndarray:
    """[K, P, D] visual tokens of the needle images, encoded as the haystack frames are (letterbox, tower,
    projector, 2x2 pool)."""
    frames = np.stack([_needle_pixels(n, model.cfg.tile) for n in needles])
    ways = mesh.shape["data"] * mesh.shape["seq"]
    return FrameEncoder(model, batch_size=ways, mesh=mesh)(frames)


def prompt_ids(tok, question: str, system: str = DEFAULT_SYSTEM) -> tuple[np.ndarray, np.ndarray]:
    """(before, after) the frames: the ``qwen_1_5`` generation prompt for ``<image>\\n{question}`` split at its
    image placeholder."""
    if IMAGE_PLACEHOLDER in question:
        raise EvalError(f"needle question {question!r} must not contain {IMAGE_PLACEHOLDER}")
    enc = encode_qwen_1_5(
        [{"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}"}],
        tok,
        system,
        add_generation_prompt=True,
    )
    (at,) = np.flatnonzero(enc.ids == IMAGE_TOKEN)
    return enc.ids[:at], enc.ids[at + 1 :]


def insert_index(depth: float, num_frames: int) -> int:
    """The needle's frame index among ``num_frames`` haystack frames: ``int(depth · N)`` (spec §9)."""
    return int(depth * num_frames)


def cell_layout(
    tok,
    needle: Needle,
    needle_tokens: np.ndarray,
    haystack: EmbeddingStore,
    num_frames: int,
    depth: float,
    system: str = DEFAULT_SYSTEM,
) -> Layout:
    """The scored sequence of one cell and needle (module docstring): ``needle_tokens`` [P, D] inserted at
    :func:`insert_index` among haystack frames [0, N), read lazily from the store."""
    before, after = prompt_ids(tok, needle.question, system)
    answer = np.asarray(tok.encode(needle.answer), np.int32)
    p = needle_tokens.shape[0]
    k = insert_index(depth, num_frames)

    def frames(f0: int, f1: int) -> np.ndarray:  # virtual frames: haystack[:k] + needle + haystack[k:N]
        parts = []
        if f0 < k:
            parts.append(haystack.read(f0, min(f1, k)))
        if f0 <= k < f1:
            parts.append(needle_tokens[None])
        if f1 > k + 1:
            parts.append(haystack.read(max(f0, k + 1) - 1, f1 - 1))
        return np.concatenate([x.astype(needle_tokens.dtype, copy=False) for x in parts])

    n_visual = (num_frames + 1) * p
    ids = np.concatenate([before, np.full(n_visual, IMAGE_TOKEN, np.int32), after, answer])
    return Layout(
        ids,
        answer_len=len(answer),
        pad_id=tok.pad_id,
        visual_start=len(before),
        num_frames=num_frames + 1,
        tokens_per_frame=p,
        frames=frames,
    )


def open_haystack(haystack) -> EmbeddingStore:
    """The complete embedding store at ``haystack`` (a path, or a store already open)."""
    if isinstance(haystack, EmbeddingStore):
        return haystack
    try:
        return EmbeddingStore.open(haystack)
    except StoreError as e:
        raise EvalError(f"--haystack: {e}") from e


def check_haystack(store: EmbeddingStore, model: EvalModel, *, allow_other_checkpoint: bool = False) -> None:
    """The store must come from this model: its token shape, and (unless allowed otherwise) the checkpoint that
    encoded it (meta ``checkpoint``, compared as real paths)."""
    cfg = model.cfg
    _, p, d = store.shape
    if (p, d) != (cfg.tokens_per_tile, cfg.text.hidden_size):
        raise EvalError(
            f"--haystack {store.path}: frames of {p} tokens x {d} dims, but the model makes "
            f"{cfg.tokens_per_tile} x {cfg.text.hidden_size}; encode the haystack with this checkpoint"
        )
    encoded_by = store.meta.get("checkpoint")
    same = encoded_by is not None and model.checkpoint is not None
    same = same and os.path.realpath(encoded_by) == os.path.realpath(model.checkpoint)
    if not same and not allow_other_checkpoint:
        raise EvalError(
            f"--haystack {store.path} was encoded by checkpoint {encoded_by}, not {model.checkpoint}; rebuild it "
            "with `python -m lct_jax.eval haystack --ckpt ...` or pass --allow-other-checkpoint"
        )


def run_vniah(
    model,
    haystack,
    needles,
    out,
    *,
    frames: Sequence[int] = tuple(parse_grid(DEFAULT_FRAMES, int)),
    depths: Sequence[float] = tuple(parse_grid(DEFAULT_DEPTHS)),
    system: str = DEFAULT_SYSTEM,
    tokenizer=None,
    mesh: Mesh | None = None,
    param_dtype: str | None = None,
    dtype: str | None = None,
    attention: str | None = None,
    ring_kernel: str | None = None,
    bucket: int = 1,
    allow_other_checkpoint: bool = False,
    progress: bool = True,
) -> dict:
    """Run (or resume) the V-NIAH grid ``frames x depths`` into ``out`` and return the results dict.

    ``model``: a LongVA checkpoint path (restored onto ``mesh``, default: every device on ``seq``) or an
    :class:`~lct_jax.eval.loading.EvalModel`; ``haystack``: a store path or :class:`EmbeddingStore`; ``needles``:
    a needles JSON path or a list of :class:`Needle`; ``tokenizer``: a tokenizer or its name/path (default: the
    checkpoint's); ``param_dtype``, ``dtype``, ``attention``, ``ring_kernel``: config overrides when ``model`` is a
    path (:func:`~lct_jax.eval.loading.load_eval_model`); ``bucket``: pad every sequence to a multiple of this many
    tokens (fewer compiles, more padding)."""
    frames, depths = sorted(int(f) for f in frames), sorted(float(d) for d in depths)
    if not depths or depths[0] < 0 or depths[-1] > 1:
        raise EvalError(f"--depths {depths}: must lie in [0, 1]")
    store = open_haystack(haystack)
    if not frames or frames[0] < 1 or frames[-1] > store.shape[0]:
        raise EvalError(f"--frames {frames}: must lie in 1..{store.shape[0]} (the haystack's frames)")
    needles = load_needles(needles) if isinstance(needles, (str, os.PathLike)) else list(needles)
    overrides = dict(param_dtype=param_dtype, dtype=dtype, attention=attention, ring_kernel=ring_kernel)
    mesh, model, tok = eval_setup(model, mesh, tokenizer, **overrides)
    if model.kind != "longva":
        raise EvalError(
            f"V-NIAH needs a LongVA (stage 1/2) checkpoint; {model.checkpoint} is a {model.kind} model"
        )
    check_haystack(store, model, allow_other_checkpoint=allow_other_checkpoint)
    config = {
        "checkpoint": str(model.checkpoint),
        "model": {"kind": model.kind, **config_to_dict(model.cfg)},
        "haystack": store.path if "://" in store.path else os.path.abspath(store.path),
        "haystack_shape": list(store.shape),
        "needles": [
            {
                "image": str(n.image) if isinstance(n.image, (str, os.PathLike)) else "<array>",
                "question": n.question,
                "answer": n.answer,
            }
            for n in needles
        ],
        "frames": frames,
        "depths": depths,
        "system": system,
        "bucket": bucket,
    }
    grid = GridRun(out, "vniah", "frames", config)
    tokens = None  # needle embeddings, encoded only if a cell is left to score
    scorer = Scorer(model.lm, mesh, bucket=bucket)
    num_answer = max(len(tok.encode(n.answer)) for n in needles)

    def score_cell(num_frames: int, depth: float) -> dict:
        nonlocal tokens
        if tokens is None:
            tokens = encode_needles(model.model, needles, mesh)
        layouts = [
            cell_layout(tok, n, t, store, num_frames, depth, system)
            for n, t in zip(needles, tokens, strict=True)
        ]
        length = scorer.padded_length(max(lay.length for lay in layouts))  # one compile per frame count
        samples = []
        for i, (n, lay) in enumerate(zip(needles, layouts, strict=True)):
            pred = scorer(lay, length=length, num_answer=num_answer)
            samples.append(sample_record(i, n.question, lay, pred, tok, length))
        return {
            "insert_at": insert_index(depth, num_frames),
            "score": float(np.mean([s["correct"] for s in samples])),
            "samples": samples,
        }

    return grid.run(frames, depths, score_cell, title="V-NIAH", x_label="frames", progress=progress)


# ---------------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt", required=True, help="stage-1/2 LongVA checkpoint (step dir, workdir or model dir)"
    )
    p.add_argument(
        "--haystack", required=True, help="embedding store written by `haystack` with this checkpoint"
    )
    p.add_argument("--needles", required=True, help="JSON list of {image, question, answer}")
    p.add_argument("--out", required=True, help="results.json, heatmap.png and tb/ go here (resumable)")
    p.add_argument("--frames", default=DEFAULT_FRAMES, help="frame counts, MIN:MAX:STEP or a comma list")
    p.add_argument("--depths", default=DEFAULT_DEPTHS, help="needle depths in [0, 1], MIN:MAX:STEP or a list")
    p.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt of the qwen_1_5 template")
    p.add_argument("--allow-other-checkpoint", action="store_true",
                   help="use a haystack encoded by another checkpoint")  # fmt: skip
    add_model_arguments(p)


def run(args) -> int:
    # the user's files first: their mistakes end before JAX starts its backends
    ckpt, store, needles = (
        resolve_checkpoint(args.ckpt),
        open_haystack(args.haystack),
        load_needles(args.needles),
    )
    frames, depths = parse_grid(args.frames, int), parse_grid(args.depths)
    start_distributed(args)
    results = run_vniah(
        ckpt,
        store,
        needles,
        args.out,
        frames=frames,
        depths=depths,
        system=args.system,
        allow_other_checkpoint=args.allow_other_checkpoint,
        **run_kwargs(args),
    )
    print_summary("V-NIAH", results, args.out)
    return 0

r"""The whole LongVA recipe on tiny models and built-in synthetic data, in a few minutes on a laptop CPU.

    python -m lct_jax.demo --workdir /tmp/lct_demo

1. writes synthetic data into ``WORKDIR/data``: long documents made of simple sentences (stage 0), generated
   images of coloured shapes with captions (stage 1) and with question–answer conversations (stage 2);
2. stage 0, text extension: a tiny Qwen2 (RoPE θ = 1e9) on packed 256-token rows (``configs/text_extension.py``);
3. stage 1, projector pretraining: tiny CLIP + the stage-0 LM, only the projector trains
   (``configs/align_pretrain.py``, ``init_from`` = stage 0);
4. stage 2, full fine-tune, vision tower at a lower LR (``configs/align_finetune.py``, ``init_from`` = stage 1);
5. exports stage 0 as a transformers ``Qwen2ForCausalLM`` directory and stage 2 as a LongVA (llava_qwen) directory
   with the convert CLI;
6. evaluates: V-NIAH on stage 2 (the procedural haystack movie written to an mp4 and encoded by the stage-2 tower,
   needles in the stage-2 data's own questions) and text NIAH on stage 0, with ``lct_jax.eval`` (the library
   behind ``python -m lct_jax.eval vniah`` / ``text-niah``), and prints where everything is, heatmaps included.

Every stage is the same code path as a full-size run (``lct_jax.train.run.run`` with the stage's config at
``size=tiny``). The tiny CLIP starts from random weights (no download); a real run passes
``--config.init_vision_from=<HF CLIP dir>``. Runs on CPU unless ``JAX_PLATFORMS`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("square", "circle", "bar")
SUBJECTS = ("the cat", "a dog", "my friend", "the robot", "our teacher", "a small bird", "the farmer")
VERBS = ("sees", "likes", "finds", "carries", "paints", "follows", "draws")
OBJECTS = ("the red ball", "a green tree", "the old house", "a blue car", "the river", "a tall tower")


# --------------------------------------------------------------------------------------------------- data


def _sentence(r: random.Random) -> str:
    if r.random() < 0.5:  # the language the captions and answers use: the LM learns it from text alone
        fg, bg = r.sample(sorted(COLORS), 2)
        return f"a {fg} {r.choice(SHAPES)} on a {bg} background."
    return f"{r.choice(SUBJECTS)} {r.choice(VERBS)} {r.choice(OBJECTS)}."


def write_text_data(out: Path, n_docs: int = 600, seed: int = 0) -> Path:
    """JSON-lines documents of 3..60 simple sentences (some longer than a 256-token row)."""
    r = random.Random(seed)
    path = out / "stage0_docs.jsonl"
    with open(path, "w") as f:
        for _ in range(n_docs):
            text = " ".join(_sentence(r) for _ in range(r.randint(3, 60)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def _draw(shape: str, fg, bg, size: tuple[int, int]):
    from PIL import Image, ImageDraw  # noqa: PLC0415

    w, h = size
    img = Image.new("RGB", size, bg)
    d = ImageDraw.Draw(img)
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    if shape == "square":
        d.rectangle(box, fill=fg)
    elif shape == "circle":
        d.ellipse(box, fill=fg)
    else:
        d.rectangle((w // 8, 3 * h // 8, 7 * w // 8, 5 * h // 8), fill=fg)
    return img


def _questions(fg: str, shape: str, bg: str) -> list[tuple[str, str]]:
    """The stage-2 question–answer pairs about one image."""
    return [
        ("What color is the shape?", f"{fg}."),
        ("What shape is it?", f"a {shape}."),
        ("What color is the background?", f"{bg}."),
    ]


def write_image_data(out: Path, n_images: int = 240, seed: int = 0) -> tuple[Path, Path, Path]:
    """PNG images of one coloured shape on a coloured background, a caption file (stage 1, LLaVA 'plain') and a
    question–answer file (stage 2, LLaVA conversations). Sizes up to 112 px give 1..4 tiles of 56 px."""
    r = random.Random(seed)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    captions, qa = [], []
    sizes = [(56, 56), (112, 56), (56, 112), (112, 112), (100, 80)]
    for i in range(n_images):
        fg, bg = r.sample(sorted(COLORS), 2)
        shape = r.choice(SHAPES)
        name = f"{i:04d}.png"
        _draw(shape, COLORS[fg], COLORS[bg], r.choice(sizes)).save(img_dir / name)
        captions.append(
            {
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>"},
                    {"from": "gpt", "value": f"a {fg} {shape} on a {bg} background."},
                ],
            }
        )
        q, a = r.choice(_questions(fg, shape, bg))
        qa.append(
            {
                "image": name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{q}"},
                    {"from": "gpt", "value": a},
                ],
            }
        )
    (out / "stage1_captions.json").write_text(json.dumps(captions))
    (out / "stage2_qa.json").write_text(json.dumps(qa))
    return img_dir, out / "stage1_captions.json", out / "stage2_qa.json"


# --------------------------------------------------------------------------------------------------- stages


def _stage(name: str, config_file: str, workdir: Path, **overrides):
    from lct_jax.train.run import load_config, run  # noqa: PLC0415

    config = load_config(f"{REPO / 'configs' / config_file}:size=tiny")
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    print(f"\n=== {name}: {config_file} size=tiny -> {workdir}")
    t0 = time.time()
    result = run(config, workdir)
    losses = [h["loss"] for h in result.history]
    k = min(5, len(losses))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(
        f"=== {name}: {len(losses)} steps in {time.time() - t0:.0f} s, loss {first:.3f} -> {last:.3f} "
        f"(mean of first/last {k} steps)"
    )
    return {
        "stage": name,
        "steps": len(losses),
        "loss_first": first,
        "loss_last": last,
        "checkpoint": str(workdir / "checkpoints" / str(int(result.state.step))),
    }


def _export(ckpt: str, out: Path, fmt: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "lct_jax.convert",
        "export-hf",
        "--ckpt",
        ckpt,
        "--out",
        str(out),
        "--format",
        fmt,
        "--dtype",
        "float32",
        "--overwrite",
    ]
    print("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=os.environ.copy())


def check_qwen2_export(ckpt: str, hf_dir: Path) -> float | None:
    """Max |logits| difference between the exported PyTorch model (transformers) and the lct_jax checkpoint on a
    sample sequence; None when torch/transformers are not installed."""
    try:
        import torch  # noqa: PLC0415
        from transformers import Qwen2ForCausalLM  # noqa: PLC0415
    except ImportError:
        return None
    import numpy as np  # noqa: PLC0415

    from lct_jax.convert.checkpoint import load_model  # noqa: PLC0415

    ids = np.arange(1, 65, dtype=np.int32)[None] * 3 % 256
    ours = np.asarray(load_model(ckpt, dtype="float32")(ids))
    with torch.no_grad():
        theirs = (
            Qwen2ForCausalLM.from_pretrained(hf_dir).float()(torch.from_numpy(ids.astype(np.int64))).logits
        )
    return float(np.abs(ours - theirs.numpy()).max())


# --------------------------------------------------------------------------------------------------- evaluation

VNIAH_FRAMES = (8, 16, 32, 64)  # 4 tokens a frame at the tiny tile size: up to 260 visual tokens
TEXT_LENGTHS = (32, 64, 96, 128)  # haystack tokens (the byte-tokenized prompt adds ~240)
TEXT_SAMPLES = 3
DEPTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# every sequence of a grid padded to 384 tokens: one compile per grid (and the dense attention of one CPU device
# takes ~6x longer per token at 512)
BUCKET = 384


def write_needles(out: Path, count: int = 5, seed: int = 1) -> Path:
    """V-NIAH needles in the stage-2 data's own language: new shape images, one of their three questions each;
    the ``needles.json`` format of ``python -m lct_jax.eval make-needles``."""
    r = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        fg, bg = r.sample(sorted(COLORS), 2)
        shape = r.choice(SHAPES)
        _draw(shape, COLORS[fg], COLORS[bg], (112, 112)).save(out / f"needle_{i}.png")
        question, answer = _questions(fg, shape, bg)[i % 3]
        records.append({"image": f"needle_{i}.png", "question": question, "answer": answer})
    (out / "needles.json").write_text(json.dumps(records, indent=1) + "\n")
    return out / "needles.json"


def evaluate(work: Path, stage0_ckpt: str, stage2_ckpt: str) -> list[tuple[str, Path, float, float]]:
    """V-NIAH on stage 2 and text NIAH on stage 0 into ``work/eval``; returns (name, heatmap, mean, seconds)."""
    from lct_jax.data.video import probe, write_video  # noqa: PLC0415
    from lct_jax.eval.haystack import build_haystack  # noqa: PLC0415
    from lct_jax.eval.text_niah import run_text_niah  # noqa: PLC0415
    from lct_jax.eval.vniah import run_vniah  # noqa: PLC0415

    ev = work / "eval"
    ev.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    frames = VNIAH_FRAMES[-1]
    spec = f"procedural:seed=0,frames={frames},fps=1,size=112x64"
    video = ev / "haystack.mp4"
    print(f"\n=== evaluation: {spec} -> {video} -> embedding store (stage-2 tower)")
    write_video(video, (img for _, img in probe(spec).frames()), fps=1)
    build_haystack(stage2_ckpt, str(video), str(ev / "haystack"), fps=1, max_frames=frames, progress=False,
                   log=lambda *_: None)  # fmt: skip
    needles = write_needles(ev / "needles")
    grid = f"--frames {','.join(map(str, VNIAH_FRAMES))} --depths 0:1:0.2 --bucket {BUCKET}"
    print(f"$ python -m lct_jax.eval vniah --ckpt {stage2_ckpt} --haystack {ev / 'haystack'} --needles {needles} "
          f"--out {ev / 'vniah'} {grid}")  # fmt: skip
    t1 = time.time()
    v = run_vniah(stage2_ckpt, ev / "haystack", needles, ev / "vniah", frames=VNIAH_FRAMES, depths=DEPTHS,
                  bucket=BUCKET, progress=False)  # fmt: skip
    t2 = time.time()
    print(f"$ python -m lct_jax.eval text-niah --ckpt {stage0_ckpt} --out {ev / 'text_niah'} "
          f"--lengths {','.join(map(str, TEXT_LENGTHS))} --depths 0:1:0.2 --samples {TEXT_SAMPLES} --bucket {BUCKET}")  # fmt: skip
    t = run_text_niah(stage0_ckpt, ev / "text_niah", lengths=TEXT_LENGTHS, depths=DEPTHS, samples=TEXT_SAMPLES,
                      bucket=BUCKET, progress=False)  # fmt: skip
    t3 = time.time()
    print(
        f"=== evaluation: haystack {t1 - t0:.0f} s, V-NIAH {len(v['cells'])} cells in {t2 - t1:.0f} s (mean "
        f"{v['mean']:.3f}), text NIAH {len(t['cells'])} cells in {t3 - t2:.0f} s (mean {t['mean']:.3f})"
    )
    return [
        ("V-NIAH (stage 2)", ev / "vniah" / "heatmap.png", v["mean"], t2 - t1),
        ("text NIAH (stage 0)", ev / "text_niah" / "heatmap.png", t["mean"], t3 - t2),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="everything goes here (data, runs, exports)")
    parser.add_argument("--steps", type=int, default=None, help="steps per stage (default: each config's)")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # (libtpu is then never started: no TPU_* variables needed)
    from absl import logging as absl_logging  # noqa: PLC0415

    absl_logging.set_verbosity(absl_logging.WARNING)
    t0 = time.time()
    work = Path(args.workdir).absolute()
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    docs = write_text_data(data)
    img_dir, captions, qa = write_image_data(data)
    common = {"progress": False, "log_every": 20}
    if args.steps:
        common["num_steps"] = args.steps
    results = [
        _stage(
            "stage 0 (text extension)",
            "text_extension.py",
            work / "stage0",
            **common,
            **{"data.paths": str(docs)},
        ),
        _stage(
            "stage 1 (projector pretraining)",
            "align_pretrain.py",
            work / "stage1",
            **common,
            init_from=str(work / "stage0"),
            **{"data.annotations": str(captions), "data.image_root": str(img_dir)},
        ),
        _stage(
            "stage 2 (full fine-tune)",
            "align_finetune.py",
            work / "stage2",
            **common,
            init_from=str(work / "stage1"),
            **{"data.annotations": str(qa), "data.image_root": str(img_dir)},
        ),
    ]
    exports = {
        "qwen2 (stage 0)": work / "export" / "stage0_qwen2_hf",
        "longva (stage 2)": work / "export" / "longva_hf",
    }
    _export(results[0]["checkpoint"], exports["qwen2 (stage 0)"], "qwen2")
    _export(results[2]["checkpoint"], exports["longva (stage 2)"], "longva")
    diff = check_qwen2_export(results[0]["checkpoint"], exports["qwen2 (stage 0)"])
    if diff is not None:
        print(
            f"transformers Qwen2ForCausalLM on the stage-0 export vs lct_jax: max |logits diff| = {diff:.2e}"
        )
    evals = evaluate(work, results[0]["checkpoint"], results[2]["checkpoint"])
    (work / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n=== demo done in {time.time() - t0:.0f} s")
    for r in results:
        print(
            f"{r['stage']:32s} loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}   checkpoint {r['checkpoint']}"
        )
    print(f"synthetic data                   {data}")
    for name, path in exports.items():
        print(f"PyTorch export, {name:17s}{path}")
    for name, heatmap, mean, _ in evals:
        print(f"{name + ' heatmap':33s}{heatmap}   (mean {mean:.3f}; results.json beside it)")
    print(
        f"TensorBoard                      tensorboard --logdir {work}   (event files in stage*/tb, eval/*/tb)"
    )
    print(f"summary                          {work / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

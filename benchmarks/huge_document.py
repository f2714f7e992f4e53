"""Peak host memory of stage 0 with one huge document, next to the same data without it (target: <= 2x).

    .venv/bin/python benchmarks/huge_document.py [--mb 50] [--batches 300] [--no-train]

Writes 300 short documents, and the same with one document of ``--mb`` MB early in the file. Each case runs in a
fresh child process and reports its peak resident set size (``ru_maxrss`` of that child, from ``os.wait4``):

- the stage-0 data pipeline alone (rows of 256 tokens, batches of 8, ``--batches`` of them) with the byte and the
  Qwen2 BPE tokenizer, with the default ``max_record_bytes`` (64 MiB: the document is tokenized and packed);
- the ``python -m lct_jax.train`` run the issue measured (``size=tiny``, 20 steps, byte tokenizer).

The huge document goes through ``HFTokenizer.encode_array`` in pieces (``piece_cuts``) and is otherwise held once
as int32 tokens; a record over ``max_record_bytes`` would be skipped before it is parsed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_data(out: Path, mb: int) -> tuple[Path, Path]:
    r = random.Random(0)
    words = ["the cat", "a dog", "sees", "likes", "the red ball", "a tree", "runs", "home"]
    docs = [" ".join(r.choice(words) for _ in range(r.randint(5, 80))) for _ in range(300)]
    normal, huge = out / "normal.jsonl", out / "huge.jsonl"
    normal.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    big = ("lorem ipsum dolor sit amet " * (mb * 2**20 // 27 + 1))[: mb * 2**20]
    with open(huge, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d}) + "\n")
            if i == 10:
                f.write(json.dumps({"text": big}) + "\n")
    return normal, huge


def child(path: str, tokenizer: str, batches: int) -> None:
    """Runs in the child: the stage-0 pipeline over ``path``; prints what it consumed."""
    from lct_jax.cli import skip_absent_tpu  # noqa: PLC0415 - the parent imports no lct_jax module
    from lct_jax.data.loader import PipelineOptions, text_dataset  # noqa: PLC0415
    from lct_jax.data.text import TextDataConfig  # noqa: PLC0415

    skip_absent_tpu()  # as the CLIs do: no libtpu in the measured memory

    opts = PipelineOptions(batch_size=8, shuffle=False)
    it = iter(text_dataset(TextDataConfig(seq_len=256, paths=(path,), tokenizer=tokenizer, options=opts)))
    tokens = sum(int(next(it)["loss_mask"].sum()) for _ in range(batches))
    print(json.dumps({"tokens": tokens, **{k: v for k, v in it.counts().items() if v and "skipped" in k}}))


def peak_rss(cmd: list[str], env: dict) -> tuple[float, str]:
    """(peak RSS in GB of the child running ``cmd``, its stdout)."""
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.DEVNULL, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {text[-2000:]}")
    return usage.ru_maxrss / 2**20, text  # ru_maxrss is in KiB on Linux


def measure(tmp: Path, args, env: dict) -> list[tuple[str, dict[str, float]]]:
    normal, huge = write_data(tmp, args.mb)
    print(
        f"data: 300 documents ({normal.stat().st_size / 1e3:.0f} kB), and the same + one {args.mb} MB document"
    )
    rows = []
    for tok in ("byte", "qwen"):
        got = {}
        for name, path in (("normal", normal), ("huge", huge)):
            cmd = [sys.executable, __file__, "--child", str(path), tok, str(args.batches)]
            got[name], text = peak_rss(cmd, env)
            print(f"  pipeline, {tok:4s} tokenizer, {name:6s}: peak RSS {got[name]:.2f} GB  {text.strip()}")
        rows.append((f"pipeline ({tok})", got))
    if not args.no_train:
        got = {}
        for name, path in (("normal", normal), ("huge", huge)):
            cmd = [sys.executable, "-m", "lct_jax.train", "--config=configs/text_extension.py:size=tiny",
                   f"--workdir={tmp / f'run_{name}'}", f"--config.data.paths={path}", "--config.num_steps=20",
                   "--config.progress=False", "--config.log_every=20"]  # fmt: skip
            got[name], _ = peak_rss(cmd, env)
            print(f"  train CLI, size=tiny, 20 steps, {name:6s}: peak RSS {got[name]:.2f} GB")
        rows.append(("train CLI (byte)", got))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--no-train", action="store_true", help="skip the two training runs (~1 min)")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "TOKENIZER", "BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]))
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="lct_huge_") as tmp:
        rows = measure(Path(tmp), args, env)
    print("\nhuge / normal peak RSS (target <= 2x):")
    for what, got in rows:
        print(f"  {what:18s} {got['huge']:.2f} / {got['normal']:.2f} GB = {got['huge'] / got['normal']:.2f}x")
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB)")


if __name__ == "__main__":
    main()

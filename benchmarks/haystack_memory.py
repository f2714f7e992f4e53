"""Host memory of ``python -m lct_jax.eval haystack`` is flat in the number of frames: peak RSS at two lengths.

    .venv/bin/python benchmarks/haystack_memory.py [--frames 200 2000] [--source procedural file]

For each source and length, the exact haystack command is run in a child process (tiny LongVA, one CPU device) and
its peak resident set size is read from the kernel (``os.wait4``). ``procedural`` draws 640x360 frames on the fly;
``file`` first writes the same movie to an mp4 with ``make-video`` and decodes it. Printed: the command, peak RSS
and wall time per length, and the ratio long / short (1.00 = flat; a whole decoded movie would add ~0.7 MB a
frame at 640x360, i.e. ~1.2 GB at 2000 frames).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tiny_checkpoint(path: Path) -> None:
    code = (
        "import sys\nfrom flax import nnx\nfrom lct_jax.model.longva import PRESETS, LongVA\n"
        "from lct_jax.convert.checkpoint import params_of, save_model_checkpoint\n"
        "save_model_checkpoint(sys.argv[1], 'longva', PRESETS['tiny'], params_of(LongVA(PRESETS['tiny'], "
        "rngs=nnx.Rngs(0))))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=_env(), cwd=ROOT)


def _env() -> dict:
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of ``cmd`` run to completion in a child process."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs=2, default=(200, 2000))
    p.add_argument("--source", nargs="+", default=("procedural", "file"), choices=("procedural", "file"))
    args = p.parse_args()
    eval_cli = [sys.executable, "-m", "lct_jax.eval"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _tiny_checkpoint(tmp / "ckpt")
        for source in args.source:
            rows = []
            for n in args.frames:
                video = f"procedural:seed=0,frames={n}"
                if source == "file":
                    video = str(tmp / f"movie_{n}.mp4")
                    make = [
                        *eval_cli,
                        "make-video",
                        "--out",
                        video,
                        "--frames",
                        str(n),
                        "--fps",
                        "1",
                        "--seed",
                        "0",
                    ]
                    subprocess.run(make, check=True, env=_env(), cwd=ROOT, capture_output=True)
                cmd = [*eval_cli, "haystack", "--ckpt", str(tmp / "ckpt"), "--video", video, "--fps", "1",
                       "--out", str(tmp / f"hay_{source}_{n}")]  # fmt: skip
                rss, wall = peak_rss(cmd)
                rows.append((n, rss, wall))
                print(
                    f"{source:>10} {n:5d} frames: peak RSS {rss:7.1f} MiB, {wall:6.1f} s   $ {' '.join(cmd)}"
                )
            (n0, r0, _), (n1, r1, _) = rows
            print(f"{source:>10} peak RSS {n1} / {n0} frames: {r1 / r0:.3f}x ({r1 - r0:+.1f} MiB)")


if __name__ == "__main__":
    main()

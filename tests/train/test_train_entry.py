"""``python -m lct_jax.train`` as a user runs it: kill -9 mid-run, re-run the same command, compare losses."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lct_jax.testing.events import event_files, read_scalars, scalar_steps

ROOT = Path(__file__).resolve().parents[2]


def _docs(path: Path, n=300, seed=0):
    r = random.Random(seed)
    words = ["the cat", "a dog", "sees", "likes", "the red ball", "a tree", "runs", "home"]
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(r.choice(words) for _ in range(r.randint(5, 80)))}) + "\n")


def _cmd(workdir, data, steps):
    return [
        sys.executable,
        "-m",
        "lct_jax.train",
        "--config=configs/text_extension.py:size=tiny",
        f"--workdir={workdir}",
        f"--config.data.paths={data}",
        f"--config.num_steps={steps}",
        "--config.checkpoint.every=4",
        "--config.progress=False",
        "--config.log_every=1",
        "--config.data.batch_size=4",
        "--config.data.seq_len=128",
    ]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # one CPU device, as a user would run it
    return env


def _losses(workdir: Path) -> dict[int, float]:
    out = {}
    for f in event_files(workdir / "tb"):
        out.update(read_scalars(f).get("loss", {}))
    return out


@pytest.mark.slow
def test_kill9_then_rerun_resumes_and_matches_uninterrupted(tmp_path):
    data = tmp_path / "docs.jsonl"
    _docs(data)
    steps = 24
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cmd(ref_dir, data, steps), cwd=ROOT, env=_env(), check=True, capture_output=True)
    ref = _losses(ref_dir)
    assert sorted(ref) == list(range(1, steps + 1))

    proc = subprocess.Popen(
        _cmd(run_dir, data, steps), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "8" / "commit_success.txt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its step-8 checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(run_dir))
    assert killed_at < steps, "the run finished before the kill; make it longer"
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    out = subprocess.run(
        _cmd(run_dir, data, steps), cwd=ROOT, env=_env(), check=True, capture_output=True, text=True
    )
    resumed_from = int(out.stdout.split("resumed from ")[1].split("(step ")[1].split(")")[0])
    assert resumed_from == max(saved) and resumed_from >= 8
    # losses logged by the second launch (newest event file) = the uninterrupted run's, step for step
    newest = event_files(run_dir / "tb")[-1]
    after = read_scalars(newest)["loss"]
    assert sorted(after) == list(range(resumed_from + 1, steps + 1))
    diff = max(abs(after[s] - ref[s]) for s in after)
    print(f"killed at step {killed_at}, resumed from {resumed_from}, max |loss - uninterrupted| = {diff:.2e}")
    assert diff <= 1e-6
    # TensorBoard over all the event files: every step once; the replayed ones as the resumed run logged them
    assert scalar_steps(run_dir / "tb", "loss") == list(range(1, steps + 1))  # the replayed ones once
    shown = read_scalars(run_dir / "tb")["loss"]
    assert all(shown[s] == after[s] for s in after)


@pytest.mark.slow
def test_sigterm_exits_cleanly_with_checkpoint_at_current_step(tmp_path):
    data = tmp_path / "docs.jsonl"
    _docs(data)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        _cmd(run_dir, data, 1000),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "4" / "commit_success.txt").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    last_logged = max(_losses(run_dir))
    saved = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    print(f"SIGTERM after step {last_logged}: checkpoint at step {saved}")
    assert saved == last_logged and f"saved a checkpoint at step {saved}" in out
    assert not (run_dir / "train.lock").exists()  # released

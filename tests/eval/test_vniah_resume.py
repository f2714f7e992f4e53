"""A `vniah` run killed with SIGKILL mid-grid, restarted with the same command, ends with the same results.json as an
uninterrupted run (slow: two CLI processes)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from lct_jax.eval.vniah import run_vniah
from lct_jax.sharding import make_mesh

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_results(tiny_vniah, tmp_path):
    t = tiny_vniah
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lct_jax.eval", "vniah", "--ckpt", str(t["ckpt"]), "--haystack", str(t["haystack"]),
           "--needles", str(t["needles"]), "--out", str(out), "--frames", "4:12:4", "--depths", "0:1:0.2",
           "--tokenizer", "byte", "--no-progress", "--seq", "1", "--bucket", "256"]  # one device, one compile  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = out / "results.json"
    deadline = time.monotonic() + 240
    cells = 0
    while time.monotonic() < deadline and proc.poll() is None:  # bounded: the deadline or the process ending
        if results.exists():
            cells = len(json.loads(results.read_text())["cells"])
            if cells >= 3:
                break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = json.loads(results.read_text())
    assert 3 <= len(partial["cells"]) < 18 and not partial["complete"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "V-NIAH mean" in done.stdout
    final = json.loads(results.read_text())
    assert final["cells"][: len(partial["cells"])] == partial["cells"]  # kept, not recomputed
    # the same grid in one uninterrupted (in-process) run
    whole = run_vniah(str(t["ckpt"]), str(t["haystack"]), str(t["needles"]), tmp_path / "whole",
                      frames=[4, 8, 12], depths=[0, 0.2, 0.4, 0.6, 0.8, 1.0], tokenizer="byte", bucket=256,
                      mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]), progress=False)  # fmt: skip
    assert final == whole
    assert results.read_text() == (tmp_path / "whole" / "results.json").read_text()

"""The one-command demo end to end (slow: ~1 min): every stage's loss falls and both exports are written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_all_stages_and_exports(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lct_jax.demo", "--workdir", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "XLA_FLAGS": ""},
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["stage"].split()[1] for s in summary] == ["0", "1", "2"]
    for s in summary:
        assert s["loss_last"] < 0.95 * s["loss_first"], s
    assert (tmp_path / "export" / "stage0_qwen2_hf" / "config.json").exists()
    assert (tmp_path / "export" / "longva_hf" / "config.json").exists()
    line = [x for x in out.stdout.splitlines() if "max |logits diff|" in x][0]
    assert float(line.split("=")[-1]) < 1e-4

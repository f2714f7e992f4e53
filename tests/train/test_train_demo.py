"""The one-command demo end to end (slow: ~2 min, shared with tests/eval/test_vniah_demo.py through the
``demo_run`` fixture): every stage's loss falls, both exports are written, the evaluation's heatmaps exist."""

import json

import pytest


@pytest.mark.slow
def test_demo_runs_all_stages_and_exports(demo_run):
    tmp_path, stdout = demo_run
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["stage"].split()[1] for s in summary] == ["0", "1", "2"]
    for s in summary:
        assert s["loss_last"] < 0.95 * s["loss_first"], s
    assert (tmp_path / "export" / "stage0_qwen2_hf" / "config.json").exists()
    assert (tmp_path / "export" / "longva_hf" / "config.json").exists()
    line = [x for x in stdout.splitlines() if "max |logits diff|" in x][0]
    assert float(line.split("=")[-1]) < 1e-4
    for task in ("vniah", "text_niah"):
        assert (tmp_path / "eval" / task / "heatmap.png").exists()
        assert f"{tmp_path / 'eval' / task / 'heatmap.png'}" in stdout

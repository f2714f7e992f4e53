"""The long-context-transfer experiment: the arms' resolved configs differ only in the fields the experiment names,
the data keeps its stated invariants, and (slow) the whole command runs at reduced size and writes its outputs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lct_jax.data.tokenizer import load_tokenizer
from lct_jax.experiments import transfer as T
from lct_jax.train.loop import LoopResult

REPO = Path(__file__).resolve().parents[2]
# per stage: what may differ between the arms (besides paths that name the arm's own workdir)
STAGE0_FIELDS = {"data.seq_len", "data.batch_size", "model.rope_theta"}
DERIVED_FIELDS = {"model.rope_theta"}  # stages 1-2 keep the arm's stage-0 theta (a model property)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def arm_diff(a: dict, b: dict, names=("long", "short")) -> set[str]:
    """Keys whose values differ once each arm's own workdir name is replaced by a placeholder."""
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    norm = lambda v, arm: re.sub(rf"/{arm}/", "/ARM/", v) if isinstance(v, str) else v  # noqa: E731
    return {k for k in fa if norm(fa[k], names[0]) != norm(fb[k], names[1])}


def check_arm_configs(configs: dict[str, dict]) -> None:
    """``{arm: {stage: resolved config dict}}`` -> the diff the experiment allows, and nothing else."""
    long, short = configs["long"], configs["short"]
    assert arm_diff(long["stage0"], short["stage0"]) == STAGE0_FIELDS
    for stage in ("stage1", "stage2"):
        assert arm_diff(long[stage], short[stage]) == DERIVED_FIELDS, stage
        for arm in (long, short):
            assert arm[stage]["model"]["rope_theta"] == arm["stage0"]["model"]["rope_theta"]
    assert long["stage0"]["model"]["rope_theta"] == 1e9 and short["stage0"]["model"]["rope_theta"] == 1e3
    tokens = lambda c: c["data"]["seq_len"] * c["data"]["batch_size"]  # noqa: E731
    assert tokens(long["stage0"]) == tokens(short["stage0"])
    assert long["stage0"]["num_steps"] == short["stage0"]["num_steps"]
    assert short["stage0"]["data"]["seq_len"] == long["stage2"]["data"]["max_len"]  # S = the stage-2 limit
    assert long["stage0"]["data"]["seq_len"] >= 2 * long["stage2"]["data"]["max_len"]


@pytest.mark.parametrize("plan", [T.Plan(), T.Plan.reduced()], ids=["full", "reduced"])
def test_arms_differ_only_in_the_named_stage0_fields(plan, tmp_path):
    data = {k: str(tmp_path / "data" / k) for k in ("docs", "images", "stage1", "stage2")}
    configs = {
        arm.name: {s: c.to_dict() for s, c in T.stage_configs(plan, arm, tmp_path, data, seed=3).items()}
        for arm in plan.arms
    }
    check_arm_configs(configs)
    assert configs["long"]["stage1"]["init_from"] == str(tmp_path / "long" / "stage0")
    assert configs["short"]["stage2"]["init_from"] == str(tmp_path / "short" / "stage1")
    assert configs["long"]["stage2"]["seed"] == 3


def test_data_invariants(tmp_path):
    """What the module docstring says each data choice guarantees, on a reduced draw."""
    plan = T.Plan.reduced()
    data = T.write_data(tmp_path, plan, seed=0)
    initials = {c[0] for c in T.COLORS} | {T.GRAY[0]}
    assert not initials & set(T.FILLER_LETTERS)
    docs = [json.loads(line)["text"] for line in Path(data["docs"]).read_text().splitlines()]
    assert sum(len(d) + 1 for d in docs) >= plan.stage0_tokens * plan.stage0_steps
    for d in docs:
        body, answer = d.rsplit(T.QUESTION, 1)
        words = re.findall(r"[a-z]+", body)
        salient = [w for w in words if w[0] in initials]
        assert salient == [answer.rstrip(".")] and answer.rstrip(".") in T.COLORS, d
    records = json.loads(Path(data["stage2"]).read_text())
    for r in records:
        human = r["conversations"][1]["value"]
        assert human == "<image>" * len(r["image"]) + "\n" + T.QUESTION
        assert sum(name.startswith("needle_") for name in r["image"]) == 1
    config = T.stage_configs(plan, plan.arms[0], tmp_path, data, seed=0)["stage2"]
    # a row: 16 prompt tokens, 4 per frame, "\n?<|im_end|>\n<|im_start|>assistant\n" (15), the answer,
    # <|im_end|>\n, shifted once: 32 + 4k + len(answer)
    want = max(32 + 4 * len(r["image"]) + len(r["conversations"][-1]["value"]) for r in records)
    model_cfg = T.build_model(config)[1]  # the images are drawn for the tiny tower these constants name
    assert (model_cfg.tile, model_cfg.tokens_per_tile) == (T.TILE, T.TOKENS_PER_FRAME) == (56, 4)
    assert T.longest_stage2_row(config) == want <= plan.short_len
    # evaluation draws are fresh: no needle or haystack frame equals a training image
    train = {Image.open(p).tobytes() for p in Path(data["images"]).glob("*.png")}
    evals = list(Path(data["haystack"]).glob("*.png")) + list(Path(data["needles"]).parent.glob("*.png"))
    assert len(evals) == max(plan.frames) + len(T.COLORS)
    assert not train & {Image.open(p).tobytes() for p in evals}
    tok = load_tokenizer("byte")
    # text-NIAH columns are as long as the V-NIAH columns (the same x positions in both heatmaps)
    assert len(T.text_lengths(plan, tok)) == len(plan.frames)


def test_bands_and_clock():
    cols = [
        {"frames": f, "tokens": t, "mean": m} for f, t, m in [(1, 45, 1.0), (32, 169, 0.5), (64, 297, 0.2)]
    ]
    plan = T.Plan()
    assert T.bands(cols, plan, longest_row=118) == {
        "inside_S": 1.0,
        "S_to_2S": 0.5,
        "from_2x_stage2_row": 0.2,
        "near_L": 0.2,
    }
    lines = []
    clock = T.Clock({"a": 10.0, "b": 30.0}, print_fn=lines.append)
    clock.done("a", 20.0)  # twice as slow as the prior: 60 s left
    assert "about 1.0 min left" in lines[-1] and "2.00x" in lines[-1]


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    """``--smoke`` (every stage, both evaluations, the report) as a user runs it: one CPU device, a subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": str(REPO)}
    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "lct_jax.experiments.transfer", "--workdir", str(work), "--smoke"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[experiment] short/eval done" in proc.stdout and "ETA" in proc.stdout
    plan = T.Plan.reduced()
    results = json.loads((work / "results.json").read_text())
    assert set(results["arms"]) == {"long", "short"} and results["seed"] == 0
    assert 0 < results["longest_stage2_row"] <= plan.short_len
    for arm in results["arms"].values():
        assert set(arm["vniah_bands"]) == {"inside_S", "S_to_2S", "from_2x_stage2_row", "near_L"}
        assert [c["frames"] for c in arm["vniah_columns"]] == list(plan.frames)
        assert len(arm["text_niah_columns"]) == len(plan.frames)
        assert all(0 <= c["mean"] <= 1 for c in arm["vniah_columns"] + arm["text_niah_columns"])
        for task in ("vniah", "text_niah"):
            full = json.loads(Path(arm["results"][task]).read_text())
            assert full["complete"] and len(full["cells"]) == len(plan.frames) * len(plan.depths)
            assert all(len(c["samples"]) == len(T.COLORS) for c in full["cells"])
    assert set(results["timings"]) == {f"{a}/{p}" for a in ("long", "short") for p in (*T.STAGES, "eval")}
    with Image.open(work / "transfer.png") as img:
        assert img.format == "PNG" and img.size[0] > img.size[1] > 300
    assert (work / "table.md").read_text().count("\n") == 2 + 4
    written = {
        a: {s: json.loads((work / a / s / "config.json").read_text()) for s in T.STAGES}
        for a in ("long", "short")
    }
    check_arm_configs(written)  # the configs run() resolved and wrote, not only what we built
    assert np.isfinite(results["total_seconds"])


def test_workdir_of_another_seed_is_refused(tmp_path):
    """A workdir claimed by seed 0 resumes with seed 0 and is an ``error: --workdir ...`` with any other seed."""
    plan = T.Plan.reduced()
    T.check_workdir(tmp_path, 0, plan)
    T.check_workdir(tmp_path, 0, plan)  # the same experiment: resume
    with pytest.raises(T.ExperimentError, match=r"^--workdir .* seed 0"):
        T.check_workdir(tmp_path, 1, plan)
    with pytest.raises(T.ExperimentError):
        T.check_workdir(tmp_path, 0, T.Plan())


def test_a_stage_that_stops_early_stops_the_experiment(tmp_path, monkeypatch):
    """A SIGTERM'd stage (saved, status 'preempted') ends the experiment with a resumable ``error:``; the next
    stage never starts from a half-trained one."""
    calls = []

    def stopped(config, workdir):
        calls.append(Path(workdir).name)
        return LoopResult(state=None, history=[{"loss": 1.0}], status="preempted")

    monkeypatch.setattr(T, "run", stopped)
    with pytest.raises(
        T.ExperimentStopped, match=r"^long/stage0 stopped at step None of 3 \(preempted\); rerun"
    ):
        T.run_experiment(tmp_path, 0, T.Plan.reduced(), progress=False)
    assert calls == ["stage0"]

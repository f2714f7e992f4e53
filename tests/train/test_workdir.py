"""run() on real workdirs: ownership before any write, the trainer lock, restarts past damaged checkpoints (the
newest step that verifies, or --config.resume_step), TensorBoard after a replay, the export of damaged steps."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lct_jax.convert.__main__ import main as convert_main
from lct_jax.errors import CheckpointError, DataError, WorkdirError
from lct_jax.sharding import make_mesh
from lct_jax.testing.events import event_files, read_scalars, scalar_steps
from lct_jax.train.checkpoint import check_step, choose_restore_step
from lct_jax.train.run import load_config, run
from lct_jax.train.workdir import LOCK_NAME

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _mesh():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _config(data, steps, stage="text_extension", **fields):
    c = load_config(f"{CONFIGS / stage}.py:size=tiny")
    if stage == "text_extension":
        c.data.paths, c.data.seq_len = str(data), 32
    c.data.batch_size, c.num_steps, c.checkpoint.every = 2, steps, 2
    c.progress, c.log_every = False, 0
    for k, v in fields.items():
        c[k] = v
    return c


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _snapshot(d: Path) -> dict:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in d.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def stage0(tmp_path_factory):
    """A stage-0 workdir with checkpoints at steps 2 and 4, trained while a stale lock (a dead pid) was there."""
    root = tmp_path_factory.mktemp("stage0")
    data = root / "docs.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"document {i} " + "ab" * (i % 9)}) + "\n" for i in range(60))
    )
    wd = root / "wd"
    wd.mkdir()
    (wd / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": 0}))
    result = run(_config(data, 4), wd, mesh=_mesh())
    assert [int(p.name) for p in sorted((wd / "checkpoints").iterdir()) if p.name.isdigit()] == [2, 4]
    return wd, data, result


def _copy(stage0, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(stage0[0], wd)
    return wd


def test_stale_lock_was_taken_over_and_the_lock_released(stage0):
    wd, _, result = stage0
    assert result.status == "done" and not (wd / LOCK_NAME).exists()


def test_a_live_trainer_keeps_a_second_one_out(stage0, tmp_path):
    wd = _copy(stage0, tmp_path)
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock = json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": 1.0})
        (wd / LOCK_NAME).write_text(lock)
        before = _snapshot(wd)
        with pytest.raises(
            WorkdirError, match=f"in use by process {holder.pid} on host {socket.gethostname()}"
        ):
            run(_config(stage0[1], 6), wd, mesh=_mesh())
        assert _snapshot(wd) == before  # nothing written, the holder's lock untouched
    finally:
        holder.kill()
        holder.wait()


def test_another_stage_or_model_is_refused_before_anything_is_written(stage0, tmp_path):
    wd = _copy(stage0, tmp_path)
    before = _snapshot(wd)
    with pytest.raises(
        WorkdirError, match=r"belongs to stage 'text_extension'.*this run is stage 'align_finetune'"
    ):
        run(_config(None, 6, stage="align_finetune"), wd, mesh=_mesh())
    c = _config(stage0[1], 6)
    c.model.preset = "qwen2_0_5b"
    with pytest.raises(WorkdirError, match=r"qwen2 \(2 layers x 64, vocab 512\).*qwen2 \(24 layers x 896"):
        run(c, wd, mesh=_mesh())
    assert _snapshot(wd) == before
    # and the step there still exports (its lct_config.json was not rewritten by the refused runs)
    assert (
        convert_main(["export-hf", "--ckpt", str(wd / "checkpoints" / "4"), "--out", str(tmp_path / "hf")])
        == 0
    )


def test_lock_released_on_exceptions_and_on_sigterm(stage0, tmp_path):
    wd = tmp_path / "fresh"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n' * 20)
    with pytest.raises(DataError, match="empty_document 20"):
        run(_config(bad, 4), wd, mesh=_mesh())
    assert not (wd / LOCK_NAME).exists()

    class Preempted:  # SIGTERM while the first batch is read, before the loop handles SIGTERM itself
        def __next__(self):
            assert (wd / LOCK_NAME).exists()
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not stop the run")

    with pytest.raises(SystemExit) as e:
        run(_config(bad, 4), wd, mesh=_mesh(), data_iter=Preempted())
    assert e.value.code == 128 + signal.SIGTERM and not (wd / LOCK_NAME).exists()


def _damage(step: Path, how: str) -> None:
    data_files = sorted((step / "params" / "ocdbt.process_0" / "d").iterdir())
    if how == "missing data file":
        for f in data_files:  # (some files there may be unreferenced leftovers; these are not all)
            f.unlink()
    elif how == "truncated data file":
        for f in data_files:
            os.truncate(f, f.stat().st_size // 2)
    elif how == "truncated iterator json":
        (f,) = (step / "data").glob("*.json")
        f.write_bytes(f.read_bytes()[:40])
    elif how == "missing item":
        shutil.rmtree(step / "opt_state")
    elif how == "no commit marker":
        (step / "commit_success.txt").unlink()
    elif how == "empty step":
        shutil.rmtree(step)
        step.mkdir()


@pytest.mark.parametrize(
    "how,problem",
    [
        ("missing data file", r"params/ocdbt.process_0/d/\w+ is missing"),
        ("truncated data file", r"params/ocdbt.process_0/d/\w+ is truncated"),
        ("truncated iterator json", r"data/process_0-of-1.json is not valid JSON"),
        ("missing item", r"opt_state/ is missing"),
        ("no commit marker", r"no commit_success.txt"),
        ("empty step", r"the step directory is empty"),
    ],
)
def test_each_damage_is_detected_and_skipped(stage0, tmp_path, capsys, how, problem):
    ck = _copy(stage0, tmp_path) / "checkpoints"
    assert check_step(ck / "4") is None and check_step(ck / "2") is None
    _damage(ck / "4", how)
    assert check_step(ck / "4") is not None
    assert choose_restore_step(ck) == 2
    out = capsys.readouterr().out
    assert f"skipping checkpoint step 4 in {ck}: " in out and "renamed it to 4.corrupt" in out
    assert __import__("re").search(problem, out), out
    assert (ck / "4.corrupt").is_dir() and not (ck / "4").exists()  # kept aside, not deleted
    _damage(ck / "2", how)
    with pytest.raises(CheckpointError, match=r"no checkpoint step in .* can be restored \(step 2: "):
        choose_restore_step(ck)


def test_restart_past_a_damaged_step_then_resume_step(stage0, tmp_path, capsys):
    wd = _copy(stage0, tmp_path)
    _damage(wd / "checkpoints" / "4", "truncated data file")
    res = run(_config(stage0[1], 6), wd, mesh=_mesh())
    out = capsys.readouterr().out
    assert "skipping checkpoint step 4" in out and "is truncated" in out and "(step 2)" in out
    assert sorted(p.name for p in (wd / "checkpoints").iterdir() if p.is_dir()) == [
        "2",
        "4",
        "4.corrupt",
        "6",
    ]
    assert [int(h["step_time_s"] > 0) for h in res.history] == [1] * 4  # steps 3..6 ran again
    # TensorBoard (its own reader, over every file): each step once, the replayed ones as the resumed run saw them
    losses = read_scalars(wd / "tb")["loss"]
    assert scalar_steps(wd / "tb", "loss") == list(range(1, 7))  # steps 3 and 4 were logged twice
    np.testing.assert_allclose([losses[s] for s in (3, 4, 5, 6)], [h["loss"] for h in res.history], rtol=1e-6)
    assert len(event_files(wd / "tb")) == 2
    tags = read_scalars(wd / "tb")
    assert {t for t in tags if t.startswith("skipped/")} == {
        "skipped/empty_document", "skipped/too_long", "skipped/bad_record"
    }  # fmt: skip
    real = 2 * 32  # two full rows of 32 tokens
    assert all(abs(h["nonpad_tokens_per_s"] * h["step_time_s"] - real) < 1e-3 for h in res.history)

    with pytest.raises(CheckpointError, match=r"--config.resume_step=3: .* holds steps \[2, 4, 6\]"):
        run(_config(stage0[1], 6, resume_step=3), wd, mesh=_mesh())  # the config field reaches the choice
    assert choose_restore_step(wd / "checkpoints", 4) == 4  # a step asked for: newer ones move aside
    assert "moved the newer step 6 aside to 6.superseded" in capsys.readouterr().out
    assert (wd / "checkpoints" / "6.superseded").is_dir() and choose_restore_step(wd / "checkpoints") == 4


def test_export_refuses_unfinished_and_damaged_steps(stage0, tmp_path, capsys):
    ck = _copy(stage0, tmp_path) / "checkpoints"
    _damage(ck / "4", "no commit marker")
    _damage(ck / "2", "missing data file")
    for step, match in [
        ("4", "save did not finish (no commit_success.txt)"),
        ("2", "is damaged or unfinished"),
    ]:
        out = tmp_path / f"hf{step}"
        assert convert_main(["export-hf", "--ckpt", str(ck / step), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and match in err, err
        assert not out.exists()


def test_tensorboard_shows_replayed_steps_once(tmp_path):
    from lct_jax.train.metrics import EventWriter

    first = EventWriter(tmp_path)  # logged steps 1..4, then killed after its step-2 checkpoint
    for s in range(1, 5):
        first.scalars(s, {"loss": float(s)})
    first.close()
    time.sleep(1.1)  # event file names carry the second
    resumed = EventWriter(tmp_path, purge_step=3)  # what run() passes when it resumes from step 2
    for s in range(3, 7):
        resumed.scalars(s, {"loss": 10.0 + s})
    resumed.close()
    assert scalar_steps(tmp_path, "loss") == [1, 2, 3, 4, 5, 6]  # TensorBoard's reader, over both files
    assert read_scalars(tmp_path)["loss"] == {1: 1.0, 2: 2.0, 3: 13.0, 4: 14.0, 5: 15.0, 6: 16.0}

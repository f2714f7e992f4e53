"""``haystack``: the store holds the letterboxed frames' visual tokens with the meta V-NIAH reads; it resumes after a
stop (in process) and after kill -9 (a real subprocess) to the same bytes; user mistakes are one `error:` line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from lct_jax.convert.checkpoint import load_model, params_of, save_model_checkpoint
from lct_jax.data.procedural import procedural_frame
from lct_jax.data.unires import normalize
from lct_jax.eval.__main__ import main
from lct_jax.eval.encode import letterbox
from lct_jax.eval.haystack import build_haystack
from lct_jax.eval.store import EmbeddingStore
from lct_jax.model.longva import PRESETS, LongVA
from lct_jax.model.qwen2 import PRESETS as QWEN2_PRESETS
from lct_jax.model.qwen2 import Qwen2

ROOT = Path(__file__).resolve().parents[2]
VIDEO = "procedural:seed=1,frames=37,fps=2,size=48x30"  # 18.5 s at 2 fps, wider than tall: letterboxed


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    cfg = PRESETS["tiny"]
    save_model_checkpoint(d / "longva", "longva", cfg, params_of(LongVA(cfg, rngs=nnx.Rngs(0))))
    qcfg = QWEN2_PRESETS["tiny"]
    save_model_checkpoint(d / "qwen2", "qwen2", qcfg, params_of(Qwen2(qcfg, rngs=nnx.Rngs(0))))
    return d


@pytest.fixture(scope="module")
def built(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "hay"
    build_haystack(
        str(ckpts / "longva"), VIDEO, str(out), fps=1, batch_size=8, chunk_frames=4, progress=False
    )
    return out


def test_store_holds_the_encoded_letterboxed_frames_and_the_meta(ckpts, built):
    ck, store = ckpts / "longva", EmbeddingStore.open(built)
    idx = list(range(0, 37, 2))  # one frame a second of a 2 fps movie: 19 frames
    cfg = PRESETS["tiny"]
    assert store.complete and store.shape == (19, cfg.tokens_per_tile, cfg.text.hidden_size)
    assert store.meta["dtype"] == cfg.text.dtype == "bfloat16"
    want_meta = dict(checkpoint=str(ck.absolute()), source=VIDEO, fps=1.0, num_frames=None, max_frames=None,
                     frame_indices=idx, tile=cfg.tile, tokens_per_frame=cfg.tokens_per_tile, letterbox=True)  # fmt: skip
    assert {k: store.meta[k] for k in want_meta} == want_meta
    # reference: the model's own encode_images on host-normalized letterboxed frames, all at once in fp32
    model = load_model(ck, dtype="float32")
    frames = np.stack([letterbox(procedural_frame(1, k, (48, 30)), cfg.tile) for k in idx])
    ref = np.asarray(model.encode_images(normalize(frames)))
    got = store.read().astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=0.02, atol=0.02)  # bf16 compute vs fp32
    assert np.abs(got - ref).mean() < 0.05 * np.abs(ref).mean()


def test_resume_after_a_stop_gives_the_same_bytes(ckpts, built, tmp_path):
    out = tmp_path / "hay"
    shutil.copytree(built, out)
    # as if the writer had been killed after its first step: progress says 8, the chunks after it hold garbage
    (out / "progress.json").write_text(json.dumps({"frames_done": 8}))
    s = EmbeddingStore.open(out, allow_partial=True)
    s._array[8:].write(np.full(s._array[8:].shape, 7, s._array.dtype.numpy_dtype)).result()
    logged = []
    kw = dict(fps=1, batch_size=8, chunk_frames=4, progress=False, log=logged.append)
    build_haystack(str(ckpts / "longva"), VIDEO, str(out), **kw)
    assert logged == [f"resuming at frame 8 of 19 ({out} holds frames [0, 8))"]
    np.testing.assert_array_equal(EmbeddingStore.open(out).read(), EmbeddingStore.open(built).read())
    build_haystack(str(ckpts / "longva"), VIDEO, str(out), **kw)
    assert logged[-1] == f"{out} already holds all 19 frames; nothing to do"


def test_user_errors_are_one_line(ckpts, built, tmp_path, capsys):
    (tmp_path / "notes.mp4").write_text("not a video")
    (tmp_path / "frames").mkdir()
    procedural_frame(0, 0, (8, 8)).save(tmp_path / "frames" / "0.png")
    ck, out = str(ckpts / "longva"), str(tmp_path / "hay")
    hay = ["--ckpt", ck, "--video", VIDEO]
    cases = [
        (["--ckpt", str(ckpts / "qwen2"), "--video", VIDEO], "is a 'qwen2' checkpoint; haystack needs a LongVA"),
        (["--ckpt", str(tmp_path / "nope"), "--video", VIDEO], "no lct_config.json found"),
        (["--ckpt", ck, "--video", str(tmp_path / "nope.mp4")], "nope.mp4: no such video file"),
        (["--ckpt", ck, "--video", str(tmp_path / "notes.mp4")], "notes.mp4: not a readable video file"),
        (["--ckpt", ck, "--video", str(tmp_path / "frames"), "--fps", "1"], "a directory of frames has no frame rate"),
        (hay + ["--fps", "2", "--chunk-frames", "4", "--out", str(built)],
         "already holds a different embedding store (fps: 1.0 there vs 2.0 now, frame_indices: [0, 2, 4, "),
        (hay + ["--fps", "0"], "--fps 0.0 must be > 0"),
        (hay + ["--batch-size", "12"], "must divide by this host's 8 devices"),
        (["--ckpt", ck], "the following arguments are required: --video"),
    ]  # fmt: skip
    for args, why in cases:
        try:
            rc = main(["haystack", "--out", out, *args])
        except SystemExit as e:  # argparse's own checks (a missing flag)
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and why in err and err.count("\n") == 1, (args, err)
    assert not os.path.exists(out)  # no failed command left a store behind


def _haystack_cmd(ckpt, out):
    # 640x360 frames take ~5 ms each to draw and letterbox: the run lasts seconds, long enough to be killed
    video = "procedural:seed=0,frames=320"
    return [sys.executable, "-m", "lct_jax.eval", "haystack", "--ckpt", str(ckpt), "--video", video, "--fps", "1",
            "--out", str(out), "--batch-size", "32"]  # fmt: skip


@pytest.mark.slow
def test_kill9_then_rerun_resumes_and_matches_an_uninterrupted_run(ckpts, tmp_path):
    env = {
        **os.environ,
        "XLA_FLAGS": "",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    run = lambda out: subprocess.run(_haystack_cmd(ckpts / "longva", out), cwd=ROOT, env=env, capture_output=True,
                                     text=True, timeout=300)  # fmt: skip
    ref = run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "hay"
    proc = subprocess.Popen(_haystack_cmd(ckpts / "longva", out), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    progress, done, deadline = out / "progress.json", 0, time.monotonic() + 240
    while done < 32 and proc.poll() is None and time.monotonic() < deadline:  # the first step is on disk
        time.sleep(0.02)
        done = json.loads(progress.read_text())["frames_done"] if progress.exists() else 0
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = json.loads(progress.read_text())["frames_done"]
    assert 0 < killed_at < 320 and killed_at % 32 == 0
    again = run(out)
    assert again.returncode == 0, again.stderr
    assert f"resuming at frame {killed_at} of 320" in again.stdout
    a, b = EmbeddingStore.open(tmp_path / "ref"), EmbeddingStore.open(out)
    assert a.meta == b.meta
    np.testing.assert_array_equal(a.read(), b.read())


@pytest.mark.slow
def test_two_processes_run_the_same_command_and_process_0_writes(ckpts, tmp_path):
    """A 2-host pod on this machine: JAX's Slurm cluster detection starts jax.distributed, gloo does the barrier."""
    out = tmp_path / "hay"
    cmd = [sys.executable, "-m", "lct_jax.eval", "haystack", "--ckpt", str(ckpts / "longva"), "--video",
           "procedural:seed=0,frames=40,size=64x36", "--out", str(out), "--batch-size", "8", "--distributed", "yes"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}  # not a Cloud TPU cluster
    env.update(XLA_FLAGS="", JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               JAX_COORDINATOR_ADDRESS=f"localhost:{23400 + os.getpid() % 500}", SLURM_JOB_ID="1",
               SLURM_NTASKS="2", SLURM_LOCALID="0", SLURM_STEP_NODELIST="localhost",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")  # fmt: skip
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**env, "SLURM_PROCID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    # the start of python -m lct_jax.train, from the same flags
    assert "jax.distributed via SlurmCluster: process 1 of 2" in logs[1], logs[1]
    assert "process 1: process 0 builds" in logs[1] and "complete" in logs[0]
    assert EmbeddingStore.open(out).shape == (40, 4, 64)

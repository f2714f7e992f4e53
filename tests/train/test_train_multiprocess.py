"""Real multi-process training: ``python -m lct_jax.train`` as 2 processes x 4 CPU devices on 127.0.0.1 (explicit
``--coordinator_address/--num_processes/--process_id``), against single-process 8-device references computed here
(one process, mesh data=2 seq=4, the step compiled once for all of them).

Launches (each bounded by a timeout; every child is killed with its process group on failure and at teardown):

    S1  2 processes, mesh data=1 seq=4 model=2 (seq spans the processes), steps 0..3
    S2  the same command again: resumes exactly from step 3, steps 4..6
    D1  2 processes, mesh data=2 seq=4 (data spans the processes: one data shard each), steps 0..3
    E1  1 process resumes D1's 2-process checkpoint (2 -> 1 processes, 2 -> 1 data shards), steps 4..6
    E2  2 processes resume E1's 1-process checkpoint (1 -> 2), steps 7..9

Same global batches: in the seq layout both processes read data shard 0 of 1, as the single process does (the
same pipeline, rows split only over 'seq'/'model'); in the data layout the reference is fed, per step, shard 0's
rows then shard 1's (how ``make_array_from_process_local_data`` stacks the two processes' rows), each shard built
by the real pipeline. After an elastic resume the reference is fed what ``lct_jax.data.loader.elastic_state``
documents: for each new shard, the records of its positions in the shuffled global stream from the resume point
on (built independently here: grain's shuffled order, then a fresh unshuffled pipeline over those records).

Tolerance 2e-5 on fp32 losses near 5: the data are identical, but the reference runs on one mesh for all layouts
and the children compile with cheaper XLA CPU options, so reductions run in other orders (measured: <= 1e-6).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import pytest

from lct_jax.data import loader
from lct_jax.sharding import make_mesh
from lct_jax.testing.events import event_files, read_scalars
from lct_jax.train.checkpoint import Checkpointer
from lct_jax.train.run import build_data, build_model, load_config
from lct_jax.train.state import init_state, make_state_spec
from lct_jax.train.step import StepConfig, jit_train_step

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RECORDS, BATCH, SEQ_LEN, TIMEOUT_S = 200, 4, 64, 240
SEQ_MESH, DATA_MESH = (1, 4, 2), (2, 4, 1)
TOL = 2e-5


class Children:
    """Start children in their own process groups, wait with a deadline, kill every group on failure."""

    def __init__(self):
        self.live: list[subprocess.Popen] = []

    def run(
        self, cmds: list[list[str]], envs: list[dict], logs: list[Path], timeout_s=TIMEOUT_S
    ) -> list[str]:
        procs = []
        for cmd, env, log in zip(cmds, envs, logs, strict=True):
            with open(log, "w") as f:
                procs.append(
                    subprocess.Popen(
                        cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        self.live += procs
        deadline = time.monotonic() + timeout_s
        try:
            while any(p.poll() is None for p in procs):
                failed = [p for p in procs if p.poll() not in (None, 0)]
                assert not failed, (
                    f"a child failed (rc {failed[0].returncode}):\n{_tail(logs[procs.index(failed[0])])}"
                )
                assert time.monotonic() < deadline, (
                    f"children still running after {timeout_s} s:\n{_tail(logs[0])}"
                )
                time.sleep(0.2)
            for p, log in zip(procs, logs, strict=True):
                assert p.returncode == 0, f"rc {p.returncode}:\n{_tail(log)}"
        finally:
            self.kill(procs)
        return [log.read_text() for log in logs]

    def kill(self, procs=None):
        for p in self.live if procs is None else procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)


def _tail(path: Path, n=3000) -> str:
    return path.read_text()[-n:] if path.exists() else "(no log)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(data: Path, steps: int, mesh, extra=()) -> list[str]:
    d, q, m = mesh
    return [
        f"--config.data.paths={data}",
        f"--config.num_steps={steps}",
        "--config.checkpoint.every=3",
        "--config.progress=False",
        "--config.log_every=1",
        f"--config.data.batch_size={BATCH}",
        f"--config.data.seq_len={SEQ_LEN}",
        f"--config.mesh.data={d}",
        f"--config.mesh.seq={q}",
        f"--config.mesh.model={m}",
        *extra,
    ]


def _train(children, workdir: Path, processes: int, mesh, steps: int, data: Path) -> list[str]:
    base = [
        sys.executable,
        "-m",
        "lct_jax.train",
        "--config=configs/text_extension.py:size=tiny",
        f"--workdir={workdir}",
    ]
    base += _overrides(data, steps, mesh)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # cheaper CPU compiles (half the CPU time of a launch); the references here compile with the defaults
    fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // processes} {fast}"
    if processes == 1:  # --distributed=auto on a plain host: no cluster detected, runs alone
        cmds = [base]
    else:
        addr = f"127.0.0.1:{_free_port()}"
        cmds = [
            base + [f"--coordinator_address={addr}", f"--num_processes={processes}", f"--process_id={i}",
                    f"--coordinator_bind_address={addr}", "--distributed_timeout=120"]
            for i in range(processes)
        ]  # fmt: skip
    logs = [workdir.parent / f"{workdir.name}.{i}.log" for i in range(len(cmds))]
    t0 = time.monotonic()
    out = children.run(cmds, [env] * len(cmds), logs)
    print(
        f"\n{processes} process(es) {mesh} to step {steps} in {workdir.name}: {time.monotonic() - t0:.1f} s"
    )
    return out


def _losses(workdir: Path, newest_only=True) -> dict[int, float]:
    files = event_files(workdir / "tb")
    out = {}
    for f in files[-1:] if newest_only else files:
        out.update(read_scalars(f)["loss"])
    return out


def _write_docs(path: Path):
    r = np.random.default_rng(0)
    words = ["the cat", "a dog", "sees", "likes", "the red ball", "a tree", "runs", "home"]
    with open(path, "w") as f:
        for _ in range(RECORDS):
            f.write(json.dumps({"text": " ".join(r.choice(words) for _ in range(r.integers(5, 60)))}) + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    data = tmp / "docs.jsonl"
    _write_docs(data)
    children = Children()
    out = {"data": data, "tmp": tmp}
    try:
        t0 = time.monotonic()
        out["S1"] = _train(children, tmp / "seq", 2, SEQ_MESH, 3, data)
        out["S1_losses"] = _losses(tmp / "seq")
        shutil.copytree(tmp / "seq", tmp / "seq_at_3")
        out["S2"] = _train(children, tmp / "seq", 2, SEQ_MESH, 6, data)
        out["D1"] = _train(children, tmp / "data", 2, DATA_MESH, 3, data)
        shutil.copytree(tmp / "data", tmp / "two_to_one")
        out["E1"] = _train(children, tmp / "two_to_one", 1, DATA_MESH, 6, data)
        shutil.copytree(tmp / "two_to_one", tmp / "one_to_two")
        out["E2"] = _train(children, tmp / "one_to_two", 2, DATA_MESH, 9, data)
        print(f"\nmulti-process launches: {time.monotonic() - t0:.1f} s wall")
        yield out
    finally:
        children.kill()


# ------------------------------------------------------------------------------------- references (in-process)


def _config(data: Path, mesh, **changes):
    c = load_config(str(ROOT / "configs/text_extension.py") + ":size=tiny")
    c.data.paths, c.data.batch_size, c.data.seq_len = str(data), BATCH, SEQ_LEN
    c.mesh.data, c.mesh.seq, c.mesh.model = mesh
    c.progress = False
    for k, v in changes.items():
        setattr(c.data, k, v)
    return c


_REFERENCE: dict = {}


def _reference_losses(config, batches, restore_from: Path | None = None) -> list[float]:
    """One process, 8 devices, mesh DATA_MESH: train ``batches`` (global host batches) from the seed's initial
    state or from the latest checkpoint in ``restore_from``. The step and the initial state are compiled once."""
    mesh = make_mesh(*DATA_MESH)
    if not _REFERENCE:
        _, _, make_model = build_model(config)
        spec = make_state_spec(make_model, config.optim, mesh)
        step_cfg = StepConfig(micro_batches=config.step.micro_batches, loss_chunk=config.step.loss_chunk)
        _REFERENCE.update(spec=spec, step=jit_train_step(spec, config.optim, step_cfg, batches[0]))
        _REFERENCE["init"] = jax.device_get(init_state(spec, make_model, config.optim, seed=config.seed))
    spec, step_fn = _REFERENCE["spec"], _REFERENCE["step"]
    if restore_from is None:  # the step donates its state: a fresh device copy of the initial state each time
        state = jax.device_put(_REFERENCE["init"], spec.shardings)
    else:
        ckpt = Checkpointer(restore_from / "checkpoints", every=1, keep=10, async_save=False)
        state = ckpt.restore(spec, config.optim)  # no data iterator: the data item is not read
        ckpt.close()
    out = []
    with jax.set_mesh(mesh):
        for b in batches:
            state, m = step_fn(state, loader.global_batch(b, mesh, num_shards=1))
            out.append(float(m["loss"]))
    return out


def _shard_batches(config, shard: int, count: int, n: int) -> list[dict]:
    """The first ``n`` batches of data shard ``shard`` of ``count``, as a process owning it builds them."""
    mesh = make_mesh(*DATA_MESH)
    real = loader.mesh_data_shard
    loader.mesh_data_shard = lambda *a, **k: (shard, count)
    try:
        it = build_data(config, mesh, build_model(config)[1])
    finally:
        loader.mesh_data_shard = real
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _concat(per_shard: list[list[dict]]) -> list[dict]:
    return [
        {k: np.concatenate([s[i][k] for s in per_shard]) for k in per_shard[0][i]}
        for i in range(len(per_shard[0]))
    ]


def _elastic_batches(runs, log: str, new_shards: int, n: int, name: str) -> list[dict]:
    """What the documented semantics predict after an elastic resume: new shard j reads the records at its global
    stream positions (j, j + new_shards, ... of each epoch's shuffled order) from the resume point on, packed fresh."""
    m = re.search(r"restarts at record (\d+) of epoch (\d+)", log)
    assert m, f"no elastic-resume warning in the log:\n{log[-2000:]}"
    resume_at = int(m.group(2)) * RECORDS + int(m.group(1))
    order = grain.MapDataset.range(RECORDS).shuffle(seed=0)  # config.seed 0; reshuffled per epoch
    lines = runs["data"].read_text().splitlines()
    per_shard = []
    for j in range(new_shards):
        positions = [g for g in range(resume_at, resume_at + 2 * RECORDS) if g % RECORDS % new_shards == j]
        path = runs["tmp"] / f"{name}_shard{j}.jsonl"
        path.write_text("".join(lines[int(order[g])] + "\n" for g in positions))
        cfg = _config(path, DATA_MESH, shuffle=False, batch_size=BATCH // new_shards)
        per_shard.append(_shard_batches(cfg, 0, 1, n))
    return _concat(per_shard)


# ------------------------------------------------------------------------------------------------------ tests


def test_seq_across_processes_matches_one_process_and_resumes_exactly(runs):
    assert "jax.distributed via explicit settings: process 0 of 2" in runs["S1"][0]
    assert "devices=8 processes=2" in runs["S1"][1]
    assert "resumed from" in runs["S2"][0] and "(step 3)" in runs["S2"][0]
    assert "elastic resume" not in runs["S2"][0] + runs["S2"][1]  # same layout: grain restores exactly
    got = {**runs["S1_losses"], **_losses(runs["tmp"] / "seq")}
    assert sorted(got) == list(range(1, 7))
    config = _config(runs["data"], SEQ_MESH)
    it = build_data(
        config, make_mesh(*SEQ_MESH), build_model(config)[1]
    )  # one process: data shard 0 of 1, as both processes read
    want = _reference_losses(config, [next(it) for _ in range(6)])  # (on DATA_MESH: same rows, other mesh)
    it.close()
    diff = max(abs(got[s + 1] - w) for s, w in enumerate(want))
    print(f"seq layout: 2-process (resumed at 3) vs 1-process losses, max |diff| = {diff:.2e}")
    assert diff <= TOL


def test_data_across_processes_matches_one_process_fed_the_same_global_batches(runs):
    got = _losses(runs["tmp"] / "data")
    assert sorted(got) == [1, 2, 3]
    config = _config(
        runs["data"], DATA_MESH
    )  # a process owning shard s of 2 builds batches of BATCH // 2 rows
    want = _reference_losses(config, _concat([_shard_batches(config, s, 2, 3) for s in (0, 1)]))
    diff = max(abs(got[s + 1] - w) for s, w in enumerate(want))
    print(f"data layout: 2-process vs 1-process fed shard 0 + shard 1 rows, max |diff| = {diff:.2e}")
    assert diff <= TOL


def test_checkpoints_are_written_once(runs):
    """A 2-process checkpoint has the files of a 1-process one, except Orbax's per-process array shards and
    grain's per-process iterator files, and holds the same bytes of arrays (nothing written twice)."""
    two, one = runs["tmp"] / "data" / "checkpoints" / "3", runs["tmp"] / "two_to_one" / "checkpoints" / "6"

    def shape(d):
        out = set()
        for p in d.rglob("*"):
            rel = p.relative_to(d).as_posix()
            if (
                p.is_file()
                and "/ocdbt.process_" not in rel
                and "/d/" not in rel
                and not rel.startswith("data/process_")
            ):
                out.add(re.sub(r"process_\d+$", "process_*", rel))
        return out

    def array_bytes(d):
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and "ocdbt.process_" in p.as_posix())

    assert shape(two) == shape(one)
    assert sorted(p.name for p in (two / "data").glob("process_*")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    assert sorted(p.name for p in (one / "data").glob("process_*")) == ["process_0-of-1.json"]
    assert sorted(p.name for p in (two / "params").glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]
    ratio = array_bytes(two) / array_bytes(one)
    print(f"array bytes, 2-process / 1-process checkpoint: {ratio:.3f}")
    assert 0.9 < ratio < 1.1
    for w in ("seq", "data"):  # process 0 alone writes the events and configs
        assert len(event_files(runs["tmp"] / w / "tb")) == (2 if w == "seq" else 1)
        assert (runs["tmp"] / w / "checkpoints" / "lct_config.json").is_file()


@pytest.mark.parametrize(
    "launch,workdir,source,old,new,first",
    [("E1", "two_to_one", "data", 2, 1, 4), ("E2", "one_to_two", "two_to_one", 1, 2, 7)],
    ids=["2->1 processes", "1->2 processes"],
)
def test_elastic_resume_onto_another_process_count(runs, launch, workdir, source, old, new, first):
    log = runs[launch][0]
    assert f"devices=8 processes={new}" in log and f"(step {first - 1})" in log
    assert f"elastic resume: data shards x workers {old}x0 -> {new}x0" in log
    got = _losses(runs["tmp"] / workdir)
    assert sorted(got) == [first, first + 1, first + 2]
    batches = _elastic_batches(runs, log, new, 3, launch)
    want = _reference_losses(_config(runs["data"], DATA_MESH), batches, runs["tmp"] / source)
    diff = max(abs(got[first + s] - w) for s, w in enumerate(want))
    print(f"{old} -> {new} processes: resumed losses vs the documented semantics, max |diff| = {diff:.2e}")
    assert diff <= TOL

"""launch/*.sh against a fake gcloud on PATH (tests/launch/fake_gcloud.py): the exact gcloud command lines, in
order, of a full launch/up.sh cycle for a v5e-256 spot slice that is preempted once; --dry-run runs nothing;
settings are checked before any gcloud call; quoting survives the trip to the hosts; launch/host.sh's guard,
log and exit status on a real (local) run of a stand-in trainer."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).with_name("fake_gcloud.py")
V5E_SPOT = dict(TPU_NAME="lct-v5e-256", ZONE="us-west4-a", PROJECT="my-project", ACCELERATOR="v5litepod-256",
                RUNTIME="v2-alpha-tpuv5-lite", SPOT="1")  # fmt: skip
G = ["--zone=us-west4-a", "--project=my-project"]
QR = ["gcloud", "compute", "tpus", "queued-resources"]
CONFIG, WORKDIR = "configs/text_extension.py:size=7b", "gs://my-bucket/runs/stage0"
MARKER = f"{WORKDIR}/checkpoints/1000/commit_success.txt"


class Fake:
    def __init__(self, tmp: Path):
        self.tmp, self.bin, self.log, self.rules = tmp, tmp / "bin", tmp / "calls.jsonl", tmp / "rules.json"
        self.bin.mkdir()
        for name in ("gcloud", "xpk"):
            (self.bin / name).write_text(
                f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(FAKE))} {name} "$@"\n'
            )
            (self.bin / name).chmod(0o755)

    def run(self, script: str, *args: str, rules=(), timeout=60, **env) -> subprocess.CompletedProcess:
        self.log.write_text("")
        self.rules.write_text(json.dumps(list(rules)))
        full = {"PATH": f"{self.bin}:{os.environ['PATH']}", "HOME": str(self.tmp), "TMPDIR": str(self.tmp),
                "FAKE_GCLOUD_LOG": str(self.log), "FAKE_GCLOUD_RULES": str(self.rules), "POLL_S": "0", **env}  # fmt: skip
        cmd = [str(ROOT / "launch" / script), *args]
        return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout, cwd=self.tmp)

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def fake(tmp_path):
    return Fake(tmp_path)


def _printed(stdout: str) -> list[list[str]]:
    """The "+ cmd" lines a script printed, as argv lists (they are exact shell words)."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _cycle(start_rest, setup_rest):
    """gcloud calls of one (re)start: scp the checkout, set up every host, start the trainers."""
    return [
        QR + ["scp", setup_rest, "lct-v5e-256:/tmp/lct_jax_src.tgz", "--node=all", "--worker=all", *G],
        QR + ["ssh", "lct-v5e-256", "--node=all", "--worker=all",
              "--command=mkdir -p ~/lct_jax && tar -xzf /tmp/lct_jax_src.tgz -C ~/lct_jax && "
              "bash ~/lct_jax/launch/host.sh setup my-bucket", *G],
        QR + ["ssh", "lct-v5e-256", "--node=all", "--worker=all", f"--command=bash ~/lct_jax/launch/host.sh start {start_rest}", *G],
    ]  # fmt: skip


def test_up_v5e_256_spot_full_cycle_with_one_preemption(fake):
    ls = ["gcloud", "storage", "ls", MARKER]
    describe = QR + ["describe", "lct-v5e-256", *G, "--format=value(state.state)"]
    create = QR + ["create", "lct-v5e-256", "--node-id=lct-v5e-256", "--accelerator-type=v5litepod-256",
                   "--runtime-version=v2-alpha-tpuv5-lite", "--spot", *G]  # fmt: skip
    status = QR + [
        "ssh",
        "lct-v5e-256",
        "--node=all",
        "--worker=all",
        "--command=bash ~/lct_jax/launch/host.sh status",
        *G,
    ]
    rules = [
        {"match": "storage ls", "rc": 1, "err": "ERROR: (gcloud.storage.ls) One or more URLs matched no objects.\n", "times": 4},
        {"match": "storage ls", "out": MARKER + "\n"},
        {"match": "describe", "rc": 1, "err": "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: lct-v5e-256\n", "times": 1},
        {"match": "describe", "out": "WAITING_FOR_RESOURCES\n", "times": 1},
        {"match": "describe", "out": "ACTIVE\n", "times": 2},
        {"match": "describe", "out": "SUSPENDED\n", "times": 2},  # the spot slice is preempted while training
        {"match": "describe", "out": "ACTIVE\n"},
        {"match": "host.sh status", "out": "running\nrunning\n"},
    ]  # fmt: skip
    args = (CONFIG, WORKDIR, "--config.num_steps=1000", "--config.data.paths=/data/train-*.jsonl")
    r = fake.run("up.sh", *args, rules=rules, **V5E_SPOT)
    assert r.returncode == 0, r.stdout + r.stderr
    tarball = f"{fake.tmp}/lct_jax_src.lct-v5e-256.tgz"
    start = f"{CONFIG} /gcs/my-bucket/runs/stage0 --config.num_steps=1000 '--config.data.paths=/data/train-*.jsonl'"
    want = [ls, describe, create, describe, describe, *_cycle(start, tarball), ls, describe, status, ls, describe,
            ls, describe, QR + ["delete", "lct-v5e-256", "--force", "--quiet", *G], create, describe,
            *_cycle(start, tarball), ls]  # fmt: skip
    got = fake.calls()
    assert got == want
    assert [c for c in _printed(r.stdout) if c[0] == "gcloud"] == got  # what it printed is what it ran
    assert "queued resource lct-v5e-256 is SUSPENDED: the slice was preempted or lost" in r.stdout
    assert f"done: {MARKER} exists" in r.stdout and "attempt 2 of 20" in r.stdout
    assert (fake.tmp / "lct_jax_src.lct-v5e-256.tgz").stat().st_size > 10_000  # tar ran for real
    print(r.stdout)


def test_up_stops_after_max_attempts_and_on_a_failed_trainer(fake):
    always_lost = [
        {"match": "storage ls", "rc": 1, "err": "no objects"},
        {"match": "describe", "out": "FAILED\n"},
    ]
    r = fake.run(
        "up.sh", CONFIG, WORKDIR, "--config.num_steps=1000", rules=always_lost, MAX_ATTEMPTS="2", **V5E_SPOT
    )
    assert r.returncode == 1
    assert r.stdout.strip().endswith(
        "stop: MAX_ATTEMPTS=2 attempts used and step 1000 is not in gs://my-bucket/runs/stage0"
    )
    assert sum(c[4:5] == ["create"] for c in fake.calls()) == 2  # bounded: one new slice per attempt
    flaky = [{"match": "storage ls", "rc": 1, "err": "no objects", "times": 2}, {"match": "storage ls", "out": MARKER},
             {"match": "describe", "rc": 1, "err": "NOT_FOUND", "times": 2}, {"match": "describe", "out": "ACTIVE\n"},
             {"match": "create", "rc": 1, "err": "ERROR: (gcloud) quota exceeded\n", "times": 1}]  # fmt: skip
    r = fake.run("up.sh", CONFIG, WORKDIR, "--config.num_steps=1000", rules=flaky, **V5E_SPOT)
    assert r.returncode == 0 and "the create failed (gcloud's message above); next attempt" in r.stdout
    assert sum(c[4:5] == ["create"] for c in fake.calls()) == 2 and "attempt 2 of 20" in r.stdout
    failing = [{"match": "storage ls", "rc": 1, "err": "no objects"}, {"match": "describe", "rc": 1, "err": "NOT_FOUND", "times": 1},
               {"match": "describe", "out": "ACTIVE\n"}, {"match": "host.sh status", "out": "0\n1\n"}]  # fmt: skip
    r = fake.run("up.sh", CONFIG, WORKDIR, "--config.num_steps=1000", rules=failing, **V5E_SPOT)
    assert r.returncode == 1 and "stop: a trainer failed on a healthy slice before step 1000" in r.stdout
    assert "--output-directory=logs/lct-v5e-256" in fake.calls()[-1][-3]  # logs of every host fetched first


def test_dry_run_prints_and_runs_nothing(fake):
    env = dict(V5E_SPOT, WORKDIR=WORKDIR)
    for script, args in [("create.sh", ()), ("setup.sh", ()), ("run.sh", (CONFIG, WORKDIR)), ("stop.sh", ()),
                         ("logs.sh", ("out",)), ("delete.sh", ()), ("ssh.sh", ("3", "--", "nvidia-smi")),
                         ("up.sh", (CONFIG, WORKDIR, "--config.num_steps=1000")), ("gke.sh", (CONFIG, WORKDIR))]:  # fmt: skip
        r = fake.run(script, *args, "--dry-run", **env)
        assert r.returncode == 0, (script, r.stderr)
        printed = _printed(r.stdout)
        assert printed and all(c[0] in ("gcloud", "xpk", "tar", "mkdir") for c in printed), (script, r.stdout)
        assert fake.calls() == [], script
        assert not (fake.tmp / "out").exists() and not list(fake.tmp.glob("*.tgz"))
    r = fake.run("create.sh", "--dry-run", **dict(V5E_SPOT, SPOT="0"))
    assert "--spot" not in r.stdout and "--reserved" not in r.stdout  # SPOT=0 is on-demand
    r = fake.run("create.sh", "--dry-run", **dict(V5E_SPOT, SPOT="0", RESERVED="1"))
    assert " --reserved " in r.stdout


def test_multislice_puts_slices_on_the_data_axis(fake):
    env = dict(V5E_SPOT, NUM_SLICES="2")
    r = fake.run("create.sh", "--dry-run", **env)
    assert "--node-count=2 --node-prefix=lct-v5e-256" in r.stdout and "--node-id" not in r.stdout
    r = fake.run("run.sh", CONFIG, WORKDIR, "--dry-run", **env)
    assert "--config.mesh.data=2'" in r.stdout and "--node=all --worker=all" in r.stdout
    r = fake.run("run.sh", CONFIG, WORKDIR, "--config.mesh.data=4", "--dry-run", **env)
    assert r.returncode == 0 and r.stdout.count("--config.mesh.data=") == 1
    r = fake.run("gke.sh", CONFIG, WORKDIR, "--dry-run", **env)
    assert "--num-slices=2" in r.stdout and "--config.mesh.data=2" in r.stdout


@pytest.mark.parametrize(
    "script,args,env,message",
    [
        ("create.sh", (), {"TPU_NAME": ""}, "error: set TPU_NAME"),
        ("create.sh", (), {"SPOT": "2"}, "error: SPOT=2 must be 0 or 1"),
        ("create.sh", (), {"RESERVED": "1"}, "error: SPOT=1 and RESERVED=1 exclude each other"),
        ("create.sh", (), {"ZONE": "us-west4"}, "error: ZONE=us-west4 is not a zone"),
        ("create.sh", (), {"ACCELERATOR": "v5e 256"}, "error: ACCELERATOR=v5e 256 is not a type"),
        ("create.sh", (), {"NUM_SLICES": "0"}, "error: NUM_SLICES=0 must be an integer >= 1"),
        ("ssh.sh", ("1;reboot",), {}, "error: WORKER=1;reboot must be a host index"),
        ("ssh.sh", ("all",), {}, "error: an interactive shell needs one host"),
        ("run.sh", ("configs/nope.py", WORKDIR), {}, "error: config file configs/nope.py not found"),
        (
            "run.sh",
            (CONFIG, "runs/x"),
            {},
            "error: WORKDIR=runs/x must be gs://BUCKET/PATH or an absolute path",
        ),
        ("run.sh", (CONFIG, WORKDIR, "num_steps=5"), {}, "error: 'num_steps=5' is not a trainer override"),
        (
            "run.sh",
            (CONFIG, WORKDIR, "--config.mesh.data=3"),
            {"NUM_SLICES": "2"},
            "error: --config.mesh.data=3 must be a multiple",
        ),
        ("up.sh", (CONFIG, WORKDIR), {}, "error: give --config.num_steps=N"),
        (
            "up.sh",
            (CONFIG, WORKDIR, "--config.num_steps=9"),
            {"MAX_ATTEMPTS": "x"},
            "error: MAX_ATTEMPTS=x must be",
        ),
        ("gke.sh", (CONFIG, WORKDIR), {"SPOT": "0", "RESERVED": "1"}, "error: set RESERVATION"),
    ],
)
def test_settings_are_checked_before_any_gcloud_call(fake, script, args, env, message):
    r = fake.run(script, *args, **{**V5E_SPOT, **env})
    assert (
        r.returncode == 2 and r.stderr.strip().startswith(message) and len(r.stderr.strip().splitlines()) == 1
    ), r.stderr
    assert fake.calls() == []


def _host_env(tmp: Path) -> dict:
    """A host's ~/lct_jax with launch/host.sh and a stand-in trainer that records its argv, runs until SIGTERM
    (then exits 0, as the real trainer does after its checkpoint) or exits with $FAKE_TRAINER_RC."""
    home = tmp / "host"
    (home / "lct_jax" / "launch").mkdir(parents=True)
    shutil.copy(ROOT / "launch" / "host.sh", home / "lct_jax" / "launch" / "host.sh")
    trainer = home / "trainer"
    trainer.write_text(
        '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$HOME/argv"\necho "training"\n'
        'if [ -n "${FAKE_TRAINER_RC:-}" ]; then exit "$FAKE_TRAINER_RC"; fi\n'
        "trap 'echo saved; exit 0' TERM\nwhile :; do sleep 0.1; done\n"
    )
    trainer.chmod(0o755)
    return {"PATH": os.environ["PATH"], "HOME": str(home), "LCT_PYTHON": str(trainer)}


def _on_host(env, command: str, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command], env={**env, **extra}, capture_output=True, text=True, timeout=30
    )


def _wait_for(pred, what: str, timeout=20):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_quoting_survives_to_the_trainer_and_the_host_guards(fake):
    """The --command run.sh sends, run by a (local) host's shell: the trainer gets exactly the words given."""
    odd = "--config.data.paths=/data/my docs/it's *.jsonl"
    r = fake.run("run.sh", CONFIG, WORKDIR, odd, "--config.seed=3", **V5E_SPOT)
    assert r.returncode == 0, r.stderr
    (command,) = [a[len("--command=") :] for c in fake.calls() for a in c if a.startswith("--command=")]
    env = _host_env(fake.tmp)
    home = Path(env["HOME"])
    first = _on_host(env, command)
    assert first.returncode == 0, first.stderr
    _wait_for(lambda: (home / "argv").exists(), "the trainer did not start")
    argv = (home / "argv").read_text().splitlines()
    assert argv == [
        "-m",
        "lct_jax.train",
        f"--config={CONFIG}",
        "--workdir=/gcs/my-bucket/runs/stage0",
        odd,
        "--config.seed=3",
    ]
    assert _on_host(env, "bash ~/lct_jax/launch/host.sh status").stdout == "running\n"
    again = _on_host(env, command)  # a second start while the first trainer runs is refused, one line
    assert again.returncode == 3 and again.stderr.startswith("error: a trainer is already running on ")
    assert len(again.stderr.strip().splitlines()) == 1
    assert _on_host(env, "bash ~/lct_jax/launch/host.sh stop").returncode == 0
    _wait_for(
        lambda: _on_host(env, "bash ~/lct_jax/launch/host.sh status").stdout == "0\n",
        "no clean exit after stop",
    )
    crashed = _on_host(env, command, FAKE_TRAINER_RC="5")  # a new start appends to the same log
    assert crashed.returncode == 0
    _wait_for(
        lambda: _on_host(env, "bash ~/lct_jax/launch/host.sh status").stdout == "5\n",
        "exit status not recorded",
    )
    log = (home / "lct_jax" / "logs" / "train.log").read_text()
    assert (
        log.count(" start on ") == 2 and log.count("training") == 2 and "saved" in log
    )  # appended, not overwritten


def test_launch_readme_shows_what_the_scripts_print(fake):
    """launch/README.md quotes the dry runs of up.sh (v5e-256 spot) and gke.sh; they must stay exact."""
    readme = (ROOT / "launch" / "README.md").read_text()
    paths = "--config.data.paths=/gcs/my-bucket/slimpajama/train-*.jsonl"
    up = (
        "up.sh",
        CONFIG,
        WORKDIR,
        "--config.num_steps=1000",
        "--config.init_from=/gcs/my-bucket/ckpt/qwen2_7b_instruct",
        paths,
    )
    gke = ("gke.sh", CONFIG, WORKDIR, "--config.num_steps=1000")
    for script, *args in (up, gke):
        r = fake.run(script, *args, "--dry-run", TMPDIR="/tmp", POLL_S="60", **V5E_SPOT)
        assert r.returncode == 0, r.stderr
        shown = r.stdout.replace(str(ROOT), "/path/to/lct_jax")
        assert shown in readme, f"launch/README.md no longer shows what {script} --dry-run prints:\n{shown}"

"""The command lines as a user runs them: one ``error:`` line with rc 2 for what the user can fix (a mistyped
``--config.`` field, data with no usable record), tracebacks for bugs, and a CPU start without libtpu's noise."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lct_jax.cli import report_errors, user_message
from lct_jax.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _cpu_host_env():
    """The environment of a user's CPU host with the tpu extra: none of the test suite's TPU/JAX settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "JAX_", "ALLOW_MULTIPLE_LIBTPU"))}
    env["XLA_FLAGS"] = ""
    return env


def _train(*args, timeout=300):
    cmd = [sys.executable, "-m", "lct_jax.train", "--config=configs/text_extension.py:size=tiny", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_cpu_host_env(), capture_output=True, text=True, timeout=timeout)


def test_config_typo_is_one_line_with_did_you_mean(tmp_path):
    r = _train(f"--workdir={tmp_path / 'w'}", "--config.data.feild=text", "--config.num_step=3")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "error: --config.data.feild: configs/text_extension.py has no field 'data.feild'; did you mean "
        "--config.data.field or --config.data.shuffle or --config.data.seq_len?"
    ]
    assert not (tmp_path / "w").exists()


def test_data_without_usable_record_fails_fast_in_one_line_and_cpu_start_is_quiet(tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(100)))
    r = _train(f"--workdir={tmp_path / 'w'}", f"--config.data.paths={data}", "--config.data.field=body")
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no usable data: all 100 records of an epoch in a row were skipped"), last
    assert "config.data.field='body'" in last and f"{data}:" in last
    assert "Traceback" not in r.stderr
    # with libtpu installed (the tpu extra) JAX used to try a TPU on this CPU host, and libtpu printed an error block
    assert "E0000" not in r.stderr and "INVALID_ARGUMENT" not in r.stderr, r.stderr[:2000]


def test_report_errors_separates_user_errors_from_bugs(capsys):
    def raises(e):
        def fn():
            raise e

        return fn

    assert report_errors(raises(DataError("no usable data: ...\nsecond line"))) == 2
    assert capsys.readouterr().err == "error: no usable data: ...; second line\n"
    assert report_errors(raises(PermissionError(errno.EACCES, "Permission denied", "/ro/out"))) == 2
    assert "error: /ro/out: Permission denied; choose a location you can write to" in capsys.readouterr().err
    with pytest.raises(KeyError):  # a bug: traceback
        report_errors(raises(KeyError("parent")))
    with pytest.raises(DataError):
        report_errors(raises(DataError("x")), ["--debug"])
    nested = ValueError("RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']")
    assert "no space left on the device (disk full)" in user_message(nested)
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/data/ckpt/x")
    assert user_message(wrapped).startswith("no space left on the device holding /data/ckpt/x (disk full)")


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _on_tiny_tmpfs(mountpoint: Path, size: str, script: str, timeout=600):
    """Run ``script`` (sh) with a ``size`` tmpfs mounted at ``mountpoint`` in a private mount namespace: a real full
    disk without filling this machine's (the tmpfs and its files vanish with the namespace)."""
    mountpoint.mkdir(exist_ok=True)
    sh = f"mount -t tmpfs -o size={size} tmpfs {mountpoint} && cd {ROOT} && {script}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", sh], env=_cpu_host_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged mount namespaces (unshare -rm)")
def test_full_disk_is_one_line_and_nothing_half_written(tmp_path, hf_qwen2):
    disk = tmp_path / "disk"
    src, _ = hf_qwen2(hidden_size=64, intermediate_size=256)
    py = sys.executable
    r = _on_tiny_tmpfs(disk, "200k", f"{py} -m lct_jax.convert import-hf --hf-dir {src} --out {disk}/ckpt; "
                       f"echo rc=$?; ls -A {disk}")  # fmt: skip
    assert "rc=2" in r.stdout and r.stdout.strip().endswith("rc=2"), (
        r.stdout + r.stderr[-3000:]
    )  # nothing left
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: no space left on the device holding {disk}/ckpt")
    )
    assert "Traceback" not in r.stderr

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(50)))
    train = (f"{py} -m lct_jax.train --config=configs/text_extension.py:size=tiny --workdir={disk}/w "
             f"--config.data.paths={data} --config.num_steps=4 --config.checkpoint.every=2 --config.progress=False")  # fmt: skip
    r = _on_tiny_tmpfs(disk, "1m", f"{train}; echo rc=$?; {py} -c \"import json; json.load(open('{disk}/w/config.json'))"
                       f"; json.load(open('{disk}/w/checkpoints/lct_config.json')); print('configs intact')\"; "
                       f"ls {disk}/w/checkpoints")  # fmt: skip
    out = r.stdout.splitlines()
    assert "rc=2" in out and "configs intact" in out, r.stdout + r.stderr[-3000:]
    assert (
        r.stderr.strip().splitlines()[-1].startswith(f"error: no space left on the device holding {disk}/w")
    )
    assert (
        out[-1] == "lct_config.json"
    )  # no step directory: the unfinished save stays a temporary Orbax ignores

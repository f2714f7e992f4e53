"""The convert CLI on bad input: tensors that are not finite or not floating, the dtype kept through a round trip,
and every user-caused failure as one ``error:`` line with rc 2 and nothing left at --out (full disk included)."""

import errno
import json
import pathlib

import numpy as np
import pytest
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from lct_jax.convert import checkpoint as ckpt_lib
from lct_jax.convert import safetensors_io
from lct_jax.convert.__main__ import main as convert_main
from lct_jax.convert.mapping import ConversionError
from lct_jax.convert.safetensors_io import SafetensorsDir
from lct_jax.model.longva import PRESETS as LONGVA


def _fails(argv, capsys, match, out=None):
    capsys.readouterr()  # (what the fixtures printed)
    assert convert_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    assert match in err, err
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))
    return err


def _set_tensor(src, key, fn):
    tensors = load_file(str(src / "model.safetensors"))
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(src / "model.safetensors"))


@pytest.mark.parametrize(
    "fn,match",
    [
        (
            lambda t: np.where(np.arange(t.size).reshape(t.shape) == 3, np.nan, t).astype(t.dtype),
            "holds 1 NaN/Inf",
        ),
        (lambda t: np.full_like(t, np.inf), "NaN/Inf"),
        (lambda t: (t * 100).astype(np.int32), "is int32, not a floating type"),
    ],
)
def test_import_checks_every_tensor_and_names_it(hf_qwen2, tmp_path, capsys, fn, match):
    src, _ = hf_qwen2()
    _set_tensor(src, "model.layers.1.mlp.up_proj.weight", fn)
    out = tmp_path / "ckpt"
    err = _fails(["import-hf", "--hf-dir", str(src), "--out", str(out)], capsys, match, out)
    assert "'model.layers.1.mlp.up_proj.weight' in model.safetensors" in err
    if "int32" in match:  # an explicit flag may cast; non-finite values are never accepted
        assert convert_main(["import-hf", "--hf-dir", str(src), "--out", str(out), "--allow-cast"]) == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_keeps_the_imported_dtype_by_default(hf_qwen2, tmp_path, capsys, dtype):
    src, _ = hf_qwen2(dtype=dtype)
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    assert convert_main(["import-hf", "--hf-dir", str(src), "--out", str(ckpt)]) == 0
    assert json.loads((ckpt / "lct_config.json").read_text())["source_dtype"] == dtype
    capsys.readouterr()
    assert convert_main(["export-hf", "--ckpt", str(ckpt), "--out", str(out)]) == 0  # no --dtype
    assert f"writing {dtype} tensors (the weights came in as {dtype})" in capsys.readouterr().out
    a, b = SafetensorsDir(src), SafetensorsDir(out)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():  # bit-exact round trip with default flags
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


def test_user_errors_are_one_line(hf_qwen2, tmp_path, capsys, monkeypatch):
    longva = tmp_path / "longva"  # its config is enough: the format is checked before any weight is read
    longva.mkdir()
    meta = {"kind": "longva", "config": ckpt_lib.config_to_dict(LONGVA["tiny"])}
    (longva / "lct_config.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    _fails(["export-hf", "--ckpt", str(longva), "--out", str(out), "--format", "qwen2"], capsys,
           "is a longva checkpoint; use --format longva", out)  # fmt: skip
    _fails(["export-hf", "--ckpt", str(longva), "--out", str(out), "--format", "bogus"], capsys,
           "--format 'bogus': expected one of ['longva', 'qwen2']", out)  # fmt: skip
    src, _ = hf_qwen2()
    _fails(
        ["import-hf", "--hf-dir", str(src), "--out", str(out), "--format", "bogus"],
        capsys,
        "--format 'bogus'",
        out,
    )
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    _fails(["import-hf", "--hf-dir", str(src), "--out", str(a_file)], capsys, "exists and is a file")
    assert a_file.read_text() == "mine"

    ro = tmp_path / "read_only"
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *a, **kw):  # a read-only location (as root, chmod does not stop writes)
        if ro in self.parents or self == ro:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    _fails(
        ["import-hf", "--hf-dir", str(src), "--out", str(ro / "ckpt")], capsys, "Permission denied; choose a"
    )


def test_a_bug_keeps_its_traceback(hf_qwen2, tmp_path, monkeypatch, capsys):
    src, _ = hf_qwen2()
    monkeypatch.setattr(ckpt_lib, "save_params", lambda *a: [][1])  # not the user's fault
    with pytest.raises(IndexError):
        convert_main(["import-hf", "--hf-dir", str(src), "--out", str(tmp_path / "ckpt")])
    # --debug (or LCT_DEBUG=1) shows the traceback of user errors too
    with pytest.raises(ConversionError, match="no lct_config.json"):
        convert_main(["--debug", "export-hf", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    monkeypatch.setenv("LCT_DEBUG", "1")
    with pytest.raises(ConversionError, match="no lct_config.json"):
        convert_main(["export-hf", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])


def test_full_disk_is_one_line_and_leaves_nothing(hf_qwen2, tmp_path, capsys, monkeypatch):
    src, _ = hf_qwen2()
    ckpt = tmp_path / "ckpt"
    assert convert_main(["import-hf", "--hf-dir", str(src), "--out", str(ckpt)]) == 0
    real_save = ckpt_lib.save_params

    def save_then_fill(
        path, params
    ):  # what Orbax raises when the disk fills mid-write (text from a real tmpfs)
        real_save(path, params)
        raise ValueError(f'RESOURCE_EXHAUSTED: Error writing "embed/0.0" in OCDBT database at local file "{path}/": '
                         "Failed to write 27513 bytes to file 20: No space left on device [os_error_code='28']")  # fmt: skip

    monkeypatch.setattr(ckpt_lib, "save_params", save_then_fill)
    out = tmp_path / "ckpt2"
    _fails(
        ["import-hf", "--hf-dir", str(src), "--out", str(out)],
        capsys,
        f"no space left on the device holding {out}",
        out,
    )

    def full(*a, **kw):  # what safetensors raises on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors_io, "save_file", full)
    out = tmp_path / "hf"
    _fails(["export-hf", "--ckpt", str(ckpt), "--out", str(out)], capsys, "(disk full)", out)

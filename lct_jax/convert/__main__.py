"""Checkpoint conversion CLI.

    python -m lct_jax.convert import-hf --hf-dir DIR --out CKPT_DIR [--format qwen2|longva] [--allow-cast]
    python -m lct_jax.convert export-hf --ckpt CKPT_DIR --out DIR [--format ...] [--dtype bfloat16|float32|float16]

``import-hf`` turns a Hugging Face directory into an lct_jax model checkpoint (Orbax params + lct_config.json,
tokenizer files copied along). Every tensor must be floating (float16/bfloat16/float32; ``--allow-cast`` converts
others) and finite; the dtype the weights come in is recorded (``source_dtype`` in lct_config.json).
``export-hf`` writes a directory that transformers loads with ``from_pretrained``: config.json, sharded
safetensors + index, and any tokenizer files found next to the checkpoint, in the recorded source dtype unless
``--dtype`` says otherwise (bfloat16 when nothing was recorded, e.g. a model trained from random weights); it says
which dtype it writes. It refuses a training step whose save did not finish or whose files are damaged.
Outputs are written atomically: on any error (a full disk included) nothing is left at ``--out``. A failure the
user can fix is one ``error: ...`` line and exit code 2 (``--debug`` or ``LCT_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from lct_jax.cli import report_errors, skip_absent_tpu
from lct_jax.convert import checkpoint as ckpt_lib
from lct_jax.convert.mapping import DTYPES, ConversionError
from lct_jax.convert.safetensors_io import SafetensorsDir, write_sharded

HF_CONFIG_COPY = "hf_config.json"  # the imported HF config, kept for informational fields on export
DEFAULT_EXPORT_DTYPE = "bfloat16"  # when the checkpoint records no source dtype


def _formats():
    """format name (= the checkpoint's model kind) -> (import function, export function)."""
    from lct_jax.convert import longva, qwen2

    def import_qwen2(hf_dir, allow_cast=False):
        hf_cfg = qwen2.read_hf_config(hf_dir)
        cfg, params = qwen2.hf_to_params(hf_dir, qwen2.config_from_hf(hf_cfg), allow_cast=allow_cast)
        return "qwen2", cfg, params, hf_cfg

    def export_qwen2(cfg, params, dtype, hf_extra):
        return qwen2.config_to_hf(cfg, dtype, hf_extra), qwen2.params_to_hf(cfg, params, DTYPES[dtype])

    return {"qwen2": (import_qwen2, export_qwen2), **longva.FORMATS}


def _format(fmt: str):
    formats = _formats()
    if fmt not in formats:
        raise ConversionError(f"--format {fmt!r}: expected one of {sorted(formats)}")
    return formats[fmt]


def import_hf(
    hf_dir: str, out: str, fmt: str = "qwen2", overwrite: bool = False, allow_cast: bool = False
) -> Path:
    import_fn, _ = _format(fmt)
    kind, cfg, params, hf_cfg = import_fn(hf_dir, allow_cast=allow_cast)
    source_dtype = SafetensorsDir(hf_dir).source_dtype()
    extra = ckpt_lib.tokenizer_files_near(hf_dir)
    with ckpt_lib.atomic_directory(out, overwrite=overwrite) as tmp:
        staged = tmp / "staged"
        ckpt_lib.save_model_checkpoint(
            staged, kind, cfg, params, extra_files=extra, source_dtype=source_dtype
        )
        (staged / HF_CONFIG_COPY).write_text(json.dumps(hf_cfg, indent=2) + "\n")
        for f in staged.iterdir():
            f.rename(tmp / f.name)
        staged.rmdir()
    print(
        f"imported {kind} weights stored as {source_dtype} (kept as float32 params; export-hf writes {source_dtype})"
    )
    return Path(out)


def export_hf(
    ckpt: str,
    out: str,
    fmt: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``ckpt`` as a Hugging Face directory in ``dtype`` (default: the dtype recorded at import)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    kind, cfg = ckpt_lib.read_model_config(ckpt)
    fmt = fmt or kind
    _, export_fn = _format(fmt)
    if fmt != kind:
        raise ConversionError(
            f"--format {fmt}: {ckpt} is a {kind} checkpoint; use --format {kind} (or leave --format out)"
        )
    ckpt = Path(ckpt)
    if (ckpt / "_CHECKPOINT_METADATA").exists() and not (ckpt / ckpt_lib.COMMIT_MARKER).exists():
        raise ConversionError(
            f"{ckpt} is a training step whose save did not finish (no {ckpt_lib.COMMIT_MARKER}); export a finished "
            "step"
        )
    recorded = json.loads(ckpt_lib.find_model_config(ckpt).read_text()).get("source_dtype")
    if dtype is not None:
        reason = "--dtype"
    elif recorded:
        dtype = recorded if recorded in DTYPES else "float32"  # float64 sources: the widest we write
        reason = f"the weights came in as {recorded}"
    else:
        dtype = DEFAULT_EXPORT_DTYPE
        reason = "no source dtype recorded; --dtype float32 keeps full precision"
    params = ckpt_lib.restore_params_numpy(ckpt / ckpt_lib.PARAMS_ITEM)
    hf_extra_path = ckpt / HF_CONFIG_COPY
    hf_extra = json.loads(hf_extra_path.read_text()) if hf_extra_path.exists() else None
    hf_cfg, tensors = export_fn(cfg, params, dtype, hf_extra)
    print(f"writing {dtype} tensors ({reason})")
    with ckpt_lib.atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        write_sharded(tensors, tmp, max_shard_bytes)
        for f in ckpt_lib.tokenizer_files_near(ckpt, ckpt.parent):
            shutil.copy2(f, tmp / f.name)
    return Path(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(
        prog="python -m lct_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--debug", action="store_true", help="show the traceback of every failure (also: LCT_DEBUG=1)"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("import-hf", help="Hugging Face directory -> lct_jax checkpoint")
    pi.add_argument("--hf-dir", required=True)
    pi.add_argument("--out", required=True)
    pi.add_argument("--format", default="qwen2", help="qwen2 | longva")
    pi.add_argument("--allow-cast", action="store_true", help="convert non-float16/bfloat16/float32 tensors")
    pi.add_argument("--overwrite", action="store_true")
    pe = sub.add_parser("export-hf", help="lct_jax checkpoint -> Hugging Face directory")
    pe.add_argument("--ckpt", required=True)
    pe.add_argument("--out", required=True)
    pe.add_argument("--format", default=None, help="default: the checkpoint's model kind")
    pe.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="default: the dtype recorded at import"
    )
    pe.add_argument("--max-shard-size-gb", type=float, default=5.0)
    pe.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    def convert() -> int:
        skip_absent_tpu()
        if args.cmd == "import-hf":
            out = import_hf(args.hf_dir, args.out, args.format, args.overwrite, args.allow_cast)
        else:
            out = export_hf(
                args.ckpt,
                args.out,
                args.format,
                args.dtype,
                args.overwrite,
                int(args.max_shard_size_gb * 2**30),
            )
        print(f"wrote {out}")
        return 0

    return report_errors(convert, argv)


if __name__ == "__main__":
    sys.exit(main())

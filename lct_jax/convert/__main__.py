"""Checkpoint conversion CLI.

    python -m lct_jax.convert import-hf --hf-dir DIR --out CKPT_DIR [--format qwen2]
    python -m lct_jax.convert export-hf --ckpt CKPT_DIR --out DIR [--format qwen2] [--dtype bfloat16|float32]

``import-hf`` turns a Hugging Face directory into an lct_jax model checkpoint (Orbax params + lct_config.json,
tokenizer files copied along). ``export-hf`` writes a directory that transformers loads with ``from_pretrained``:
config.json, sharded safetensors + index, and any tokenizer files found next to the checkpoint. Outputs are written
atomically: on any error nothing is left at ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from lct_jax.convert import checkpoint as ckpt_lib
from lct_jax.convert.mapping import ConversionError
from lct_jax.convert.safetensors_io import write_sharded

HF_CONFIG_COPY = "hf_config.json"  # the imported HF config, kept for informational fields on export
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}


def _formats():
    """format name -> (import function, export function)."""
    from lct_jax.convert import qwen2

    def import_qwen2(hf_dir):
        hf_cfg = qwen2.read_hf_config(hf_dir)
        cfg, params = qwen2.hf_to_params(hf_dir, qwen2.config_from_hf(hf_cfg))
        return "qwen2", cfg, params, hf_cfg

    def export_qwen2(cfg, params, dtype, hf_extra):
        return qwen2.config_to_hf(cfg, dtype, hf_extra), qwen2.params_to_hf(cfg, params, DTYPES[dtype])

    formats = {"qwen2": (import_qwen2, export_qwen2)}
    try:
        from lct_jax.convert import longva
    except ImportError:
        return formats
    formats.update(longva.FORMATS)
    return formats


def import_hf(hf_dir: str, out: str, fmt: str = "qwen2", overwrite: bool = False) -> Path:
    import_fn, _ = _formats()[fmt]
    kind, cfg, params, hf_cfg = import_fn(hf_dir)
    extra = ckpt_lib.tokenizer_files_near(hf_dir)
    with ckpt_lib.atomic_directory(out, overwrite=overwrite) as tmp:
        staged = tmp / "staged"
        ckpt_lib.save_model_checkpoint(staged, kind, cfg, params, extra_files=extra)
        (staged / HF_CONFIG_COPY).write_text(json.dumps(hf_cfg, indent=2) + "\n")
        for f in staged.iterdir():
            f.rename(tmp / f.name)
        staged.rmdir()
    return Path(out)


def export_hf(
    ckpt: str,
    out: str,
    fmt: str | None = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    kind, cfg = ckpt_lib.read_model_config(ckpt)
    fmt = fmt or kind
    formats = _formats()
    if fmt not in formats:
        raise ConversionError(f"--format {fmt!r}: expected one of {sorted(formats)}")
    ckpt = Path(ckpt)
    params = ckpt_lib.restore_params_numpy(ckpt / ckpt_lib.PARAMS_ITEM)
    hf_extra_path = ckpt / HF_CONFIG_COPY
    hf_extra = json.loads(hf_extra_path.read_text()) if hf_extra_path.exists() else None
    _, export_fn = formats[fmt]
    hf_cfg, tensors = export_fn(cfg, params, dtype, hf_extra)
    with ckpt_lib.atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        write_sharded(tensors, tmp, max_shard_bytes)
        for f in ckpt_lib.tokenizer_files_near(ckpt, ckpt.parent):
            shutil.copy2(f, tmp / f.name)
    return Path(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lct_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("import-hf", help="Hugging Face directory -> lct_jax checkpoint")
    pi.add_argument("--hf-dir", required=True)
    pi.add_argument("--out", required=True)
    pi.add_argument("--format", default="qwen2")
    pi.add_argument("--overwrite", action="store_true")
    pe = sub.add_parser("export-hf", help="lct_jax checkpoint -> Hugging Face directory")
    pe.add_argument("--ckpt", required=True)
    pe.add_argument("--out", required=True)
    pe.add_argument("--format", default=None, help="default: the checkpoint's model kind")
    pe.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    pe.add_argument("--max-shard-size-gb", type=float, default=5.0)
    pe.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.cmd == "import-hf":
            out = import_hf(args.hf_dir, args.out, args.format, args.overwrite)
        else:
            out = export_hf(
                args.ckpt,
                args.out,
                args.format,
                args.dtype,
                args.overwrite,
                int(args.max_shard_size_gb * 2**30),
            )
    except (ConversionError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

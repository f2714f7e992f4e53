"""Imports flow one way: the model never imports the data pipeline, the data pipeline never imports the model, the
training code or the evaluation (each checked in a fresh interpreter, so nothing else has imported them first)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "modules,forbidden",
    [
        (["lct_jax.model.longva", "lct_jax.model.clip"], ["lct_jax.data"]),
        (["lct_jax.data.multimodal", "lct_jax.data.video", "lct_jax.data.unires"],
         ["lct_jax.model", "lct_jax.train", "lct_jax.eval"]),
    ],
)  # fmt: skip
def test_import_direction(modules, forbidden):
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({tuple(forbidden)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{modules} import {out.stdout.strip()}"

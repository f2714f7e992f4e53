"""Tiny evaluation fixtures: a random LongVA checkpoint, a haystack it encoded, needle images."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lct_jax.convert.checkpoint import save_model_checkpoint
from lct_jax.eval.encode import FrameEncoder
from lct_jax.eval.store import EmbeddingStore
from lct_jax.model.longva import PRESETS
from lct_jax.testing.models import random_model

NEEDLES = [((220, 30, 30), "What color is the square?", "red"), ((30, 60, 220), "What color?", "blue")]


def write_haystack(path, model, checkpoint, n_frames=12, seed=0) -> EmbeddingStore:
    """Random frames encoded by ``model`` into a store whose meta names ``checkpoint`` as the encoder."""
    tile = model.cfg.tile
    frames = np.random.default_rng(seed).integers(0, 256, (n_frames, tile, tile, 3), dtype=np.uint8)
    tokens = FrameEncoder(model, batch_size=4)(frames)
    store = EmbeddingStore.create(
        path,
        shape=tokens.shape,
        dtype=str(tokens.dtype),
        chunk_frames=4,
        meta={"checkpoint": str(checkpoint)},
    )
    for i in range(0, n_frames, 4):
        store.write(i, tokens[i : i + 4])
    return store


def write_needles(directory) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    items = []
    for i, (color, question, answer) in enumerate(NEEDLES):
        Image.new("RGB", (40, 24), color).save(directory / f"needle{i}.png")
        items.append({"image": f"needle{i}.png", "question": question, "answer": answer})
    (directory / "needles.json").write_text(json.dumps(items))
    return directory / "needles.json"


@pytest.fixture(scope="session")
def tiny_vniah(tmp_path_factory):
    """{'ckpt', 'haystack', 'needles', 'model'}: a random tiny LongVA (fp32) checkpoint, a 12-frame haystack it
    encoded and two needles."""
    root = tmp_path_factory.mktemp("tiny_vniah")
    cfg = PRESETS["tiny"].replace(dtype="float32")
    model, params = random_model("longva", cfg)
    ckpt = save_model_checkpoint(root / "ckpt", "longva", cfg, params).absolute()
    write_haystack(root / "haystack", model, ckpt)
    return {
        "ckpt": ckpt,
        "haystack": root / "haystack",
        "needles": write_needles(root / "needles"),
        "model": model,
    }

"""Resume: stop after k batches, checkpoint (Orbax composite), restore in a NEW process: the next 20 batches equal
those of an uninterrupted run, with 0 and with 2 worker processes. Also the packer states in-process."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lct_jax.data.loader import PipelineOptions, multimodal_dataset, text_dataset
from lct_jax.data.multimodal import MultimodalDataConfig
from lct_jax.data.text import TextDataConfig

CHILD = os.path.join(os.path.dirname(__file__), "resume_child.py")
K, N = 7, 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(60):  # a few empty documents: their skip counts must resume too
            f.write(
                json.dumps({"text": "" if i % 13 == 5 else f"<{i}>" + "z" * int(rng.integers(1, 50))}) + "\n"
            )
    return str(path)


def _cfg(corpus, workers):
    # 2 epochs' worth of rows is consumed (reshuffled per epoch); seq 2 -> zigzag on
    opts = PipelineOptions(batch_size=2, seed=5, num_workers=workers, seq_shards=2)
    return TextDataConfig(seq_len=24, paths=(corpus,), per_document=True, options=opts)


def _run(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, CHILD, *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_in_new_process(corpus, tmp_path, workers):
    cfg = _cfg(corpus, workers)
    it = iter(text_dataset(cfg))
    want = [next(it) for _ in range(K + N)]
    want_counts = it.counts()
    it.close()
    assert not np.array_equal(want[0]["inputs"], want[K]["inputs"])  # a restore that did nothing would fail
    cfg_json = json.dumps(dataclasses.asdict(cfg))
    _run("save", cfg_json, tmp_path / "ckpt", K, N, tmp_path / "out.npz")
    _run("restore", cfg_json, tmp_path / "ckpt", K, N, tmp_path / "out.npz")
    got = np.load(tmp_path / "out.npz")
    for i in range(N):
        for k, v in want[K + i].items():
            np.testing.assert_array_equal(got[f"{i}/{k}"], v, err_msg=f"batch {K + i} field {k}")
    assert json.loads(str(got["counts"])) == want_counts  # skip counts resume too
    assert want_counts["skipped/empty_document"] > 0


def test_multimodal_packer_state_roundtrip(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((20 + 10 * i, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    recs = [
        {"image": f"{i % 3}.png", "conversations": [{"from": "human", "value": "<image>" + "q" * (i % 5)},
                                                    {"from": "gpt", "value": "a" * (1 + i % 7)}]}
        for i in range(30)
    ]  # fmt: skip
    recs[4]["image"] = "missing.png"
    (tmp_path / "d.json").write_text(json.dumps(recs))
    opts = PipelineOptions(batch_size=2, seed=1)
    cfg = MultimodalDataConfig(annotations=str(tmp_path / "d.json"), image_root=str(tmp_path), template="plain",
                               image_mode="crop", tile=28, tokens_per_tile=4, max_len=40, max_tiles=3, pack=True,
                               options=opts)  # fmt: skip
    it = iter(multimodal_dataset(cfg))
    want = [next(it) for _ in range(3 + 10)]
    it2 = iter(multimodal_dataset(cfg))
    for _ in range(3):
        next(it2)
    state = json.loads(json.dumps(it2.get_state()))
    it3 = iter(multimodal_dataset(cfg))
    it3.set_state(state)
    for w in want[3:]:
        g = next(it3)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k], err_msg=k)
    assert it3.counts()["skipped/missing_image"] == it.counts()["skipped/missing_image"] >= 1
    assert max(int(w["segment_ids"].max()) for w in want) > 1  # rows really were packed

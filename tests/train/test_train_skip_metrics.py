"""Bad records skipped by the data pipeline show up, counted, in the training metrics and TensorBoard events."""

import json

import jax
from test_train_checkpoint import OPTIM, _run, _setup  # sibling test module (its directory is on sys.path)

from lct_jax.data.loader import PipelineOptions, text_dataset
from lct_jax.data.text import TextDataConfig
from lct_jax.sharding import make_mesh
from lct_jax.testing.events import read_scalars
from lct_jax.train.metrics import EventWriter
from lct_jax.train.state import init_state
from lct_jax.train.step import StepConfig, jit_train_step


def test_skip_counts_reach_training_metrics(tmp_path):
    docs = []
    for i in range(40):
        docs.append({"text": f"document number {i} with some words in it"})
        if i % 4 == 0:
            docs.append({"text": ""})  # empty: skipped and counted, never trained on
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = TextDataConfig(seq_len=16, paths=(str(path),), options=PipelineOptions(batch_size=4, shuffle=False))
    it = iter(text_dataset(cfg))

    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    spec, mk, _, _ = _setup(mesh)
    first = next(iter(text_dataset(cfg)))
    step = jit_train_step(
        spec, OPTIM, StepConfig(), {k: v for k, v in first.items() if not k.startswith("_")}
    )
    writer = EventWriter(tmp_path / "tb")
    res = _run(spec, init_state(spec, mk, OPTIM), step, it, 6, writer=writer)
    writer.close()

    counts = [m["skipped/empty_document"] for m in res.history]
    assert counts == sorted(counts) and counts[-1] >= 1, counts  # cumulative, and some were seen
    assert counts[-1] == it.counts()["skipped/empty_document"]
    logged = read_scalars(tmp_path / "tb")["skipped/empty_document"]
    assert logged == {i + 1: float(c) for i, c in enumerate(counts)}

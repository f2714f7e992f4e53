"""Elastic resume of the data stream (loader.elastic_state): states saved under one sharding restart a pipeline
with another exactly where the documented semantics say, checked against an independent model of the stream.

The model: the global stream is epoch after epoch of grain's shuffled order of the record ids (``MapDataset.range``
shuffled with the same seed); shard i of n reads every n-th position from i; worker w of W reads every W-th of
those. Which records a pipeline read is recovered by decoding its rows (every document starts with its id).
"""

import itertools
import json
import re

import grain
import numpy as np
import pytest

from lct_jax.data.loader import PipelineOptions, elastic_state, restore_saved_state, text_dataset
from lct_jax.data.text import TextDataConfig

RECORDS, SEED, BOS = 40, 7, 256  # byte tokenizer: BOS = pad = 256


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("elastic") / "docs.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(RECORDS):  # lengths 5..60: shards drift apart by a few records
            f.write(json.dumps({"text": f"<{i}>" + "z" * int(rng.integers(1, 55))}) + "\n")
    return str(path)


def _iter(corpus, shard, count, workers=0):
    opts = PipelineOptions(batch_size=2, seed=SEED, shard_index=shard, shard_count=count, num_workers=workers)
    return iter(text_dataset(TextDataConfig(seq_len=24, paths=(corpus,), options=opts)))


def _positions(shard, count, worker=0, workers=0, epochs=4):
    """Global stream positions one reader visits, in order (the independent model)."""
    mine = [e * RECORDS + k for e in range(epochs) for k in range(shard, RECORDS, count)]
    return mine[worker :: max(workers, 1)]


_ORDER = grain.MapDataset.range(RECORDS).shuffle(seed=SEED)


def _record(g):
    return int(_ORDER[g])  # grain reshuffles each epoch: index g of the repeated stream


def _started(batches):
    """Record ids of the documents started in these rows, in order (the last one possibly unfinished)."""
    stream = np.concatenate([row for b in batches for row in b["inputs"]] + [batches[-1]["targets"][-1][-1:]])
    assert stream[0] == BOS  # a (fresh) reader starts with a document
    pieces = bytes(int(t) if t < 256 else ord("|") for t in stream).split(b"|")[1:]
    ids = [re.match(rb"<(\d+)>", p) for p in pieces]
    return [int(m.group(1)) if m else None for m in ids]  # None: the marker itself is cut off at the end


def _assert_reads(started, positions):
    """The documents a reader started are the records at its stream positions, in order."""
    want = [_record(g) for g in positions[: len(started)]]
    assert len(started) >= 3 and None not in started[:-1]  # only the last marker can be cut off
    assert all(s in (None, r) for s, r in zip(started, want, strict=True)), (started, want)


@pytest.mark.parametrize(
    "old,new",
    [((2, 0), (1, 0)), ((1, 2), (3, 0)), ((2, 0), (1, 2))],
    ids=["2shards->1", "1shard_2workers->3shards", "2shards->1shard_2workers"],
)
def test_elastic_resume_restarts_at_the_earliest_unfinished_record(corpus, old, new):
    (n_old, w_old), (n_new, w_new) = old, new
    k_old, k_new = 6, 8  # batches before the checkpoint (per old shard), after it (per new shard)
    saved, frontier, read_full = [], [], []
    for i in range(n_old):
        it = _iter(corpus, i, n_old, w_old)
        got = [next(it) for _ in range(k_old)]
        saved.append(it.get_state())
        it.close()
        for w in range(max(w_old, 1)):
            mine = got[w :: max(w_old, 1)]  # grain interleaves the workers' batches in turn
            started = _started(mine)
            pos = _positions(i, n_old, w, w_old)
            _assert_reads(started, pos)
            frontier.append(pos[len(started) - 1])  # the last document started may be unfinished
            read_full += pos[: len(started) - 1]
    saved.append(json.loads(json.dumps(saved[0])))  # a second process sharing shard 0 saved the same state
    resume_at = min(frontier)
    for j in range(n_new):
        it = _iter(corpus, j, n_new, w_new)
        state, report = elastic_state(saved, it.get_state())
        assert report.resume_at == resume_at
        assert report.read_again == sum(g >= resume_at for g in read_full)
        it.set_state(state)
        got = [next(it) for _ in range(k_new)]
        it.close()
        for w in range(max(w_new, 1)):
            started = _started(got[w :: max(w_new, 1)])
            _assert_reads(started, [g for g in _positions(j, n_new, w, w_new) if g >= resume_at])
    print(report.message)
    assert "nothing is skipped" in report.message and f"{report.read_again} records" in report.message


def test_elastic_state_refuses_other_data_and_incomplete_checkpoints(corpus):
    it = _iter(corpus, 0, 2)
    next(it)
    state = it.get_state()
    fresh = _iter(corpus, 0, 1).get_state()
    with pytest.raises(ValueError, match="shards \\[0\\] of \\[2\\]"):
        elastic_state([state], fresh)  # shard 1's state is missing
    other = dict(state, layout=dict(state["layout"], records=RECORDS + 1))
    with pytest.raises(ValueError, match="the data changed"):
        elastic_state([other, _iter(corpus, 1, 2).get_state()], fresh)
    with pytest.raises(ValueError, match="elastic_state"):
        _iter(corpus, 0, 1).set_state(state)  # a plain set_state never silently takes another layout


def test_positions_model_matches_stream_layout():
    from lct_jax.data.loader import StreamLayout

    for n, w in itertools.product((1, 3), (0, 2)):
        for i in range(n):
            lay = StreamLayout(RECORDS, i, n, w, SEED, None)
            for worker in range(max(w, 1)):
                pos = _positions(i, n, worker, w)
                assert [lay.global_position(worker, q) for q in range(len(pos))] == pos
                assert all(pos[lay.first_at_or_after(worker, g)] >= g for g in range(0, 100, 7))


def test_restore_saved_state_is_exact_when_only_the_process_count_changed(corpus, tmp_path):
    """2 processes that shared data shard 0 of 1 (seq across hosts) -> 1 process: the same layout, so exact."""
    it = _iter(corpus, 0, 1)
    want = [next(it) for _ in range(9)]
    for p in range(2):  # what grain's Orbax handler writes, one file per process
        other = _iter(corpus, 0, 1)
        for _ in range(4):
            next(other)
        (tmp_path / f"process_{p}-of-2.json").write_text(json.dumps(other.get_state()))
    fresh = _iter(corpus, 0, 1)
    assert restore_saved_state(fresh, tmp_path) is None  # no elastic report: exact
    for w in want[4:]:
        np.testing.assert_array_equal(next(fresh)["inputs"], w["inputs"])
    split = _iter(corpus, 1, 2)
    report = restore_saved_state(split, tmp_path)  # another sharding: elastic, with its report
    assert report is not None and "data shards x workers 1x0 -> 2x0" in report.message

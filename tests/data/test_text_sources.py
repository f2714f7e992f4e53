"""Stage-0 sources other than JSON-lines (ArrayRecord text/tokens, tfds) and skip counting at the loader level."""

import json

import numpy as np
import pytest

from lct_jax.data.loader import PipelineOptions, text_dataset
from lct_jax.data.skips import BadRecord
from lct_jax.data.text import TextDataConfig

BOS = 256  # byte tokenizer


def _stream(batches):
    """Rebuild the token stream of one unshuffled shard (rows share one boundary token)."""
    rows = [
        (b["inputs"][r], b["targets"][r], b["loss_mask"][r]) for b in batches for r in range(len(b["inputs"]))
    ]
    return [int(i) for inp, _, m in rows for i in inp[m > 0]] + [int(rows[-1][1][rows[-1][2] > 0][-1])]


def _opts(**kw):
    return PipelineOptions(**{"batch_size": 2, "num_epochs": 1, "shuffle": False, **kw})


def test_array_record_text_and_tokens(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    docs = [[5, 6, 7], [], [8, 9], [10] * 20]
    w = ArrayRecordWriter(str(tmp_path / "t.array_record"), "group_size:1")
    for d in docs:
        w.write(np.asarray(d, "<i4").tobytes())
    w.close()
    cfg = TextDataConfig(seq_len=8, source="array_record", paths=(str(tmp_path / "t.array_record"),),
                         record_format="tokens", options=_opts())  # fmt: skip
    it = iter(text_dataset(cfg))
    assert _stream(list(it)) == [BOS, 5, 6, 7, BOS, 8, 9, BOS] + [10] * 20
    assert it.counts()["skipped/empty_document"] == 1

    w = ArrayRecordWriter(str(tmp_path / "j.array_record"), "group_size:1")
    for rec in [b'{"text": "ab"}', b"not json", b'{"text": "cd"}']:
        w.write(rec)
    w.close()
    cfg = TextDataConfig(
        seq_len=4, source="array_record", paths=(str(tmp_path / "j.array_record"),), options=_opts()
    )
    it = iter(text_dataset(cfg))
    assert _stream(list(it)) == [BOS, 97, 98, BOS, 99, 100]
    assert it.counts()["skipped/bad_record"] == 1


def test_tfds_data_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from tfds_tiny import TinyText

    TinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig()
    )
    cfg = TextDataConfig(
        seq_len=16, source="tfds", tfds_name="tiny_text", data_dir=str(tmp_path), options=_opts()
    )
    it = iter(text_dataset(cfg))
    text = bytes(i if i != BOS else ord("|") for i in _stream(list(it))).decode()
    assert sorted(text.split("|")[1:]) == sorted(f"<{i:02d}>" + "t" * i for i in range(12) if i != 3)
    assert it.counts()["skipped/empty_document"] == 1


def test_empty_documents_counted_run_goes_on_and_strict(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": t}) for t in ["aa", "", "bb", "", "", "cc"]]
    path.write_text("\n".join(lines[:3] + ["{broken"] + lines[3:]) + "\n")
    it = iter(text_dataset(TextDataConfig(seq_len=4, paths=(str(path),), options=_opts())))
    assert _stream(list(it)) == [BOS, 97, 97, BOS, 98, 98, BOS, 99, 99]
    c = it.counts()
    assert c["skipped/empty_document"] == 3 and c["skipped/bad_record"] == 1
    with pytest.raises(BadRecord, match="empty_document"):
        list(text_dataset(TextDataConfig(seq_len=4, paths=(str(path),), options=_opts(strict=True))))

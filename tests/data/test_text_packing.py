"""Stage-0 packing: the literal worked example, an independent list-based reference, zigzag, multi-host shards."""

import json

import grain
import jax
import numpy as np
import pytest

from lct_jax.data.loader import PipelineOptions, global_batch, text_dataset, zigzag_batch
from lct_jax.data.skips import RecordReader
from lct_jax.data.text import TEXT_SKIPS, JsonlSource, PackTextIterDataset, TextDataConfig, TokenizeDocument
from lct_jax.data.tokenizer import ByteTokenizer
from lct_jax.sharding import make_mesh

TOK = ByteTokenizer()


def _rows(docs, seq_len, per_document=False, drop_remainder=False):
    read = RecordReader(docs, TokenizeDocument(TOK, record_format="text"), TEXT_SKIPS, 1 << 20)
    ds = grain.MapDataset.range(len(docs)).map(read)
    rows = list(PackTextIterDataset(ds.to_iter_dataset(), seq_len, TOK.bos_id, TOK.pad_id, per_document,
                                    drop_remainder))  # fmt: skip
    # an empty row carries the skips after the last row; fold them into it, as the loader does
    if len(rows) > 1 and not rows[-1]["segment_ids"].any():
        tail = rows.pop()
        rows[-1]["_skips"] = rows[-1]["_skips"] + tail["_skips"]
    return rows


def _show(ids):
    return " ".join("B" if i == TOK.bos_id else chr(i) for i in ids)


def test_worked_example_literal():
    rows = _rows(["abc", "de", "", "fghijklmnop"], 8)
    assert len(rows) == 3
    r0, r1, r2 = rows
    assert _show(r0["inputs"]) == "B a b c B d e B"
    assert _show(r0["targets"]) == "a b c B d e B f"
    assert _show(r1["inputs"]) == "f g h i j k l m"
    assert _show(r1["targets"]) == "g h i j k l m n"
    assert _show(r2["inputs"]) == "n o B B B B B B"  # pad id is <|endoftext|> too
    assert _show(r2["targets"]) == "o p B B B B B B"
    for r in (r0, r1):
        assert r["positions"].tolist() == list(range(8))
        assert r["loss_mask"].tolist() == [1.0] * 8 and r["segment_ids"].tolist() == [1] * 8
    assert r2["positions"].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    assert r2["loss_mask"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert r2["segment_ids"].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert r0["_skips"][0] == 1 and r0["_skips"].sum() == 1  # the empty document
    assert len(_rows(["abc", "de", "", "fghijklmnop"], 8, drop_remainder=True)) == 2

    d0, d1, _ = _rows(["abc", "de", "", "fghijklmnop"], 8, per_document=True)
    assert d0["segment_ids"].tolist() == [1, 1, 1, 1, 2, 2, 2, 3]
    assert d0["positions"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert d1["segment_ids"].tolist() == [1] * 8 and d1["positions"].tolist() == list(range(8))
    assert d0["loss_mask"].tolist() == [1.0] * 8


def test_packing_matches_list_reference():
    rng = np.random.default_rng(0)
    docs = ["".join(chr(97 + c) for c in rng.integers(0, 26, n)) for n in rng.integers(0, 40, 60)]
    L = 16
    stream = []  # independent reference: BOS + document, end to end; row k = stream[kL : kL + L + 1]
    for d in docs:
        if d:
            stream += [TOK.bos_id] + list(d.encode())
    rows = _rows(docs, L, per_document=True)
    assert len(rows) == -(-(len(stream) - 1) // L)
    for k, r in enumerate(rows):
        win = stream[k * L : k * L + L + 1]
        n = len(win) - 1
        assert r["inputs"][:n].tolist() == win[:-1] and r["targets"][:n].tolist() == win[1:]
        assert r["loss_mask"].sum() == n and (r["segment_ids"][n:] == 0).all()
        # per-document positions: distance to the last BOS (or to the row start)
        for t in range(n):
            starts = [s for s in range(t + 1) if win[s] == TOK.bos_id] or [0]
            assert r["positions"][t] == t - starts[-1]
            assert r["segment_ids"][t] == max(
                1, sum(win[s] == TOK.bos_id for s in range(t + 1)) + (win[0] != TOK.bos_id)
            )
    assert sum(int(r["_skips"].sum()) for r in rows) == sum(1 for d in docs if not d)


@pytest.fixture()
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"<{i:02d}>" + "x" * (i % 7)}) + "\n")
    return str(path)


def _doc_ids(batches):
    """Document numbers in packed batches of one shard, in order: rebuild the token stream (rows share one
    boundary token, so the real inputs of consecutive rows plus the final target are the stream) and parse it."""
    rows = [
        (r, m)
        for b in batches
        for r, m in zip(zip(b["inputs"], b["targets"], strict=True), b["loss_mask"], strict=False)
    ]
    stream = [int(i) for (inp, _), m in rows for i in inp[m > 0]] + [int(rows[-1][0][1][rows[-1][1] > 0][-1])]
    docs = bytes(i if i != TOK.bos_id else ord("|") for i in stream).decode().split("|")
    assert docs[0] == ""
    return [int(d[1:3]) for d in docs[1:]]


def test_jsonl_source_reads_records(jsonl):
    src = JsonlSource([jsonl])
    assert len(src) == 40 and json.loads(src[7])["text"] == "<07>" + "x" * 0


@pytest.mark.parametrize("count", [2, 4])
def test_multihost_shards_cover_epoch_without_overlap(jsonl, count):
    seen = []
    for i in range(count):
        opts = PipelineOptions(batch_size=2, num_epochs=1, shard_index=i, shard_count=count, seed=3)
        seen.append(_doc_ids(list(text_dataset(TextDataConfig(seq_len=32, paths=(jsonl,), options=opts)))))
    flat = [d for s in seen for d in s]
    assert sorted(flat) == list(range(40)), "union of shards must be the whole epoch, each document once"
    assert all(len(s) in (40 // count, 40 // count + 1) for s in seen)


def test_zigzag_permute_unpermute_identity_fields_move_together(jsonl):
    def first_batch(w, seq_len=32):
        opts = PipelineOptions(batch_size=2, seq_shards=w)
        return next(iter(text_dataset(TextDataConfig(seq_len=seq_len, paths=(jsonl,), per_document=True,
                                                     options=opts))))  # fmt: skip

    plain, zz = first_batch(1), first_batch(2)
    assert set(zz) == set(plain)
    perm = np.array([*range(0, 8), *range(24, 32), *range(8, 16), *range(16, 24)])  # chunks 0 3 | 1 2
    for k in plain:  # every per-token field went through the same permutation
        assert not np.array_equal(zz[k], plain[k]) or len(np.unique(plain[k])) == 1, k
        np.testing.assert_array_equal(zz[k], plain[k][:, perm], err_msg=k)
        np.testing.assert_array_equal(zigzag_batch(zz, 2, inverse=True)[k], plain[k], err_msg=k)
        np.testing.assert_array_equal(zigzag_batch(zigzag_batch(plain, 4), 4, inverse=True)[k], plain[k])
    assert first_batch(2, seq_len=30)["inputs"].shape == (2, 32)  # rounded up to a multiple of 2 * seq


def test_global_batch_on_mesh(jsonl):
    mesh = make_mesh(data=2, seq=2, model=2)
    b = next(
        iter(text_dataset(TextDataConfig(seq_len=32, paths=(jsonl,), options=PipelineOptions(batch_size=4))))
    )
    g = global_batch(b, mesh)
    assert g["inputs"].shape == (4, 32) and g["inputs"].sharding.spec == jax.sharding.PartitionSpec(
        "data", "seq"
    )
    for k in b:
        np.testing.assert_array_equal(np.asarray(g[k]), b[k])


def test_mesh_data_shard_simulated_hosts():
    from lct_jax.data.loader import mesh_data_shard

    # 8 devices as 4 simulated hosts of 2; data=2 x seq=4: hosts 0,1 hold data row 0, hosts 2,3 row 1
    mesh = make_mesh(data=2, seq=4, model=1)
    host = {d: i // 2 for i, d in enumerate(mesh.devices.reshape(-1))}
    got = [mesh_data_shard(mesh, p, host.get) for p in range(4)]
    assert got == [(0, 2), (0, 2), (1, 2), (1, 2)]  # hosts sharing rows read the same shard
    mesh = make_mesh(data=4, seq=2, model=1)
    host = {d: i // 2 for i, d in enumerate(mesh.devices.reshape(-1))}
    assert [mesh_data_shard(mesh, p, host.get) for p in range(4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    host = {
        d: [0, 0, 0, 1, 1, 2, 2, 2][i] for i, d in enumerate(mesh.devices.reshape(-1))
    }  # hosts straddle rows
    with pytest.raises(ValueError, match="overlapping"):
        mesh_data_shard(mesh, 0, host.get)

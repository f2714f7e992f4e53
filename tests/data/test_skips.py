"""Bad records through the real pipelines: bounded failure with the likely cause, skips named by their source
record, rate-limited logs without read-ahead duplicates, and randomly malformed records (hypothesis)."""

import dataclasses
import json
import logging
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lct_jax.data.loader import PipelineOptions, multimodal_dataset, text_dataset
from lct_jax.data.multimodal import MultimodalDataConfig
from lct_jax.data.skips import SkipGuard, Skipped, SkipPolicy
from lct_jax.data.text import TextDataConfig
from lct_jax.data.tokenizer import load_tokenizer, piece_cuts
from lct_jax.errors import DataError


def _jsonl(path, records):
    with open(path, "wb") as f:
        for r in records:
            f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")
    return str(path)


def _first_or_error(it, seconds=60):
    """``next(it)``, or the exception it raised; fails if it neither returns nor raises within ``seconds``."""
    out = {}

    def target():
        try:
            out["value"] = next(it)
        except Exception as e:  # noqa: BLE001
            out["value"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"the pipeline neither yielded nor failed within {seconds} s (a hang)"
    return out["value"]


def _text_cfg(path, **opts):
    return TextDataConfig(seq_len=32, paths=(str(path),), options=PipelineOptions(batch_size=2, **opts))


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 60 * i, np.uint8)).save(root / f"{i}.png")
    return root


def _mm_cfg(ann, root, **opts):
    return MultimodalDataConfig(annotations=str(ann), image_root=str(root), template="plain", image_mode="crop",
                                tile=28, tokens_per_tile=2, max_len=64, max_tiles=2,
                                options=PipelineOptions(batch_size=1, **opts))  # fmt: skip


def _conv(q="<image>\nq", a="an answer"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


# ---------------------------------------------------------------------------------------- bounded failure


def test_wrong_field_stops_with_the_field_and_file(tmp_path):
    path = _jsonl(tmp_path / "docs.jsonl", [{"text": f"document {i}"} for i in range(300)])
    cfg = dataclasses.replace(_text_cfg(path), field="txt")  # repeats forever: used to skip forever
    err = _first_or_error(iter(text_dataset(cfg)))
    assert isinstance(err, DataError), err
    msg = str(err)
    assert "all 300 records of an epoch in a row were skipped" in msg and "bad_record 300" in msg
    assert "config.data.field='txt'" in msg and "['text']" in msg and f"{path}:" in msg


def test_wrong_image_root_stops_with_the_root(tmp_path, images):
    ann = _jsonl(
        tmp_path / "ann.jsonl", [{"image": f"{i % 3}.png", "conversations": _conv()} for i in range(40)]
    )
    assert next(iter(multimodal_dataset(_mm_cfg(ann, images))))["pixel_mask"].any()  # the right root works
    err = _first_or_error(iter(multimodal_dataset(_mm_cfg(ann, tmp_path / "elsewhere"))))
    assert isinstance(err, DataError), err
    assert "missing_image 40" in str(err) and f"config.data.image_root='{tmp_path / 'elsewhere'}'" in str(err)


def test_file_without_usable_record_stops_also_from_a_worker_process(tmp_path):
    path = _jsonl(tmp_path / "empty_docs.jsonl", [{"text": ""}] * 50)
    err = _first_or_error(iter(text_dataset(_text_cfg(path, num_workers=1))), seconds=120)
    assert isinstance(err, DataError), err  # raised in the worker, reaches the main process as itself
    assert "empty_document 50" in str(err)


@pytest.mark.parametrize("bad_every,stops", [(5, False), (2, True)])  # 20% and 50%+ of the records bad
def test_skip_fraction_over_a_window(tmp_path, bad_every, stops):
    docs = [{"text": "" if i % bad_every == 0 else f"doc {i}"} for i in range(400)]
    cfg = _text_cfg(_jsonl(tmp_path / "d.jsonl", docs), skip_window=50, max_skip_fraction=0.4)
    it = iter(text_dataset(cfg))
    if stops:
        with pytest.raises(DataError, match=r"of the last 50 records were skipped"):
            for _ in range(500):
                next(it)
    else:
        for _ in range(200):  # several epochs' worth
            next(it)
        assert it.counts()["skipped/empty_document"] > 100


# ------------------------------------------------------------------------------ naming and rate limiting


def test_skips_name_the_source_line_not_the_shuffled_index(tmp_path, caplog):
    lines = [{"text": f"doc {i}"} if i % 4 else {"body": "no text field"} for i in range(200)]
    path = _jsonl(tmp_path / "docs.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="lct_jax.data"):
        it = iter(text_dataset(_text_cfg(path, num_epochs=1, seed=3)))
        rows = list(it)
    assert rows and it.counts()["skipped/bad_record"] == 50  # every bad record counted once
    named = [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("skipping ")]
    assert len(named) == 10  # the first 10 one by one, then summaries (every 60 s)
    numbers = [int(w.rsplit(":", 1)[1]) for w in named]
    assert all(w.rsplit(":", 1)[0] == path for w in named)
    assert all(n % 4 == 1 for n in numbers)  # 1-based line numbers of bad lines (line 1 = record 0)
    assert numbers != sorted(numbers)  # shuffled order, but each names its own line
    assert sum("summarized every" in r.getMessage() for r in caplog.records) == 1


def test_read_ahead_does_not_multiply_warnings(tmp_path, caplog):
    lines = [{"text": f"doc {i} " + "x" * 20} if i % 10 else {"text": ""} for i in range(40)]
    with caplog.at_level(logging.WARNING, logger="lct_jax.data"):
        it = iter(text_dataset(_text_cfg(_jsonl(tmp_path / "d.jsonl", lines))))  # repeats; reads ahead 500
        for _ in range(3):
            next(it)
    warned = sum(r.getMessage().startswith("skipping ") for r in caplog.records)
    assert 1 <= it.counts()["skipped/empty_document"] == warned < 10


def test_guard_logs_first_ones_then_one_summary_per_interval(caplog):
    now = [0.0]
    guard = SkipGuard(SkipPolicy(log_first=3, log_every_s=60.0), clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="lct_jax.data"):
        for i in range(20):
            now[0] = float(i)  # one skip a second
            guard.skipped(Skipped("bad_record", "bad", f"f.jsonl:{i + 1}"))
        now[0] = 70.0
        guard.skipped(Skipped("empty_document", "empty", "f.jsonl:99"))
    msgs = [r.getMessage() for r in caplog.records]
    assert [m.split()[1] for m in msgs if m.startswith("skipping")] == ["f.jsonl:1", "f.jsonl:2", "f.jsonl:3"]
    (summary,) = [m for m in msgs if m.startswith("skipped ")]
    assert summary.startswith("skipped 18 more records in the last 68 s (bad_record 17, empty_document 1)")
    assert "f.jsonl:99" in summary and len(msgs) == 5


# ------------------------------------------------------------------------------ records that used to escape


def test_wrongly_typed_fields_are_counted_skips(tmp_path, images):
    recs = [
        {"image": 5, "conversations": _conv()},  # used to be a TypeError in PrepareSample.prepare
        {"image": "0.png", "conversations": [{"from": ["human"], "value": "<image>"}, {"from": "gpt", "value": "a"}]},
        {"image": "0.png", "video": 3, "conversations": _conv()},
        {"image": "1.png", "conversations": _conv()},
    ]  # fmt: skip
    it = iter(
        multimodal_dataset(_mm_cfg(_jsonl(tmp_path / "a.jsonl", recs), images, num_epochs=1, shuffle=False))
    )
    assert len(list(it)) == 1
    c = it.counts()
    assert c["skipped/bad_record"] == 2 and c["skipped/bad_conversation"] == 1
    docs = [b"\x00\x01\x02", b"[" * 100_000, b'{"text": ' + b"9" * 5000 + b"}", b'{"text": "ok"}']
    it = iter(text_dataset(_text_cfg(_jsonl(tmp_path / "t.jsonl", docs), num_epochs=1, shuffle=False)))
    assert len(list(it)) == 1 and it.counts()["skipped/bad_record"] == 3


def test_record_over_the_size_cap_is_skipped_before_parsing(tmp_path):
    docs = [{"text": "a" * 5000}, {"text": "short"}]
    it = iter(
        text_dataset(_text_cfg(_jsonl(tmp_path / "d.jsonl", docs), num_epochs=1, max_record_bytes=4096))
    )
    assert len(list(it)) == 1 and it.counts()["skipped/too_long"] == 1


def test_text_stage_reports_only_its_own_skip_reasons(tmp_path):
    it = iter(text_dataset(_text_cfg(_jsonl(tmp_path / "d.jsonl", [{"text": "abc"}]))))
    next(it)
    assert sorted(k for k in it.counts() if k.startswith("skipped/")) == [
        "skipped/bad_record", "skipped/empty_document", "skipped/too_long"
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["byte", "qwen"])
def test_long_text_encodes_in_pieces_to_the_same_ids(name):
    tok = load_tokenizer(name)
    rng = np.random.default_rng(0)
    words = [
        "the",
        "Cat",
        "naïve",
        "日本語",
        "x1",
        "3.14",
        "<|endoftext|>",
        "don't",
        "\n\n",
        "  ",
        "!?",
        "a-b",
    ]
    text = " ".join(rng.choice(words, 3000))
    whole = np.asarray(tok.encode(text), np.int32)
    cuts = piece_cuts(text, 256)
    assert len(cuts) > 50 and max(np.diff([0, *cuts, len(text)])) <= 256
    if name == "qwen":
        tok.piece_chars = 256
    np.testing.assert_array_equal(tok.encode_array(text), whole)
    bounds = [0, *cuts, len(text)]
    pieces = np.concatenate([tok.encode(text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)])
    np.testing.assert_array_equal(pieces, whole)  # the cut points themselves are exact, for both tokenizers


# ------------------------------------------------------------------------------ randomly malformed records

NOT_STR = st.one_of(
    st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
    st.lists(st.integers(), min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2),
)  # fmt: skip
HUGE = st.just("x" * 3000)  # over the size caps below as a field of a record
JUNK = st.one_of(st.none(), NOT_STR, st.just(""), HUGE)
BAD_BYTES = st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b)
DEEP = st.sampled_from([1500, 20_000]).map(lambda n: b"[" * n + b"]" * n)  # too deep to parse, or too long


def _good_text(b: bytes) -> bool:
    try:
        obj = json.loads(b)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"] != ""


def _dumps(r):
    return r if isinstance(r, bytes) else json.dumps(r).encode()


GOOD_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\n\r"), min_size=1, max_size=60).map(
    lambda t: {"text": t}
)
BAD_TEXT = st.one_of(
    st.one_of(st.none(), NOT_STR).map(lambda v: {"text": v}),  # the field holds no text
    JUNK.map(lambda v: {"title": v}),  # no text field
    JUNK.map(lambda v: [v]),  # not an object
    st.sampled_from([{"text": ""}, {"text": "y" * 3000}]),  # empty; over max_record_bytes
    st.just(b'{"text": ' + b"7" * 1500 + b"}"),  # a huge number
    BAD_BYTES.filter(lambda b: not _good_text(b)),
    DEEP,
)


def _mixed(good, bad, n_good=50, n_bad=100):
    """Shuffled lists of (record bytes, is_malformed): never fewer than ``n_bad`` malformed records."""
    return st.tuples(st.lists(good.map(lambda r: (_dumps(r), 0)), min_size=n_good, max_size=n_good),
                     st.lists(bad.map(lambda r: (_dumps(r), 1)), min_size=n_bad, max_size=n_bad)
                     ).flatmap(lambda t: st.permutations(t[0] + t[1]))  # fmt: skip


SETTINGS = settings(max_examples=3, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(_mixed(GOOD_TEXT, BAD_TEXT))
def test_random_malformed_text_records_are_counted_never_raised(tmp_path_factory, records):
    path = _jsonl(tmp_path_factory.mktemp("t") / "docs.jsonl", [r for r, _ in records])
    it = iter(text_dataset(_text_cfg(path, num_epochs=1, max_record_bytes=2048)))
    rows = list(it)  # never raises
    skipped = sum(v for k, v in it.counts().items() if k.startswith("skipped/"))
    assert rows and skipped == sum(bad for _, bad in records) == 100


CONV = _conv()
GOOD_MM = st.sampled_from(["0.png", "1.png", "2.png"]).map(lambda p: {"image": p, "conversations": CONV})
BAD_MM = st.one_of(
    NOT_STR.map(lambda v: {"image": v, "conversations": CONV}),
    NOT_STR.map(lambda v: {"image": "0.png", "video": v, "conversations": CONV}),
    JUNK.map(lambda v: {"image": "0.png", "conversations": v}),
    JUNK.map(lambda v: {"image": "0.png", "conversations": [v, CONV[1]]}),
    JUNK.map(lambda v: {"image": "0.png", "conversations": [{"from": v, "value": "<image>"}, CONV[1]]}),
    st.one_of(st.none(), NOT_STR, HUGE).map(
        lambda v: {"image": "0.png", "conversations": [CONV[0], {"from": "gpt", "value": v}]}
    ),  # no text, or an answer longer than max_len
    JUNK.map(lambda v: [v]),  # not an object
    st.just({"image": "missing.png", "conversations": CONV}),
    BAD_BYTES.filter(lambda b: not b.strip().startswith(b"{")),
    DEEP,
)


@SETTINGS
@given(_mixed(GOOD_MM, BAD_MM))
def test_random_malformed_multimodal_records_are_counted_never_raised(tmp_path_factory, records):
    tmp = tmp_path_factory.mktemp("mm")
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 60 * i, np.uint8)).save(tmp / f"{i}.png")
    ann = _jsonl(tmp / "ann.jsonl", [r for r, _ in records])
    it = iter(multimodal_dataset(_mm_cfg(ann, tmp, num_epochs=1, max_record_bytes=4096)))
    rows = list(it)  # never raises
    skipped = sum(v for k, v in it.counts().items() if k.startswith("skipped/"))
    assert len(rows) == 50 and skipped == sum(bad for _, bad in records) == 100

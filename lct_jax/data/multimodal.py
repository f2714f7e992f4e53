"""Stage 1/2 data: LLaVA-style JSON -> rows of the multimodal batch schema (see the preamble / loader docstring).

A record is ``{"image": path | [paths], "video": path, "conversations": [{"from": "human"|"gpt", "value": ...}]}``
with one ``<image>`` placeholder per image or video. Per record (:class:`PrepareSample`):

1. the template (``qwen_1_5`` or ``plain``) gives ids with one ``IMAGE_TOKEN`` per placeholder and the label mask;
2. each image goes through UniRes (``image_tiles``: 1..49 tiles) or, with ``image_mode='crop'`` (stage 1),
   one shortest-edge-resize + center crop; a video (a file or a directory of frame images, see
   :mod:`lct_jax.data.video`) through ``sample_frame_indices`` (``num_frames`` spread uniformly) and
   ``frame_tiles``. Tiles stay uint8 RGB: the model applies the CLIP normalization on device;
3. placeholder k is expanded into ``tiles_k * tokens_per_tile`` slots holding ``IMAGE_TOKEN`` (never trained);
   ``visual_index`` numbers them into the sample's flattened visual tokens ``[tiles * tokens_per_tile]``.

Rows (:class:`PackSamplesIterDataset`) have static shapes: L tokens and M tiles. Each sample is shifted on its
own (``targets[t] = ids[t+1]``, ``loss_mask[t] = trained[t+1]``); with ``pack=True`` several samples share a row
as segments 1, 2, ... with positions restarting at 0 and ``visual_index`` offset past the earlier samples' tiles.

Worked example (byte tokenizer, tile 28, 2 tokens per tile, plain template, image of 1 tile, caption "ab")::

    ids        I  I  a  b  \\n          (I = IMAGE_TOKEN slot)
    inputs     I  I  a  b  .  .        (L = 6, . = pad)
    targets    I→pad  a  b  \\n  .  .
    loss_mask  0  1  1  1  0  0        (the last slot predicts the first caption token)
    positions  0  1  2  3  0  0
    segment    1  1  1  1  0  0
    visual_ix  0  1 -1 -1 -1 -1

Bad records are skipped and counted (``missing_image``, ``bad_image``, ``bad_video``, ``no_assistant_turn``,
``bad_conversation``, ``placeholder_mismatch``, ``too_long``, ``too_many_tiles``, ``bad_record``).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from grain import DatasetIterator, IterDataset

from lct_jax.data.options import PipelineOptions
from lct_jax.data.skips import BadRecord, SkipGuard, SkipPolicy, next_record, parse_json, zero_skips
from lct_jax.data.templates import DEFAULT_SYSTEM, IMAGE_TOKEN, encode_plain, encode_qwen_1_5
from lct_jax.data.text import JsonlSource
from lct_jax.data.tokenizer import load_tokenizer

# the skips this stage's pipeline can produce (only these appear in its metrics)
MULTIMODAL_SKIPS = ("missing_image", "bad_image", "bad_video", "no_assistant_turn", "bad_conversation",
                    "placeholder_mismatch", "too_long", "too_many_tiles", "bad_record")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class MultimodalDataConfig:
    """Stage 1 (``template='plain'``, ``image_mode='crop'``) or stage 2 (``'qwen_1_5'``, ``'unires'``)."""

    annotations: str  # LLaVA .json (a list) or .jsonl
    max_len: int  # L: tokens per row (inputs after the shift)
    max_tiles: int  # M: tiles/frames per row
    image_root: str = ""
    template: str = "qwen_1_5"
    image_mode: str = "unires"  # 'unires' | 'crop'
    tokenizer: str = "byte"
    tile: int = 336
    tokens_per_tile: int = 144
    num_frames: int = 32  # frames sampled per video
    system: str = DEFAULT_SYSTEM
    pack: bool = False
    options: PipelineOptions = PipelineOptions()

    def __post_init__(self):
        if self.template not in ("qwen_1_5", "plain"):
            raise ValueError(f"template={self.template!r} must be 'qwen_1_5' or 'plain'")
        if self.image_mode not in ("unires", "crop"):
            raise ValueError(f"image_mode={self.image_mode!r} must be 'unires' or 'crop'")
        if self.max_len < 2 or self.max_tiles < 1:
            raise ValueError(f"max_len={self.max_len} must be >= 2 and max_tiles={self.max_tiles} >= 1")


class JsonListSource:
    """The records of a LLaVA ``.json`` file (one JSON list), each re-encoded as JSON bytes."""

    def __init__(self, path: str):
        self.path = path
        with open(path) as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"annotations={path!r} is not valid JSON ({e})") from None
        if not isinstance(records, list):
            raise ValueError(f"annotations={path!r} must hold a JSON list of records")
        self._records = [json.dumps(r).encode() for r in records]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> bytes:
        return self._records[i]

    def where(self, i: int) -> str:
        return f"{self.path}[{i}]"


def make_source(cfg: MultimodalDataConfig):
    """Records as JSON bytes (parsed per record, so one malformed record is one skip, not a dead run)."""
    if cfg.annotations.endswith(".jsonl"):
        return JsonlSource([cfg.annotations])
    return JsonListSource(cfg.annotations)


class PrepareSample:
    """Record -> ``{'ids', 'trained', 'visual_index', 'pixels'}`` or :class:`Skipped` (see module docstring)."""

    def __init__(self, cfg: MultimodalDataConfig):
        self.cfg = cfg
        self.tok = load_tokenizer(cfg.tokenizer)

    def _path(self, p) -> str:
        if not isinstance(p, str) or not p:
            raise BadRecord("bad_record", f"visual path {p!r:.80} is not a non-empty string")
        return p if os.path.isabs(p) else os.path.join(self.cfg.image_root, p)

    def _visuals(self, rec: dict) -> list[tuple[str, str]]:
        """``[(kind, path)]``: the record's images (a path or a list of paths) then its video, in order; a field
        that is absent, ``null`` or empty means none, any other non-path value is a bad record."""
        images = rec.get("image")
        if images is None or images == "" or images == []:
            images = []
        elif isinstance(images, str):
            images = [images]
        elif not isinstance(images, list):
            raise BadRecord("bad_record", f"'image' must be a path or a list of paths, got {images!r:.80}")
        out = [("image", self._path(p)) for p in images]
        if rec.get("video") not in (None, ""):
            out.append(("video", self._path(rec["video"])))
        return out

    def _image(self, path: str) -> np.ndarray:
        from lct_jax.data import unires

        if not os.path.exists(path):
            raise BadRecord(
                "missing_image", f"{path}: no such file", f"config.data.image_root={self.cfg.image_root!r}"
            )
        try:
            img = unires.load_image(path)
            if self.cfg.image_mode == "crop":
                return unires.frame_tiles([img], tile=self.cfg.tile)
            return unires.image_tiles(img, tile=self.cfg.tile)
        except Exception as e:  # noqa: BLE001 - any failure to decode/convert is this record's problem
            raise BadRecord("bad_image", f"{path}: {e}") from e

    def _video(self, path: str) -> np.ndarray:
        from lct_jax.data import unires, video  # video brings PyAV: only records with a video need it

        if not os.path.exists(path):
            raise BadRecord("missing_image", f"video {path}: no such file or directory",
                            f"config.data.image_root={self.cfg.image_root!r}")  # fmt: skip
        try:
            v = video.probe(path)
            idx = v.sample(num_frames=min(self.cfg.num_frames, v.num_frames))
            # each frame becomes its tile as it streams by: never more than one full-size frame held
            return np.concatenate([unires.frame_tiles([img], tile=self.cfg.tile) for _, img in v.frames(idx)])
        except video.BadVideoError as e:  # unreadable, zero-frame, truncated, a bad frame image
            raise BadRecord("bad_video", str(e)) from e

    def prepare(self, rec) -> dict[str, np.ndarray]:
        """One record -> sample; :class:`BadRecord` for anything unusable (every field's type is checked)."""
        cfg = self.cfg
        rec = (
            parse_json(rec, f"config.data.annotations={cfg.annotations!r}")
            if isinstance(rec, bytes | str)
            else rec
        )
        if not isinstance(rec, dict):
            raise BadRecord("bad_record", f"record is a {type(rec).__name__}, not an object",
                            f"config.data.annotations={cfg.annotations!r} (LLaVA records)")  # fmt: skip
        conv = rec.get("conversations")
        if cfg.template == "plain":
            enc = encode_plain(conv, self.tok)
        else:
            enc = encode_qwen_1_5(conv, self.tok, system=cfg.system)
        visuals = self._visuals(rec)
        if enc.num_placeholders != len(visuals):
            raise BadRecord(
                "placeholder_mismatch",
                f"{enc.num_placeholders} <image> placeholders but {len(visuals)} images/videos",
            )
        if len(enc.ids) - 1 > cfg.max_len:  # text alone too long: no need to decode anything
            raise BadRecord(
                "too_long", f"{len(enc.ids) - 1} text tokens > max_len={cfg.max_len}", "config.data.max_len"
            )
        pixels = [self._image(p) if k == "image" else self._video(p) for k, p in visuals]
        n_tiles = sum(len(p) for p in pixels)
        if n_tiles > cfg.max_tiles:
            raise BadRecord(
                "too_many_tiles",
                f"{n_tiles} tiles/frames > max_tiles={cfg.max_tiles}",
                "config.data.max_tiles",
            )
        # expand placeholder k into its tiles * tokens_per_tile slots
        tpt = cfg.tokens_per_tile
        ids, trained, vis = [], [], []
        cuts = np.flatnonzero(enc.ids == IMAGE_TOKEN)
        start, offset = 0, 0
        for k, c in enumerate(cuts):
            ids.append(enc.ids[start:c])
            trained.append(enc.trained[start:c])
            vis.append(np.full([c - start], -1, np.int32))
            n = len(pixels[k]) * tpt
            ids.append(np.full([n], IMAGE_TOKEN, np.int32))
            trained.append(np.zeros([n], bool))
            vis.append(np.arange(offset, offset + n, dtype=np.int32))
            start, offset = c + 1, offset + n
        ids.append(enc.ids[start:])
        trained.append(enc.trained[start:])
        vis.append(np.full([len(enc.ids) - start], -1, np.int32))
        ids, trained, vis = np.concatenate(ids), np.concatenate(trained), np.concatenate(vis)
        if len(ids) - 1 > cfg.max_len:
            raise BadRecord("too_long", f"{len(ids) - 1} tokens with visual slots > max_len={cfg.max_len}",
                            "config.data.max_len")  # fmt: skip
        if not trained[1:].any():
            raise BadRecord("no_assistant_turn", "nothing to train on after the shift")
        s = cfg.tile
        pix = np.concatenate(pixels) if pixels else np.zeros([0, s, s, 3], np.uint8)
        return {"ids": ids, "trained": trained, "visual_index": vis, "pixels": pix}

    __call__ = prepare


# -------------------------------------------------------------------------------------------------- rows


def build_row(samples: list[dict], cfg: MultimodalDataConfig, pad_id: int) -> dict[str, np.ndarray]:
    """Lay samples into one row of L tokens and M tiles (each sample shifted on its own, one segment each)."""
    L, M, S, tpt = cfg.max_len, cfg.max_tiles, cfg.tile, cfg.tokens_per_tile
    row = {
        "inputs": np.full([L], pad_id, np.int32),
        "targets": np.full([L], pad_id, np.int32),
        "loss_mask": np.zeros([L], np.float32),
        "positions": np.zeros([L], np.int32),
        "segment_ids": np.zeros([L], np.int32),
        "visual_index": np.full([L], -1, np.int32),
        "pixels": np.empty([M, S, S, 3], np.uint8),  # RGB bytes; real tiles copied in, the rest zeroed below
        "pixel_mask": np.zeros([M], bool),
    }
    t0, m0 = 0, 0
    for seg, s in enumerate(samples, start=1):
        n = len(s["ids"]) - 1
        tgt = s["ids"][1:]
        row["inputs"][t0 : t0 + n] = s["ids"][:-1]
        row["targets"][t0 : t0 + n] = np.where(tgt == IMAGE_TOKEN, pad_id, tgt)
        row["loss_mask"][t0 : t0 + n] = s["trained"][1:]
        row["positions"][t0 : t0 + n] = np.arange(n)
        row["segment_ids"][t0 : t0 + n] = seg
        vis = s["visual_index"][:-1]
        row["visual_index"][t0 : t0 + n] = np.where(vis >= 0, vis + m0 * tpt, -1)
        k = len(s["pixels"])
        row["pixels"][m0 : m0 + k] = s["pixels"]
        row["pixel_mask"][m0 : m0 + k] = True
        t0, m0 = t0 + n, m0 + k
    row["pixels"][m0:] = 0
    return row


class _PackSamplesIterator(DatasetIterator):
    def __init__(self, parent: DatasetIterator, cfg: MultimodalDataConfig, pad_id: int, skips: SkipPolicy):
        super().__init__(parent)
        self._guard = SkipGuard(skips)
        self.cfg, self.pad_id = cfg, pad_id
        self._held = None  # a sample fetched but not yet placed (did not fit the previous row)
        self._held_state = None  # parent state right before self._held was fetched
        self._pending = zero_skips()

    def _fetch(self) -> bool:
        got = next_record(self._parent, self._pending, self._guard)
        if got is None:
            return False
        self._held, self._held_state = got
        return True

    def __next__(self):
        samples, tokens, tiles = [], 0, 0
        while True:
            if self._held is None and not self._fetch():
                break
            n, k = len(self._held["ids"]) - 1, len(self._held["pixels"])
            if samples and (tokens + n > self.cfg.max_len or tiles + k > self.cfg.max_tiles):
                break
            samples.append(self._held)
            self._held, tokens, tiles = None, tokens + n, tiles + k
            if not self.cfg.pack:
                break
        if not samples and not self._pending.any():
            raise StopIteration
        # (no samples: end of finite data; an empty row carries the last skips, the loader counts and drops it)
        row = build_row(samples, self.cfg, self.pad_id)
        row["_skips"], self._pending = self._pending, zero_skips()
        return row

    def get_state(self):
        held = self._held is not None
        return {
            "parent": self._held_state if held else self._parent.get_state(),
            "has_held": held,
            "pending": self._pending.tolist(),
        }

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._held = self._held_state = None
        if state["has_held"] and not self._fetch():
            raise ValueError("packer state points past the end of its data source; was the source changed?")
        self._pending = np.asarray(state["pending"], np.int32)


class PackSamplesIterDataset(IterDataset):
    """Prepared samples (or :class:`Skipped`) -> fixed-shape rows; one sample per row unless ``cfg.pack``.
    ``skips`` bounds the skips (:class:`lct_jax.data.skips.SkipPolicy`)."""

    def __init__(self, parent: IterDataset, cfg: MultimodalDataConfig, skips: SkipPolicy | None = None):
        super().__init__(parent)
        self.cfg, self.skips = cfg, skips or SkipPolicy()
        self.pad_id = load_tokenizer(cfg.tokenizer).pad_id

    def __iter__(self):
        return _PackSamplesIterator(self._parent.__iter__(), self.cfg, self.pad_id, self.skips)

    def __str__(self):
        return f"PackSamplesIterDataset(L={self.cfg.max_len}, M={self.cfg.max_tiles}, pack={self.cfg.pack})"

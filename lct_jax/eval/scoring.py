"""Teacher-forced exact-match scoring on the mesh: the one forward V-NIAH and text NIAH share (spec §9).

Axis alphabet: T tokens (padded, zigzag order on device), D model dim, V vocab, A answer tokens, P visual tokens
per frame.

A scored sequence is a :class:`Layout`: token ids with visual slots (``IMAGE_TOKEN``) and the answer at its end,
padded to a bucket length T::

    [ prompt text / frames / question ............ ][ a_0 ... a_{A-1} ][ padding ]
      positions 0 ..                            s-1   s ..      s+A-1   s+A .. T-1

Teacher forcing: the answer is part of the input, and the sequence counts as *correct* iff
``argmax(head(hidden[s - 1 + j])) == a_j`` for every j (the hidden state before each answer token predicts it).
Padding sits after the answer with positions continuing past it, so causal masking hides it from every scored
position.

On device (:func:`build_score_forward`): the token axis is in the zigzag order of :mod:`lct_jax.ops.zigzag` and
split over the mesh's ``seq`` axis; the LM (:meth:`lct_jax.model.qwen2.Qwen2.encode`) runs on input embeddings
(text ids embedded on device, visual tokens placed by the host), with ring attention when ``seq`` > 1. A one-hot
``[A, T]`` contraction then picks the A scored hidden states (each shard sums its own tokens, one all-reduce of
``[A, D]``), and only ``[A, D]`` meets the ``[D, V]`` head: no ``[T, V]`` logits and no gathered ``[T, D]`` exist at
any length. The result is int32[A] argmax ids.

On the host (:func:`device_inputs`): every global array is built with ``jax.make_array_from_callback``; the
callback for one device assembles only that device's zigzag slice of the visual embeddings and reads only the
frames the slice covers, so no host ever holds the whole ``[T, D]`` input (432K tokens x 3584 x bf16 = 3.1 GB).

Compiles: one per (T, A). :func:`padded_length` pads to what the ring needs (a multiple of 2·seq, and of
2·seq·block once a shard holds more than one attention block), optionally coarser (``bucket``), so every depth of
one frame count (or one text length) shares one compile.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lct_jax.kernels import DEFAULT_BLOCKS
from lct_jax.model.longva import IMAGE_TOKEN
from lct_jax.model.qwen2 import Qwen2, Qwen2Config
from lct_jax.ops.zigzag import inverse_permutation, zigzag_permutation
from lct_jax.sharding import constrain, logical_to_spec, state_shardings

FrameReader = Callable[[int, int], np.ndarray]  # (f0, f1) -> [f1 - f0, P, D] visual tokens of frames [f0, f1)


@dataclasses.dataclass(frozen=True)
class Layout:
    """One scored sequence in natural token order.

    ``ids`` int32[L] holds the text ids with ``IMAGE_TOKEN`` at the visual slots; the last ``answer_len`` ids are
    the answer. Visual slots are one contiguous run of ``num_frames`` x ``tokens_per_frame`` tokens from
    ``visual_start``, read frame by frame through ``frames`` (never all at once). ``pad_id`` fills the padding.
    """

    ids: np.ndarray
    answer_len: int
    pad_id: int = 0
    visual_start: int = 0
    num_frames: int = 0
    tokens_per_frame: int = 0
    frames: FrameReader | None = None

    def __post_init__(self):
        ids = np.asarray(self.ids, np.int32)
        object.__setattr__(self, "ids", ids)
        if ids.ndim != 1 or not 1 <= self.answer_len < len(ids):
            raise ValueError(f"ids int32[L] with 1 <= answer_len < L; got {ids.shape=}, {self.answer_len=}")
        v0, v1 = self.visual_slots
        slots = np.flatnonzero(ids == IMAGE_TOKEN)
        if not np.array_equal(slots, np.arange(v0, v1)):
            raise ValueError(
                f"visual slots must be the run [{v0}, {v1}) ({self.num_frames} frames x "
                f"{self.tokens_per_frame} tokens); IMAGE_TOKEN found at {len(slots)} positions"
            )
        if v1 > self.answer_start:
            raise ValueError(f"visual slots [{v0}, {v1}) overlap the answer at {self.answer_start}")
        if (v1 > v0) != (self.frames is not None):
            raise ValueError("pass frames= exactly when there are visual slots")

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def answer_start(self) -> int:
        return self.length - self.answer_len

    @property
    def answer(self) -> np.ndarray:
        return self.ids[self.answer_start :]

    @property
    def scored_positions(self) -> np.ndarray:
        """int[A]: positions whose next-token prediction is an answer token (s - 1 .. s + A - 2)."""
        return np.arange(self.answer_start - 1, self.length - 1)

    @property
    def visual_slots(self) -> tuple[int, int]:
        return self.visual_start, self.visual_start + self.num_frames * self.tokens_per_frame

    def visual(self, start: int, stop: int, dim: int, dtype) -> np.ndarray:
        """[stop - start, D] for natural positions [start, stop): visual tokens at visual slots, 0 elsewhere
        (positions past L are padding); reads only the frames that overlap the range."""
        out = np.zeros((stop - start, dim), dtype)
        v0, v1 = self.visual_slots
        a, b = max(start, v0), min(stop, v1)
        if a >= b:
            return out
        p = self.tokens_per_frame
        f0, f1 = (a - v0) // p, -(-(b - v0) // p)
        tokens = np.asarray(self.frames(f0, f1))  # [f1 - f0, P, D]
        if tokens.shape != (f1 - f0, p, dim):
            raise ValueError(f"frames({f0}, {f1}) gave {tokens.shape}, expected {(f1 - f0, p, dim)}")
        flat = tokens.reshape(-1, dim)  # natural positions v0 + f0 * P ...
        off = v0 + f0 * p
        out[a - start : b - start] = flat[a - off : b - off]
        return out


def padded_length(length: int, seq: int, *, block: int = max(DEFAULT_BLOCKS["xla"]), bucket: int = 1) -> int:
    """The T a sequence of ``length`` tokens is padded to: a multiple of 2·seq (zigzag) and of ``bucket``, and once
    a shard would hold more than ``block`` tokens, of 2·seq·block (whole attention blocks in every zigzag chunk)."""
    if min(length, seq, block, bucket) < 1:
        raise ValueError(f"{length=}, {seq=}, {block=}, {bucket=} must be >= 1")
    unit = math.lcm(2 * seq, bucket)
    t = -(-length // unit) * unit
    if t // seq > block:
        unit = math.lcm(2 * seq * block, bucket)
        t = -(-length // unit) * unit
    return t


# ---------------------------------------------------------------------------------------------- device side


def _score(graphdef, params, ids, positions, score_at, visual):
    """ids/positions int32[1, T] (zigzag), score_at int32[A] (zigzag indices), visual [1, T, D] or None
    -> int32[A] argmax ids of the head at the scored positions."""
    lm = nnx.merge(graphdef, params)
    x = lm.embed_tokens(jnp.maximum(ids, 0))  # [1, T, D]; visual slots overwritten below
    if visual is not None:
        x = jnp.where((ids == IMAGE_TOKEN)[:, :, None], visual.astype(x.dtype), x)
    hidden = lm.encode(inputs_embeds=x, positions=positions)[0]  # [T, D]
    t = hidden.shape[0]
    pick = (score_at[:, None] == jnp.arange(t, dtype=jnp.int32)[None, :]).astype(hidden.dtype)  # [A, T]
    pick = constrain(pick, (None, "act_seq"))
    # exact: one 1.0 x h term per row, the rest 0; HIGHEST keeps fp32 hidden states unrounded on TPU
    h = jnp.einsum("at,td->ad", pick, hidden, precision="highest", preferred_element_type=jnp.float32)
    w = lm.head_weight().astype(lm.cfg.dtype)  # [D, V]
    logits = jnp.einsum("ad,dv->av", h.astype(lm.cfg.dtype), w, preferred_element_type=jnp.float32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [A]


@dataclasses.dataclass(frozen=True)
class ScoreForward:
    """The jitted scoring forward for one (config, mesh, T, A): ``forward(params, ids, positions, score_at[,
    visual]) -> int32[A]``. ``params`` is the LM's pure param dict (``nnx.state(lm).to_pure_dict()``) placed with
    :meth:`param_shardings`; inputs come from :func:`device_inputs`. :meth:`lower` compiles it from abstract
    inputs only (e.g. for a TPU topology from a CPU host)."""

    cfg: Qwen2Config
    mesh: Mesh
    length: int  # T
    num_answer: int  # A
    visual: bool
    graphdef: nnx.GraphDef
    abstract_params: dict  # ShapeDtypeStructs (the cfg's param dtype) with their shardings
    fn: Callable

    def __call__(self, params, ids, positions, score_at, visual=None):
        if (visual is not None) != self.visual:
            raise ValueError(f"this forward was built with visual={self.visual}")
        with jax.set_mesh(self.mesh):
            return self.fn(params, ids, positions, score_at, visual)

    def param_shardings(self) -> dict:
        return jax.tree.map(lambda x: x.sharding, self.abstract_params)

    def abstract_inputs(self) -> tuple:
        """(params, ids, positions, score_at, visual or None) as ShapeDtypeStructs carrying their shardings."""
        tok, emb, rep = input_shardings(self.mesh)
        t, d = self.length, self.cfg.hidden_size
        visual = (
            jax.ShapeDtypeStruct((1, t, d), jnp.dtype(self.cfg.dtype), sharding=emb) if self.visual else None
        )
        return (
            self.abstract_params,
            jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=tok),
            jax.ShapeDtypeStruct((1, t), jnp.int32, sharding=tok),
            jax.ShapeDtypeStruct((self.num_answer,), jnp.int32, sharding=rep),
            visual,
        )

    def lower(self):
        """``jax.stages.Lowered`` from abstract inputs; ``.compile().memory_analysis()`` gives per-device memory."""
        with jax.set_mesh(self.mesh):
            return self.fn.trace(*self.abstract_inputs()).lower()


def input_shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding, NamedSharding]:
    """(tokens [1, T], embeddings [1, T, D], replicated) shardings on ``mesh``."""
    tok = NamedSharding(mesh, logical_to_spec(("act_batch", "act_seq")))
    emb = NamedSharding(mesh, logical_to_spec(("act_batch", "act_seq", "act_embed")))
    return tok, emb, NamedSharding(mesh, logical_to_spec(None))


def check_eval_mesh(mesh: Mesh) -> None:
    if mesh.shape["data"] != 1:
        raise ValueError(
            f"evaluation scores one sequence at a time: the mesh's data axis must be 1, got {dict(mesh.shape)}"
        )


@functools.lru_cache(maxsize=64)  # repeated runs in one process (grids, experiments) reuse their compiles
def build_score_forward(
    cfg: Qwen2Config, mesh: Mesh, length: int, num_answer: int, *, visual: bool = True
) -> ScoreForward:
    """The scoring forward of a Qwen2 LM (a LongVA's ``lm``) with config ``cfg`` (its ``param_dtype`` is the dtype
    of the params it will be given) on ``mesh`` for T = ``length`` tokens (already padded: see
    :func:`padded_length`) and A = ``num_answer`` scored positions; ``visual``: whether it takes visual tokens.

    E.g. the LongVA-7B V-NIAH forward at 3000 frames on 8 v5e chips (compile only)::

        cfg = PRESETS["longva_7b"].text.replace(param_dtype="bfloat16", ring_kernel="pallas_tpu")
        fwd = build_score_forward(cfg, make_mesh(1, 8, 1, devices=topology.devices), 434176, 16)
        fwd.lower().compile().memory_analysis().peak_memory_in_bytes
    """
    check_eval_mesh(mesh)
    seq = mesh.shape["seq"]
    if length % (2 * seq):
        raise ValueError(f"{length=} must be a multiple of 2 * seq = {2 * seq}; use padded_length()")
    if num_answer < 1:
        raise ValueError(f"{num_answer=} must be >= 1")
    abstract = nnx.eval_shape(lambda: Qwen2(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shardings = state_shardings(state, mesh).to_pure_dict()
    abstract_params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state.to_pure_dict(), shardings
    )
    _, _, rep = input_shardings(mesh)
    fn = jax.jit(lambda *a: _score(graphdef, *a), out_shardings=rep)
    return ScoreForward(cfg, mesh, length, num_answer, visual, graphdef, abstract_params, fn)


# ------------------------------------------------------------------------------------------------ host side


def _runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers in ``idx``, as (start, stop) pairs in order."""
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(idx, breaks) if len(r)]


def device_inputs(layout: Layout, length: int, num_answer: int, mesh: Mesh, dim: int, dtype) -> tuple:
    """(ids, positions, score_at, visual or None) as global arrays on ``mesh`` for a ``length``-token forward.

    Every per-token array is zigzagged; ``visual`` [1, T, D] is built by a callback per device that assembles only
    that device's slice (:meth:`Layout.visual`). Scored positions beyond the answer's own are padded with its
    last one (their predictions are dropped)."""
    seq = mesh.shape["seq"]
    if layout.length > length or layout.answer_len > num_answer:
        raise ValueError(
            f"layout of {layout.length} tokens / {layout.answer_len} answer tokens does not fit {length=}, "
            f"{num_answer=}"
        )
    perm = zigzag_permutation(length, seq)  # zigzag index -> natural position
    ids = np.full(length, layout.pad_id, np.int32)
    ids[: layout.length] = layout.ids
    scored = layout.scored_positions
    scored = np.concatenate([scored, np.full(num_answer - len(scored), scored[-1])])
    score_at = inverse_permutation(perm)[scored].astype(np.int32)
    tok, emb, rep = input_shardings(mesh)
    ids_zz, pos_zz = ids[perm][None], perm.astype(np.int32)[None]
    out = [
        jax.make_array_from_callback((1, length), tok, lambda i: ids_zz[i]),
        jax.make_array_from_callback((1, length), tok, lambda i: pos_zz[i]),
        jax.make_array_from_callback((num_answer,), rep, lambda i: score_at[i]),
    ]
    if layout.num_frames == 0:
        return (*out, None)
    cache: dict[tuple[int, int], np.ndarray] = {}  # devices that differ only in 'model' share a slice

    def slice_of(index):
        rows = np.arange(length)[index[1]]
        key = (int(rows[0]), int(rows[-1]))
        if key not in cache:
            natural = perm[rows]
            parts = [layout.visual(a, b, dim, dtype) for a, b in _runs(natural)]
            cache[key] = np.concatenate(parts)[None]  # [1, T_local, D]
        return cache[key]

    visual = jax.make_array_from_callback((1, length, dim), emb, slice_of)
    return (*out, visual)


class Scorer:
    """Scores :class:`Layout` s with one LM on one mesh, compiling once per (T, A).

    ``scorer(layout, length=T, num_answer=A) -> int32[answer_len]`` predicted ids (T defaults to
    :func:`padded_length` of the layout, A to its answer length); a sequence is correct iff they equal
    ``layout.answer``."""

    def __init__(self, lm: Qwen2, mesh: Mesh, *, bucket: int = 1):
        check_eval_mesh(mesh)
        self.lm_cfg = lm.cfg
        self.mesh = mesh
        self.bucket = bucket
        state = nnx.state(lm)
        # a no-op for params restored onto this mesh (loading.load_eval_model); places any other model's
        self.params = jax.device_put(state.to_pure_dict(), state_shardings(state, mesh).to_pure_dict())
        self._forwards: dict[tuple[int, int, bool], ScoreForward] = {}

    @property
    def block(self) -> int:
        return max(DEFAULT_BLOCKS[self.lm_cfg.ring_kernel])

    def padded_length(self, length: int) -> int:
        return padded_length(length, self.mesh.shape["seq"], block=self.block, bucket=self.bucket)

    def forward(self, length: int, num_answer: int, visual: bool) -> ScoreForward:
        key = (length, num_answer, visual)
        if key not in self._forwards:
            self._forwards[key] = build_score_forward(
                self.lm_cfg, self.mesh, length, num_answer, visual=visual
            )
        return self._forwards[key]

    def __call__(
        self, layout: Layout, *, length: int | None = None, num_answer: int | None = None
    ) -> np.ndarray:
        length = self.padded_length(layout.length) if length is None else length
        num_answer = layout.answer_len if num_answer is None else num_answer
        fwd = self.forward(length, num_answer, layout.num_frames > 0)
        inputs = device_inputs(
            layout, length, num_answer, self.mesh, self.lm_cfg.hidden_size, self.lm_cfg.dtype
        )
        pred = np.asarray(jax.device_get(fwd(self.params, *inputs)))
        return pred[: layout.answer_len]


def decode_ids(tok, ids: Sequence[int]) -> str:
    """Text of ``ids`` for the results file; ids the tokenizer cannot decode (a tiny model's spare vocabulary rows)
    show as ``<|id:N|>``."""
    try:
        return tok.decode(list(ids))
    except (ValueError, KeyError, OverflowError):
        parts = []
        for i in ids:
            try:
                parts.append(tok.decode([i]))
            except (ValueError, KeyError, OverflowError):
                parts.append(f"<|id:{int(i)}|>")
        return "".join(parts)


def sample_record(index: int, question: str, layout: Layout, pred: np.ndarray, tok, padded: int) -> dict:
    """One scored sequence in the results file: what was asked, expected and predicted, ids and text."""
    expected = layout.answer.tolist()
    return {
        "sample": index,
        "question": question,
        "length": layout.length,
        "padded_length": padded,
        "expected": expected,
        "predicted": pred.tolist(),
        "expected_text": decode_ids(tok, expected),
        "predicted_text": decode_ids(tok, pred.tolist()),
        "correct": bool(np.array_equal(pred, layout.answer)),
    }

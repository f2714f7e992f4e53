"""Fit check: compile a stage's real train step for a Cloud TPU topology on this host and read the compiler's
per-chip memory plan, without a TPU and without allocating anything.

``python -m lct_jax.fit`` is the command line (see :mod:`lct_jax.fit.__main__`); this module is the library.

What is compiled is what training runs: :func:`lct_jax.train.run.build_model`, ``make_state_spec`` and
``jit_train_step`` on a batch of abstract arrays (``jax.ShapeDtypeStruct`` with their shardings) for the
topology's devices (``jax.experimental.topologies``, libtpu compiling ahead of time). ``peak_memory_in_bytes`` of the
compiled program is the per-chip peak the TPU compiler plans; an over-budget program fails to compile with
``RESOURCE_EXHAUSTED`` (in seconds, while a program that fits takes a minute or more for LongVA-7B on 2 cores).

A *program* (:data:`PROGRAMS`) turns ``(config, mesh)`` into ``(jitted function, abstract args)``:

- ``'train'``: the stage's train step (fwd + bwd + AdamW), the default;
- ``'embed_loss'``: the same step with the decoder stack skipped (embedding or visual splice → final norm → chunked
  loss → AdamW over the same state): what the embedding and loss phases of ``'train'`` cost on their own.

- ``'vniah'``: the V-NIAH scoring forward of the stage's language model (bf16 params, one sequence, data = 1).

:func:`search_mesh` finds, per candidate mesh, the longest row that fits (rows per micro-batch: one per ``data``
shard) by a secant/bisection over multiples of :func:`length_granularity`. Its probes are *estimates*
(``compile_probe(estimate=True)``): the program compiled beside a ballast of one HBM per chip fails at the memory
check, before the back end, and reports its total; a full compile of a fitting LongVA-7B step takes minutes on 2
cores, an estimate seconds. :func:`confirm` then compiles the answer in full.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

# compile-only TPU: libtpu must not look for a local chip (set before jax loads it; a real TPU VM keeps its own)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from lct_jax.data.loader import batch_shardings, padded_length  # noqa: E402
from lct_jax.eval import scoring  # noqa: E402
from lct_jax.kernels import DEFAULT_BLOCKS  # noqa: E402
from lct_jax.sharding import make_mesh  # noqa: E402
from lct_jax.train.run import build_model  # noqa: E402
from lct_jax.train.state import make_state_spec  # noqa: E402
from lct_jax.train.step import StepConfig, jit_train_step  # noqa: E402

GIB = 2**30
# HBM per chip that the TPU compiler plans with (measured with jax 0.10.2 + libtpu 0.0.42)
HBM_GIB = {"v4": 30.75, "v5e": 15.75, "v5p": 95.74, "v6e": 31.25, "tpu7x": 94.75}
_CHIP_CONFIG = {"v4": "megacore", "v5p": "megacore"}  # the others: "default"
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:16x16, v4:2x2x1, v5p:4x8x8, v6e:2x2, tpu7x:2x2x1"
MAX_PROBES = 14  # per mesh in a search (estimates: seconds each; a full 7B compile that fits takes minutes)
RESOLUTION = 64  # a search stops when the longest fit and the shortest failure are within 1/64 (or one step)


# ------------------------------------------------------------------------------------------------ topology


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # e.g. 'v5e:16x16'
    devices: tuple
    hbm_bytes: int  # per chip

    @property
    def num_devices(self) -> int:
        return len(self.devices)


def get_topology(name: str) -> Topology:
    """A compile-only TPU topology by Cloud TPU name ``<generation>:<chips per dim>``, e.g. ``v5e:16x16``."""
    from jax.experimental.topologies import get_topology_desc  # noqa: PLC0415 - pulls in libtpu

    gen, _, dims = name.partition(":")
    if gen not in HBM_GIB or not re.fullmatch(r"\d+(x\d+){1,2}", dims):
        raise ValueError(
            f"unknown topology {name!r}; use <generation>:<chips per dim> with generation one of "
            f"{sorted(HBM_GIB)}, e.g. {TOPOLOGY_EXAMPLES}"
        )
    try:
        topo = get_topology_desc(
            platform="tpu",
            topology_name=name,
            chip_config_name=_CHIP_CONFIG.get(gen, "default"),
            chips_per_host_bounds=(2, 2, 1),
            num_slices=1,
            wrap=(False, False, False),
        )
    except Exception as e:  # noqa: BLE001 - libtpu missing or the name rejected: one clear line
        msg = " ".join(str(e).split())[:300]
        raise ValueError(
            f"cannot build TPU topology {name!r} ({msg}); needs the tpu extra (pip install -e '.[tpu]') and a "
            f"name like {TOPOLOGY_EXAMPLES}"
        ) from None
    return Topology(name, tuple(topo.devices), int(HBM_GIB[gen] * GIB))


# ---------------------------------------------------------------------------------------------------- layout


def length_key(config) -> str:
    """The config field holding the row length: ``data.seq_len`` (text stage) or ``data.max_len``."""
    return "data.seq_len" if config.stage == "text_extension" else "data.max_len"


def get_length(config) -> int:
    return int(config.data[length_key(config).split(".")[1]])


def with_overrides(config, *, length: int | None = None, rows: int | None = None, mesh=None, fields=None):
    """A locked copy of ``config`` with the row length, global rows per step, mesh sizes and any dotted
    ``fields`` (e.g. ``{"model.remat": "offload"}``) replaced."""
    c = ml_collections.ConfigDict(config.to_dict())  # unlocked copy; the original stays untouched
    for key, value in (fields or {}).items():
        *path, last = key.split(".")
        node = c
        for part in path:
            node = node[part]
        if last not in node:
            raise ValueError(f"config has no field {key!r}")
        node[last] = value
    if length is not None:
        c.data[length_key(c).split(".")[1]] = int(length)
    if rows is not None:
        c.data.batch_size = int(rows)
    if mesh is not None:
        c.mesh.data, c.mesh.seq, c.mesh.model = (int(x) for x in mesh)
    c.lock()
    return c


def resolve_mesh(config, topo: Topology) -> tuple[int, int, int]:
    """The config's (data, seq, model) on ``topo`` with a -1 resolved; raises naming what does not divide."""
    sizes = {"data": config.mesh.data, "seq": config.mesh.seq, "model": config.mesh.model}
    n = topo.num_devices
    free = [k for k, v in sizes.items() if v == -1]
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if len(free) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh {sizes}: at most one size may be -1, the others >= 1")
    if free:
        if n % fixed:
            raise ValueError(
                f"mesh {sizes} on {topo.name} ({n} chips): the fixed sizes multiply to {fixed}, which does not "
                f"divide {n}; pick sizes whose product divides {n}"
            )
        sizes[free[0]] = n // fixed
    if math.prod(sizes.values()) != n:
        raise ValueError(
            f"mesh data={sizes['data']} x seq={sizes['seq']} x model={sizes['model']} = "
            f"{math.prod(sizes.values())} chips, but {topo.name} has {n}; set one size to -1 to use the rest"
        )
    return sizes["data"], sizes["seq"], sizes["model"]


def length_granularity(config, seq: int) -> int:
    """Row lengths that waste nothing: multiples of ``seq`` x lcm(2, ring kernel blocks) (zigzag chunks that the
    kernel's q and kv blocks tile exactly); 1 without sequence parallelism."""
    if seq == 1:
        return 1
    bq, bk = DEFAULT_BLOCKS[config.model.ring_kernel]
    return seq * math.lcm(2, bq, bk)


def nearest_multiples(length: int, multiple: int) -> tuple[int, int]:
    below = length // multiple * multiple
    return below, below + multiple


def check_layout(config, mesh_sizes: tuple[int, int, int], rows: int) -> int:
    """The row length training compiles (the loader pads to the zigzag's 2 x seq); raises when the rows do not
    divide the mesh's data axis, naming the sizes that would."""
    data, seq, _ = mesh_sizes
    length = get_length(config)
    if length < 1:
        raise ValueError(f"{length_key(config)}={length} must be >= 1")
    a = config.step.micro_batches
    if rows % (a * data):
        lo, hi = nearest_multiples(rows, a * data)
        raise ValueError(
            f"data.batch_size={rows} rows do not divide into micro_batches={a} x the mesh's data={data}; "
            f"nearest: {lo or a * data} or {hi}"
        )
    return padded_length(length, seq)


# ---------------------------------------------------------------------------------------------------- programs


def abstract_batch(config, model_cfg, rows: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The stage's batch as abstract arrays: what the loaders ship, ``rows`` rows of ``length`` tokens."""
    tok = lambda dt: jax.ShapeDtypeStruct((rows, length), dt)  # noqa: E731
    batch = {k: tok(jnp.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    batch["loss_mask"] = tok(jnp.float32)
    if config.stage != "text_extension":
        m, s = config.data.max_tiles, model_cfg.tile
        batch["pixels"] = jax.ShapeDtypeStruct((rows, m, s, s, 3), jnp.uint8)
        batch["pixel_mask"] = jax.ShapeDtypeStruct((rows, m), jnp.bool_)
        batch["visual_index"] = tok(jnp.int32)
    return batch


def _train_like(config, mesh, forward=None):
    kind, model_cfg, make_model = build_model(config)
    spec = make_state_spec(make_model, config.optim, mesh)
    length = padded_length(get_length(config), mesh.shape["seq"])
    batch = abstract_batch(config, model_cfg, config.data.batch_size, length)
    shardings = batch_shardings(batch, mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in batch.items()}
    step = jit_train_step(spec, config.optim, StepConfig.from_config(config.step), batch, forward=forward)
    return step, (spec.abstract, batch)


def train_program(config, mesh):
    """The stage's train step, exactly as ``lct_jax.train`` builds it."""
    return _train_like(config, mesh)


def embed_loss_forward(model, batch):
    """Forward without the decoder stack: token embedding (LongVA: + vision tower and splice) → final norm."""
    if "pixels" in batch:
        x, _ = model.embed(
            batch["inputs"],
            pixels=batch["pixels"],
            pixel_mask=batch["pixel_mask"],
            visual_index=batch["visual_index"],
        )
        lm = model.lm
    else:
        x, lm = model.embed_tokens(batch["inputs"]), model
    return lm.norm(x), model.head_weight()


def embed_loss_program(config, mesh):
    """The train step over the same state with the decoder layers skipped."""
    return _train_like(config, mesh, forward=embed_loss_forward)


VNIAH_ANSWER_TOKENS = 16  # scored positions of the V-NIAH forward (the longest needle answer, padded)


def vniah_program(config, mesh):
    """The V-NIAH / text-NIAH scoring forward (:func:`lct_jax.eval.scoring.build_score_forward`) of the stage's
    language model with bf16 params, as evaluation loads it, on one sequence of the config's row length (e.g.
    ``--config.data.max_len=432000`` for 3000 frames of 144 tokens)."""
    _, model_cfg, _ = build_model(config)
    lm = getattr(model_cfg, "text", model_cfg).replace(param_dtype="bfloat16")
    block = max(DEFAULT_BLOCKS[lm.ring_kernel])
    length = scoring.padded_length(get_length(config), mesh.shape["seq"], block=block)
    fwd = scoring.build_score_forward(
        lm, mesh, length, VNIAH_ANSWER_TOKENS, visual=config.stage != "text_extension"
    )
    return fwd.fn, fwd.abstract_inputs()


@dataclasses.dataclass(frozen=True)
class Program:
    build: Callable[[Any, Any], tuple[Any, tuple]]  # (config, mesh) -> (jitted fn, abstract args)
    about: str
    donated: tuple[int, ...] = (0,)  # arguments the jitted fn donates (the train state)


PROGRAMS: dict[str, Program] = {
    "train": Program(train_program, "the stage's train step (fwd + bwd + AdamW)"),
    "embed_loss": Program(embed_loss_program, "the train step without the decoder stack"),
    "vniah": Program(vniah_program, "the V-NIAH scoring forward (bf16 params, one sequence)", donated=()),
}


# ---------------------------------------------------------------------------------------------------- compile


@dataclasses.dataclass(frozen=True)
class Probe:
    """One compile of one program on one mesh at one row length."""

    mesh: tuple[int, int, int]  # (data, seq, model)
    length: int  # tokens per row as compiled
    rows: int  # global rows per step
    fits: bool
    peak: int  # bytes per chip: the compiler's peak (fits) or what the failure message says it needed
    arguments: int  # bytes per chip of the program's inputs (0 when unknown)
    host: int  # bytes per host the program keeps in host memory (offloaded activations)
    kernel: bool  # a Pallas (Mosaic) kernel lowered: 'tpu_custom_call' in the compiled program
    seconds: float
    error: str = ""
    estimated: bool = False  # from a ballast compile (compile_probe(estimate=True)), not a full compile

    @property
    def tokens_per_chip(self) -> float:
        return self.rows * self.length / math.prod(self.mesh)

    def mesh_str(self) -> str:
        return "x".join(map(str, self.mesh))


_SIZE = re.compile(r"([\d.]+)\s*([KMGT]?)i?B?\b")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _required_bytes(msg: str) -> int:
    """What an out-of-memory compile says it needed, e.g. '... HLO temporaries (18.49G) exceeds ...'."""
    for pat in (r"required for HLO temporaries \(([^)]*)\)", r"Used ([\d.]+\s*[KMGT]?i?B?) of"):
        m = re.search(pat, msg)
        if m:
            s = _SIZE.search(m.group(1))
            if s:
                return int(float(s.group(1)) * _UNITS[s.group(2)])
    return 0


def _argument_bytes(args) -> int:
    """Bytes per chip of abstract args that carry their shardings."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(args)
    )


def estimate_valid(config) -> bool:
    """Whether ballast estimates hold for ``config``: not checked with the saved layer inputs offloaded to host
    memory (there the compiled program's ``peak_memory_in_bytes`` is its device arguments plus its host buffers, so
    it cannot be compared: 7B stage 0 at 33.6M on (1, 128, 2) reports 26.08 GiB while the dump's HBM heap is 14.63
    GiB); without offload they agree within 1-6% (9.84 vs 9.76 GiB at 8M and 14.08 vs 14.00 at 12M on (1, 256,
    1); 8.93 vs 9.50 at 8M on (1, 128, 2))."""
    return config.model.remat != "offload"


def _oom(e: Exception) -> str:
    """The compiler's out-of-memory message, or '' when ``e`` is another failure."""
    msg = " ".join(str(e).split())
    i = msg.find("RESOURCE_EXHAUSTED")
    return msg[i:] if i >= 0 else ""


def compile_probe(
    config,
    topo: Topology,
    mesh_sizes: tuple[int, int, int],
    program: str = "train",
    rows: int | None = None,
    *,
    estimate: bool = False,
) -> Probe:
    """Compile ``program`` for ``config`` on ``mesh_sizes`` of ``topo``; returns what the compiler planned.

    ``estimate``: compile it next to a ballast argument of one HBM per chip, so the compile always fails at the
    memory check, which comes before the slow back end (seconds instead of minutes for LongVA-7B): the peak is
    what the failure reports less the ballast. Measured on the 7B step at 8M tokens on v5e:16x16 this reads
    9.84 GiB against the full compile's 9.76 on mesh (1, 256, 1), but 8.93 against 9.50 on (1, 128, 2): it can err
    several percent either way (the back end still schedules and fuses), which is why a search confirms its answer
    with a full compile (:func:`confirm`); the message prints 0.01 GiB steps, so a small program reads 0 to 10 MiB.
    The kernel is not lowered, so ``kernel`` is False.
    """
    rows = config.data.batch_size if rows is None else rows
    length = check_layout(config, mesh_sizes, rows)
    if estimate and not estimate_valid(config):
        raise ValueError(
            "estimates (--estimate, the ballast compile) are not validated for remat='offload' (the compiled "
            "program reports no device peak to check them against); drop --estimate"
        )
    config = with_overrides(config, rows=rows, mesh=mesh_sizes)
    mesh = make_mesh(*mesh_sizes, devices=topo.devices)
    t0 = time.perf_counter()
    fn, args = PROGRAMS[program].build(config, mesh)  # outside the mesh context, as training builds it
    arg_bytes = _argument_bytes(args)
    ballast = topo.hbm_bytes if estimate else 0
    if estimate:  # the program's donations carry over, one argument to the right
        ballast_arg = jax.ShapeDtypeStruct(
            (ballast,), jnp.uint8, sharding=NamedSharding(mesh, PartitionSpec())
        )
        inner, donated = fn, tuple(i + 1 for i in PROGRAMS[program].donated)
        fn = jax.jit(lambda b, *a: (inner(*a), b[:1]), donate_argnums=donated)
        args = (ballast_arg, *args)
    with jax.set_mesh(mesh):
        try:
            compiled = fn.trace(*args).lower().compile()
        except Exception as e:  # noqa: BLE001 - only an out-of-memory compile is an answer; re-raise the rest
            msg = _oom(e)
            if not msg:
                raise
            # the reported total counts the arguments (the ballast included), printed to 0.01 GiB
            reported = _required_bytes(msg)
            if estimate and not reported:
                raise RuntimeError(
                    f"cannot read the memory a ballast compile needed from: {msg[:300]}"
                ) from e
            needed = max(reported - ballast, 0)
            fits = estimate and needed <= topo.hbm_bytes
            return Probe(mesh_sizes, length, rows, fits, needed, arg_bytes, 0, False, time.perf_counter() - t0,
                         "" if fits else msg[:240], estimated=estimate)  # fmt: skip
    if estimate:
        raise RuntimeError(f"a program with a ballast of {ballast} bytes per chip compiled: cannot estimate")
    ma = compiled.memory_analysis()
    return Probe(
        mesh_sizes,
        length,
        rows,
        True,
        int(ma.peak_memory_in_bytes),
        int(ma.argument_size_in_bytes),
        int(ma.host_temp_size_in_bytes + ma.host_argument_size_in_bytes),
        "tpu_custom_call" in compiled.as_text(),
        time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------------------------- search


def candidate_meshes(config, topo: Topology, model_sizes: Sequence[int] = (1, 2, 4, 8)) -> list[tuple]:
    """(1, n / model, model) for each ``model`` dividing the chip count: the longest rows use every chip for
    the sequence and tensor axes (data parallelism only repeats rows)."""
    n = topo.num_devices
    return [(1, n // m, m) for m in model_sizes if n % m == 0 and n // m >= 1]


@dataclasses.dataclass
class MeshResult:
    mesh: tuple[int, int, int]
    granularity: int
    best: Probe | None = None  # the longest row that fits
    first_fail: Probe | None = None  # the shortest row that does not
    probes: list[Probe] = dataclasses.field(default_factory=list)
    stopped: str = ""  # why the search ended

    @property
    def ceiling(self) -> int:
        return self.best.length if self.best else 0


def _next_length(res: MeshResult, hbm: int, g: int) -> int | None:
    """Next row length to try: where a line through the two nearest measured points meets ``hbm``, kept
    strictly between the longest fit and the shortest failure; None when they are one step apart."""
    lo = res.best.length if res.best else 0
    hi = res.first_fail.length if res.first_fail else None
    if hi is not None and hi - lo <= max(g, lo // RESOLUTION // g * g):
        return None
    pts = sorted({(p.length, p.peak) for p in res.probes if p.peak > 0})
    if len(pts) >= 2:
        near = sorted(pts, key=lambda p: abs(p[1] - hbm))[:2]
        (l1, m1), (l2, m2) = near
        slope = (m2 - m1) / (l2 - l1) if l2 != l1 and m2 != m1 else None
        guess = l1 + (hbm - m1) / slope if slope and slope > 0 else None
    elif pts:
        (l1, m1), = pts  # fmt: skip
        guess = l1 * hbm / m1 * (0.98 if m1 < hbm else 1.0) if m1 > 0 else None
    else:
        guess = None
    if guess is None or not np.isfinite(guess):
        guess = 2 * max(lo, g) if hi is None else (lo + hi) / 2
    cand = int(guess // g * g)
    if hi is not None:  # keep a quarter of the bracket on each side: at worst it shrinks like a bisection
        margin = max(g, (hi - lo) // 4 // g * g)
        cand = min(max(cand, lo + margin), hi - margin)
    cand = max(cand, lo + g)
    if hi is None and res.best and cand > 4 * lo:
        cand = 4 * lo // g * g  # grow at most 4x per step while no failure bounds the search
    return cand


def search_mesh(
    config,
    topo: Topology,
    mesh_sizes: tuple[int, int, int],
    *,
    start: int,
    program: str = "train",
    on_probe: Callable[[Probe], None] | None = None,
    probe: Callable[[int], Probe] | None = None,
    estimate: bool | None = None,
) -> MeshResult:
    """The longest row (a multiple of :func:`length_granularity`) that fits on ``mesh_sizes``, one row per data
    shard per micro-batch; at most :data:`MAX_PROBES` compiles. ``probe(length)`` defaults to
    :func:`compile_probe` of ``program`` (``estimate``: ballast compiles, seconds each; :func:`confirm` then
    checks the answer with a full compile; default: where :func:`estimate_valid`)."""
    data, seq, _ = mesh_sizes
    estimate = estimate_valid(config) if estimate is None else estimate
    g = length_granularity(config, seq)
    res = MeshResult(mesh_sizes, g)
    rows = data * config.step.micro_batches
    if probe is None:
        probe = lambda n: compile_probe(
            with_overrides(config, length=n), topo, mesh_sizes, program, rows=rows, estimate=estimate
        )  # noqa: E731
    length = max(g, start // g * g)
    for _ in range(MAX_PROBES):
        p = probe(length)
        res.probes.append(p)
        if on_probe:
            on_probe(p)
        if p.fits and (res.best is None or p.length > res.best.length):
            res.best = p
        if not p.fits and (res.first_fail is None or p.length < res.first_fail.length):
            res.first_fail = p
        nxt = _next_length(res, topo.hbm_bytes, g)
        if nxt is None:
            res.stopped = "bracketed: the next multiple does not fit"
            return res
        if nxt < g:
            res.stopped = "not even the shortest row fits"
            return res
        length = nxt
    res.stopped = f"stopped after {MAX_PROBES} compiles without bracketing the ceiling"
    return res


def confirm(
    config,
    topo: Topology,
    res: MeshResult,
    program: str = "train",
    max_steps: int = 3,
    probe: Callable[[int], Probe] | None = None,
) -> Probe:
    """A full compile at the ceiling an estimated search found (the kernel lowered, the compiler's own peak); shorter
    while it does not fit (:func:`step_down`), at most ``max_steps`` compiles. Updates ``res.best``/``res.first_fail``.
    ``probe(length)`` replaces the compile (tests)."""
    if probe is None:
        probe = lambda n: compile_probe(  # noqa: E731
            with_overrides(config, length=n), topo, res.mesh, program, rows=res.best.rows
        )
    length = res.ceiling
    for _ in range(max_steps):
        p = probe(length)
        res.probes.append(p)
        if p.fits:
            res.best = p
            return p
        res.first_fail = p
        length = step_down(length, p.peak, topo.hbm_bytes, res.granularity)
        if length < res.granularity:
            break
    res.best = None
    return p


def step_down(length: int, need: int, hbm: int, g: int) -> int:
    """The next row to fully compile after ``length`` needed ``need`` bytes per chip (0: unknown) of ``hbm``: twice
    the proportional cut and at least 2% (estimates err by 1-6% and the compiler's buffer packing jumps by ~0.9 GiB
    between neighbouring lengths at 7B), rounded down to a multiple of ``g``, at least one ``g`` shorter."""
    cut = max(0.02, 2 * (need - hbm) / need if need > hbm else 0.0)
    return min(length - g, int(length * (1 - cut)) // g * g)


def saved_layer_input_bytes(config, probe: Probe) -> int:
    """Bytes per chip of the decoder's saved layer inputs (the remat scan's stacked carry) kept in HBM."""
    if config.model.remat == "offload":
        return 0
    _, model_cfg, _ = build_model(config)
    lm = getattr(model_cfg, "text", model_cfg)
    per_micro_batch = probe.tokens_per_chip / config.step.micro_batches  # one micro-batch's inputs at a time
    return int(lm.num_layers * lm.hidden_size * jnp.dtype(lm.dtype).itemsize * per_micro_batch)


def fit_line(probes: Sequence[Probe]) -> tuple[float, float]:
    """Least squares ``peak = a + b * tokens_per_chip`` over fitting probes: (a bytes, b bytes per token)."""
    pts = [(p.tokens_per_chip, p.peak) for p in probes if p.fits]
    if len({t for t, _ in pts}) < 2:
        raise ValueError("fit_line needs fitting probes at two or more lengths")
    t, m = np.asarray(pts, np.float64).T
    b, a = np.polyfit(t, m, 1)
    return float(a), float(b)

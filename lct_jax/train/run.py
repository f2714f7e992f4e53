"""``run(config, workdir)``: build mesh, model, data, state and loop from a stage config (``configs/*.py``).

``python -m lct_jax.train`` is a thin flag parser around this; tests and the demo call it directly.

Workdir layout::

    WORKDIR/config.json          the resolved config of the latest launch
    WORKDIR/train.lock           pid + host of the trainer using the workdir (see lct_jax.train.workdir)
    WORKDIR/checkpoints/<step>/  Orbax checkpoints (each also a model checkpoint for convert / init_from)
    WORKDIR/tb/                  TensorBoard event files

A run first checks that an existing workdir belongs to this stage and model (nothing is written before), then takes
the lock, then resumes from the newest checkpoint step that verifies (or ``--config.resume_step=N``).
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import json
import logging
import os
import sys
from pathlib import Path

import jax
import ml_collections
from absl import flags
from jax.experimental import multihost_utils

from lct_jax.cli import debug_requested, one_line
from lct_jax.convert.checkpoint import CONFIG_NAME, write_text_atomic
from lct_jax.data import loader
from lct_jax.data.loader import global_batch
from lct_jax.data.multimodal import MultimodalDataConfig
from lct_jax.data.options import PipelineOptions
from lct_jax.data.text import TextDataConfig
from lct_jax.data.tokenizer import load_tokenizer
from lct_jax.errors import CheckpointError, ConfigError, DiskFullError, is_disk_full
from lct_jax.sharding import make_mesh
from lct_jax.train.checkpoint import Checkpointer, choose_restore_step, load_params_for_init
from lct_jax.train.loop import LoopResult, train_loop
from lct_jax.train.metrics import EventWriter
from lct_jax.train.state import init_state, make_state_spec
from lct_jax.train.step import StepConfig, jit_train_step
from lct_jax.train.workdir import WorkdirLock, check_ownership

log = logging.getLogger("lct_jax.train")


def load_config(path_and_arg: str) -> ml_collections.ConfigDict:
    """``"configs/text_extension.py:size=tiny"`` → the config (what ``--config=`` does, for Python callers)."""
    import importlib.util  # noqa: PLC0415

    path, _, arg = path_and_arg.partition(":")
    spec = importlib.util.spec_from_file_location(f"lct_config_{Path(path).stem}", path)
    if spec is None:
        raise FileNotFoundError(f"config file {path!r} not found")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg or None)


def config_fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every field of a config as a dotted path (``data.field``, ``optim.groups.lm.lr``, ...)."""
    out = []
    for k, v in config.items():
        out.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            out += config_fields(v, f"{prefix}{k}.")
    return out


def flag_error_message(argv: list[str], err: Exception) -> str:
    """One line for a command line that did not parse. For a ``--config.<field>`` the stage config does not have:
    the closest fields it has (a "did you mean" over all its dotted field names)."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    names = [a[len("--config.") :].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if spec and names:
        try:
            fields = config_fields(load_config(spec))
        except Exception:  # noqa: BLE001 - the config itself does not load: report the original error
            fields = None
        for name in names if fields else ():
            if name not in fields:
                close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
                hint = "; did you mean " + " or ".join(f"--config.{c}" for c in close) + "?" if close else ""
                return f"--config.{name}: {spec.split(':')[0]} has no field {name!r}{hint}"
    text = str(err).strip().strip("'\"")
    return text.splitlines()[0] if text else type(err).__name__


def parse_flags(argv: list[str]):
    """absl's flag parsing for the entry points (``app.run(..., flags_parser=parse_flags)``), with a command line
    that does not parse (e.g. a mistyped ``--config.`` field) as one ``error:`` line and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # absl and ml_collections raise several types; all are the command line's fault
        if debug_requested(argv):
            raise
        print(f"error: {one_line(flag_error_message(list(argv), e))}", file=sys.stderr)
        sys.exit(2)


# ------------------------------------------------------------------------------------------------ model


def build_model(config):
    """(kind, model config, make_model(rngs)) for the stage."""
    from lct_jax.model.qwen2 import PRESETS, Qwen2  # noqa: PLC0415

    m = config.model
    if m.preset not in PRESETS:
        raise ValueError(f"config.model.preset={m.preset!r}; expected one of {sorted(PRESETS)}")
    lm_cfg = PRESETS[m.preset].replace(
        rope_theta=float(m.rope_theta),
        dtype=m.dtype,
        remat=m.remat,
        attention=m.attention,
        ring_kernel=m.ring_kernel,
        ring_head_passes=m.ring_head_passes,
        mlp_chunk=m.mlp_chunk,
        embed_chunk=m.embed_chunk,
    )
    if config.stage == "text_extension":
        return "qwen2", lm_cfg, lambda rngs: Qwen2(lm_cfg, rngs=rngs)
    from lct_jax.model.clip import PRESETS as CLIP_PRESETS  # noqa: PLC0415
    from lct_jax.model.longva import LongVA, LongVAConfig  # noqa: PLC0415

    if config.vision.preset not in CLIP_PRESETS:
        raise ValueError(
            f"config.vision.preset={config.vision.preset!r}; expected one of {sorted(CLIP_PRESETS)}"
        )
    vision = CLIP_PRESETS[config.vision.preset].replace(dtype=m.dtype, remat=m.remat)
    cfg = LongVAConfig(text=lm_cfg, vision=vision)
    return "longva", cfg, lambda rngs: LongVA(cfg, rngs=rngs)


# ------------------------------------------------------------------------------------------------- data


def _paths(spec: str) -> tuple[str, ...]:
    out = []
    for p in filter(None, (s.strip() for s in spec.split(","))):
        hits = sorted(glob.glob(p))
        if not hits:
            raise FileNotFoundError(f"config.data.paths: {p!r} matches no file")
        out += hits
    return tuple(out)


def pipeline_options(config, mesh):
    # Rows are split over the mesh's 'data' axis, not over processes: hosts that share 'data' coordinates (the
    # 'seq' axis spans them for long rows) must read the same shard and build identical rows.
    index, count = loader.mesh_data_shard(mesh)
    if config.data.batch_size % count:
        raise ValueError(
            f"config.data.batch_size={config.data.batch_size} must divide by the {count} data shards "
            f"(groups of processes along the mesh's 'data' axis)"
        )
    return PipelineOptions(
        batch_size=config.data.batch_size // count,
        shard_index=index,
        shard_count=count,
        seq_shards=mesh.shape["seq"],
        shuffle=config.data.shuffle,
        seed=config.seed,
        num_workers=config.data.num_workers,
        strict=config.data.strict,
        max_skip_fraction=config.data.max_skip_fraction,
        skip_window=config.data.skip_window,
        max_record_bytes=config.data.max_record_bytes,
    )


def check_vocab(config, model_cfg) -> None:
    """Token ids at or above the model's vocabulary would index past its embedding (silently clamped on device,
    then non-finite losses): refuse a tokenizer larger than the model."""
    lm = getattr(model_cfg, "text", model_cfg)
    n = load_tokenizer(config.data.tokenizer).vocab_size
    if n > lm.vocab_size:
        raise ConfigError(
            f"config.data.tokenizer={config.data.tokenizer!r} has {n} token ids but the model "
            f"(config.model.preset={config.model.preset!r}) embeds only {lm.vocab_size}; choose a matching "
            "tokenizer or model"
        )


def multimodal_data_config(config, model_cfg, options: PipelineOptions | None = None) -> MultimodalDataConfig:
    """Stage 1/2's :class:`MultimodalDataConfig` from ``config.data``; the tower of ``model_cfg`` decides the tile
    size and visual tokens per tile. ``options`` (grain sharding, workers) only matter to a loader."""
    d = config.data
    if not d.annotations:
        raise ValueError("config.data.annotations is empty: give the LLaVA-style .json/.jsonl file")
    return MultimodalDataConfig(
        annotations=d.annotations,
        max_len=d.max_len,
        max_tiles=d.max_tiles,
        image_root=d.image_root,
        template=d.template,
        image_mode=d.image_mode,
        tokenizer=d.tokenizer,
        tile=model_cfg.tile,  # the tower's input size decides these two, not the data config
        tokens_per_tile=model_cfg.tokens_per_tile,
        num_frames=d.num_frames,
        pack=d.pack,
        options=options or PipelineOptions(),
    )


def build_data(config, mesh, model_cfg):
    """The stage's grain iterator (batches of this process's rows) for the model ``model_cfg``
    (:func:`build_model`'s second value), whose vocabulary the tokenizer must fit."""
    d = config.data
    check_vocab(config, model_cfg)
    if config.stage == "text_extension":
        cfg = TextDataConfig(
            seq_len=d.seq_len,
            source=d.source,
            paths=_paths(d.paths) if d.source != "tfds" else (),
            tfds_name=d.tfds_name,
            tfds_split=d.tfds_split,
            data_dir=d.data_dir or None,
            field=d.field,
            record_format=d.record_format,
            tokenizer=d.tokenizer,
            per_document=d.per_document,
            options=pipeline_options(config, mesh),
        )
        if d.source != "tfds" and not cfg.paths:
            raise ValueError(
                "config.data.paths is empty: give the training files (--config.data.paths=a.jsonl,...)"
            )
        return iter(loader.text_dataset(cfg))
    cfg = multimodal_data_config(config, model_cfg, pipeline_options(config, mesh))
    return iter(loader.multimodal_dataset(cfg))


# -------------------------------------------------------------------------------------------------- run


def run(config, workdir: str | os.PathLike, *, mesh=None, data_iter=None) -> LoopResult:
    """Train ``config`` in ``workdir``; resumes from the newest checkpoint there that verifies.

    Raises :class:`lct_jax.errors.WorkdirError` (before writing anything) when the workdir belongs to another
    stage or model or another trainer holds it, :class:`~lct_jax.errors.CheckpointError` when no checkpoint there
    can be restored, :class:`~lct_jax.errors.DiskFullError` when the disk fills up.
    """
    workdir = Path(workdir).absolute()
    mesh = mesh or make_mesh(config.mesh.data, config.mesh.seq, config.mesh.model)
    kind, model_cfg, make_model = build_model(config)
    check_ownership(workdir, config.stage, kind, model_cfg)  # reads only
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    try:
        with lock:
            return _run(config, workdir, mesh, kind, model_cfg, make_model, data_iter)
    except Exception as e:
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise DiskFullError(workdir) from e  # Orbax/tensorstore report it inside their own errors
        raise


def _run(config, workdir: Path, mesh, kind, model_cfg, make_model, data_iter) -> LoopResult:
    primary = jax.process_index() == 0
    optim = config.optim
    spec = make_state_spec(make_model, optim, mesh)
    if primary:
        write_text_atomic(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")
    data_iter = data_iter if data_iter is not None else build_data(config, mesh, model_cfg)
    ckpt_dir = workdir / "checkpoints"
    # process 0 verifies and renames bad steps aside first; then the others verify what is left (the same files)
    resume = choose_restore_step(ckpt_dir, config.resume_step) if primary else None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("lct_jax: checkpoint steps verified")
        resume = resume if primary else choose_restore_step(ckpt_dir, config.resume_step, move=False)
    ckpt = Checkpointer(
        ckpt_dir,
        every=config.checkpoint.every,
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    writer = None
    try:
        ckpt.write_model_config(kind, model_cfg, stage=config.stage, **_source_dtype(config, ckpt_dir))
        if resume is not None:
            try:
                state = ckpt.restore(spec, optim, data_iter, step=resume)
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0][:300]
                raise CheckpointError(
                    f"checkpoint step {resume} in {ckpt.directory} could not be restored ({type(e).__name__}: "
                    f"{first}); choose another step with --config.resume_step=N"
                ) from e
            print(f"resumed from {ckpt.directory}/{resume} (step {int(state.step)})")
        first = next(data_iter)  # before initializing: data that yields nothing fails in seconds
        if resume is None:
            given = config.init_from or config.get("init_vision_from")
            params = init_params(config, kind, model_cfg) if given else None
            state = init_state(spec, make_model, optim, seed=config.seed, params=params)
            if not given:
                print(f"initialized from random weights (seed {config.seed})")
        step_cfg = StepConfig.from_config(config.step)
        step_fn = jit_train_step(spec, optim, step_cfg, first)
        # steps after the start were logged by a run that died before saving them: TensorBoard drops them
        writer = EventWriter(workdir / "tb", purge_step=int(state.step) + 1) if primary else None
        with jax.set_mesh(mesh):
            return train_loop(
                state,
                step_fn,
                _prepend(first, data_iter),
                put_batch=lambda b: global_batch(b, mesh),
                num_steps=config.num_steps,
                checkpointer=ckpt,
                writer=writer,
                log_every=config.log_every,
                max_nonfinite_in_row=config.max_nonfinite_in_row,
                progress=config.progress,
            )
    finally:
        ckpt.close()
        if writer is not None:
            writer.close()


def _source_dtype(config, ckpt_dir: Path) -> dict:
    """``{"source_dtype": ...}``: the dtype the weights came in with (recorded by ``convert import-hf``), kept in
    this workdir's ``lct_config.json`` so that ``export-hf`` writes it by default; ``{}`` when nothing recorded it."""
    candidates = [ckpt_dir / CONFIG_NAME]
    if config.init_from:
        p = Path(config.init_from)
        candidates += [p / CONFIG_NAME, p / "checkpoints" / CONFIG_NAME, p.parent / CONFIG_NAME]
    for c in candidates:
        if c.is_file():
            with contextlib.suppress(OSError, ValueError):
                dtype = json.loads(c.read_text()).get("source_dtype")
                if dtype:
                    return {"source_dtype": dtype}
    return {}


class _prepend:
    """Yield ``first`` then the rest of ``it``; ``get_state``/``counts`` are the underlying iterator's (``first``
    was already taken from it, so its state is right once ``first`` has been yielded)."""

    def __init__(self, first, it):
        self._first, self._it = first, it
        self.inner = it  # what the checkpointer saves (a grain iterator keeps its per-process Orbax handler)

    def __next__(self):
        if self._first is not None:
            b, self._first = self._first, None
            return b
        return next(self._it)

    def __iter__(self):
        return self

    def __getattr__(self, name):
        return getattr(self._it, name)


def init_params(config, kind: str, model_cfg) -> dict:
    """The (possibly partial) params a run starts from: ``init_from`` (a whole model; for LongVA a Qwen2
    checkpoint becomes the LM) and, for LongVA, ``init_vision_from`` (a Hugging Face CLIP directory). Whatever is
    not given (e.g. the projector in stage 1) is randomly initialized."""
    params: dict = {}
    if config.init_from:
        loaded = load_params_for_init(config.init_from)
        if kind == "longva" and "lm" not in loaded:  # a text-stage (Qwen2) checkpoint
            loaded = {"lm": loaded}
        params.update(loaded)
        print(f"initialized {sorted(loaded)} from {config.init_from}")
    if kind == "longva" and config.get("init_vision_from"):
        from lct_jax.convert.clip import hf_to_params  # noqa: PLC0415

        _, vision = hf_to_params(config.init_vision_from, model_cfg.vision)
        params["vision"] = vision
        print(f"initialized the vision tower from {config.init_vision_from}")
    return params

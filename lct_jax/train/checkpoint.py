"""Training checkpoints with Orbax: async saves every N steps, keep the last K, resume the latest.

Layout (one Orbax ``CheckpointManager`` directory)::

    WORKDIR/checkpoints/
      lct_config.json        model kind + config (lct_jax.convert.checkpoint format)
      <step>/params/         all params (trainable and frozen), a plain PyTree item: a model checkpoint
      <step>/opt_state/      optimizer state over the trainable params
      <step>/train/          step, rng, nonfinite counter
      <step>/data/           the data iterator state (JSON), so a resumed run sees the same next batches

Because ``<step>/params`` sits under a directory holding ``lct_config.json``, every training step directory is
also a model checkpoint for the convert CLI (``python -m lct_jax.convert export-hf --ckpt WORKDIR/checkpoints/<step>
...``) and for the next stage's ``init_from``.

Restores use the *current* run's abstract state (shapes + shardings), so a checkpoint saved on one mesh shape
restores onto another. The data iterator restores exactly when this process's saved state has the current data
layout (shard count, workers); a checkpoint written by another process count or data sharding resumes its data
stream as ``lct_jax.data.loader.elastic_state`` documents, with a warning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from lct_jax.data.loader import restore_saved_state, saved_state_matches
from lct_jax.train.optimizer import merge_params, split_trainable
from lct_jax.train.state import StateSpec, TrainState

ITEMS = ("params", "opt_state", "train", "data")


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for :class:`TrainState` + data iterator state."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint {every=} and {keep=} must be >= 1")
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # we decide when to save (every N, on SIGTERM, at the end)
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def write_model_config(self, kind: str, cfg) -> None:
        """``lct_config.json`` next to the step dirs, so each ``<step>`` is a model checkpoint (see module doc)."""
        from lct_jax.convert.checkpoint import CONFIG_NAME, config_to_dict  # noqa: PLC0415

        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"kind": kind, "config": config_to_dict(cfg)}, indent=2) + "\n"
            (self.directory / CONFIG_NAME).write_text(text)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iter: Any = None, *, force: bool = False) -> bool:
        """Start an async save of ``state`` (and the data iterator's position) at its step, if due or ``force``.
        Returns whether it saved."""
        step = int(state.step)
        if not force and step % self.every:
            return False
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state.all_params()),
            opt_state=ocp.args.StandardSave(state.opt_state),
            train=ocp.args.StandardSave({"step": state.step, "rng": state.rng, "nonfinite": state.nonfinite}),
            data=_data_args(data_iter, restore=False),
        )
        return bool(self.manager.save(step, args=args, force=True))

    def restore(self, spec: StateSpec, optim, data_iter: Any = None, step: int | None = None) -> TrainState:
        """Restore the state at ``step`` (default: latest) onto ``spec``'s mesh and shardings; ``data_iter`` (if
        given) is moved in place to where it was when that step was saved (or, after a change of process count or
        data sharding, to where ``elastic_state`` maps it). Without ``data_iter`` the data item is not read."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        a = spec.abstract
        items = dict(
            params=ocp.args.StandardRestore(merge_params(a.params, a.frozen)),
            opt_state=ocp.args.StandardRestore(a.opt_state),
            train=ocp.args.StandardRestore({"step": a.step, "rng": a.rng, "nonfinite": a.nonfinite}),
        )
        inner = getattr(data_iter, "inner", data_iter)
        data_dir = self.directory / str(step) / "data"
        from_other_layout = _saved_by_other_layout(inner, data_dir)
        if inner is not None and not from_other_layout:
            items["data"] = _data_args(data_iter, restore=True)
        got = self.manager.restore(step, args=ocp.args.Composite(**items))
        if from_other_layout:
            restore_saved_state(inner, data_dir)
        params, frozen = split_trainable(got.params, optim)
        state = TrainState(
            step=got.train["step"],
            params=params,
            frozen=frozen,
            opt_state=got.opt_state,
            rng=got.train["rng"],
            nonfinite=got.train["nonfinite"],
        )
        if inner is not None and not _is_grain(inner):
            inner.set_state(got.data)
        return state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _is_grain(it) -> bool:
    import grain  # noqa: PLC0415

    return isinstance(it, grain.DatasetIterator)


def _saved_by_other_layout(inner, data_dir: Path) -> bool:
    """A grain iterator whose state in ``data_dir`` was saved by another process count or data sharding (restored
    by ``lct_jax.data.loader.restore_saved_state``); the same layout restores through grain's own handler."""
    return inner is not None and _is_grain(inner) and not saved_state_matches(inner, data_dir)


def _data_args(data_iter, restore: bool):
    """grain iterators go through grain's own Orbax handler (one JSON file per process); any other iterator with
    ``get_state() -> dict`` / ``set_state(dict)`` is stored as JSON; no iterator stores ``{}``."""
    data_iter = getattr(data_iter, "inner", data_iter)
    if data_iter is not None and _is_grain(data_iter):
        import grain.checkpoint as gc  # noqa: PLC0415

        return gc.CheckpointRestore(data_iter) if restore else gc.CheckpointSave(data_iter)
    if restore:
        return ocp.args.JsonRestore()
    return ocp.args.JsonSave({} if data_iter is None else data_iter.get_state())


def load_params_for_init(path: str | Path) -> dict:
    """Params (nested dict of numpy) for ``init_from``: a model checkpoint dir (``lct_config.json`` + ``params``,
    e.g. from ``convert import-hf``), a training step dir, or a training workdir/checkpoint dir (its latest step)."""
    from lct_jax.convert.checkpoint import PARAMS_ITEM, restore_params_numpy  # noqa: PLC0415

    path = Path(path).absolute()
    candidates = [path]
    for base in (path, path / "checkpoints"):
        if base.is_dir():
            steps = sorted((int(p.name) for p in base.iterdir() if p.name.isdigit()), reverse=True)
            candidates += [base / str(s) for s in steps[:1]]
    for c in candidates:
        if (c / PARAMS_ITEM).is_dir():
            return restore_params_numpy(c / PARAMS_ITEM)
    raise FileNotFoundError(
        f"init_from={str(path)!r}: no '{PARAMS_ITEM}' item there, in its latest step, or in checkpoints/<step>; "
        "expected a model checkpoint dir (convert import-hf), a training step dir or a training workdir"
    )

"""Who may use a training workdir: it must belong to this stage and model, and one trainer holds it at a time.

- :func:`check_ownership` reads ``WORKDIR/checkpoints/lct_config.json`` (model kind, model config, stage) and
  ``WORKDIR/config.json`` (the stage config of the last launch) and raises :class:`lct_jax.errors.WorkdirError`
  when they belong to another stage or to a model with other parameter shapes. ``run()`` calls it before it writes
  anything, so a wrong ``--workdir`` leaves the workdir exactly as it was.
- :class:`WorkdirLock` is ``WORKDIR/train.lock`` holding ``{"pid", "host", "started"}``, created with ``O_EXCL``:
  a second trainer on the same workdir stops with an error naming the holder. A lock whose process is gone on this
  host (a ``kill -9``, a crash) is stale and taken over with a warning. The lock is released when the run returns
  or raises, and on SIGTERM (turned into ``SystemExit`` outside the training loop, which handles SIGTERM itself).
  On multi-host runs only process 0 takes it (and only process 0 writes workdir files).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from lct_jax.convert.checkpoint import CONFIG_NAME, config_from_dict, config_to_dict, param_shapes
from lct_jax.convert.mapping import ConversionError
from lct_jax.errors import WorkdirError

log = logging.getLogger("lct_jax.train")

LOCK_NAME = "train.lock"
_UNREADABLE_GRACE_S = 60.0  # a lock file without content yet is a trainer that is starting, unless this old


def _describe(kind: str, cfg: dict) -> str:
    if kind == "longva":
        t, v = cfg["text"], cfg["vision"]
        return (
            f"longva (LM {t['num_layers']} layers x {t['hidden_size']}, vocab {t['vocab_size']}; vision "
            f"{v['num_layers']} layers x {v['hidden_size']})"
        )
    return f"{kind} ({cfg['num_layers']} layers x {cfg['hidden_size']}, vocab {cfg['vocab_size']})"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WorkdirError(
            f"{path} is unreadable ({e}); is this a training workdir? Use another --workdir"
        ) from None


def check_ownership(workdir: Path, stage: str, kind: str, model_cfg) -> None:
    """Raise :class:`WorkdirError` unless ``workdir`` is new or holds this ``stage`` and model (same kind and
    parameter shapes). Reads only."""
    meta_path, config_path = workdir / "checkpoints" / CONFIG_NAME, workdir / "config.json"
    meta = _read_json(meta_path) if meta_path.exists() else None
    saved_stage = (meta or {}).get("stage") or (
        _read_json(config_path).get("stage") if config_path.exists() else None
    )
    fix = (
        f"nothing was changed there. Use another --workdir (or --config.init_from={workdir} to start from it)"
    )
    if saved_stage is not None and saved_stage != stage:
        what = f" with {_describe(meta['kind'], meta['config'])}" if meta else ""
        raise WorkdirError(
            f"workdir {workdir} belongs to stage {saved_stage!r}{what}, but this run is stage {stage!r}; {fix}"
        )
    if meta is None:
        return
    here = _describe(kind, config_to_dict(model_cfg))
    if meta.get("kind") != kind:
        raise WorkdirError(
            f"workdir {workdir} holds {_describe(meta['kind'], meta['config'])} checkpoints, but this run trains "
            f"{here}; {fix}"
        )
    try:
        saved = param_shapes(kind, config_from_dict(kind, meta["config"]))
    except (ConversionError, TypeError, ValueError) as e:
        raise WorkdirError(f"{meta_path}: cannot read its model config ({e}); {fix}") from None
    now = param_shapes(kind, model_cfg)
    if saved != now:
        diff = next((k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)), None)
        raise WorkdirError(
            f"workdir {workdir} holds checkpoints of {_describe(kind, meta['config'])}, but this run trains {here} "
            f"(param {diff}: {saved.get(diff)} there, {now.get(diff)} here); {fix}"
        )


class WorkdirLock:
    """``WORKDIR/train.lock`` for the duration of a run (see the module docstring); a context manager."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        self._old_handler = None

    @staticmethod
    def _read(path: Path) -> dict | None:
        """The holder recorded in a lock file, ``None`` if unreadable; ``FileNotFoundError`` if it is gone."""
        try:
            holder = json.loads(path.read_text())
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) and "pid" in holder and "host" in holder else None

    def _is_stale(self, holder: dict | None) -> bool:
        if holder is None:  # no content yet (a trainer that is starting) or garbage; stale once it is old
            return time.time() - self.path.stat().st_mtime > _UNREADABLE_GRACE_S
        if holder["host"] != self.me["host"]:
            return False  # cannot tell whether a process on another host is alive
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def acquire(self) -> WorkdirLock:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = self._read(self.path)
                    if not self._is_stale(holder):
                        who = (
                            f"process {holder['pid']} on host {holder['host']}"
                            if holder
                            else "another trainer"
                        )
                        raise WorkdirError(
                            f"workdir {self.workdir} is in use by {who} (lock {self.path}); wait for it to finish or "
                            f"use another --workdir. If no trainer runs there any more, delete {self.path}"
                        )
                    self._take_over(holder)
                except FileNotFoundError:  # released meanwhile: try again
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            return self
        raise WorkdirError(f"could not take the lock {self.path} (other trainers keep taking it); try again")

    def _take_over(self, holder: dict | None) -> None:
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        os.rename(self.path, aside)  # atomic: of two trainers taking over, one moves the stale lock
        try:
            if self._read(aside) != holder:  # moved someone's fresh lock instead: put it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                return
            who = f"process {holder['pid']} on host {holder['host']}" if holder else "an unreadable lock"
            log.warning(
                "workdir %s: taking over the stale lock of %s (that process is gone)", self.workdir, who
            )
            print(f"taking over the stale lock {self.path} of {who} (that process is gone)")
        finally:
            aside.unlink(missing_ok=True)

    def release(self) -> None:
        try:
            if self._read(self.path) == self.me:
                self.path.unlink()
        except FileNotFoundError:
            pass

    def _on_sigterm(self, signum, frame):
        del frame
        raise SystemExit(128 + signum)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
            self._old_handler = None
        self.release()

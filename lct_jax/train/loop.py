"""The training loop: a plain, testable function around the jitted step.

Per step: next host batch → global arrays → ``step_fn`` → metrics (console every ``log_every`` steps and
TensorBoard event files) → checkpoint when due. Besides the step's own metrics (``loss``, ``loss_tokens``, ...) the
loop logs ``step_time_s``, ``nonpad_tokens_per_s`` (this process's non-padding tokens, ``segment_ids > 0``, per
second: padding slots of short stage-2 samples do not count) and the data pipeline's ``skipped/<reason>`` counts.
Also:

- **progress**: a tqdm bar over the run's total steps with ETA (starts at the resumed step);
- **preemption**: SIGTERM (what a TPU VM gets before it is reclaimed) makes the loop finish the current step, save
  a checkpoint at that step, wait for it to be written, and return ``status='preempted'``;
- **non-finite gradients**: the step skips such updates and counts them; after ``max_nonfinite_in_row`` skipped
  steps in a row the loop stops with :class:`NonFiniteError` naming the steps and what to try.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from lct_jax.train.checkpoint import Checkpointer
from lct_jax.train.metrics import EventWriter, format_metrics
from lct_jax.train.state import TrainState

log = logging.getLogger("lct_jax.train")


class NonFiniteError(RuntimeError):
    pass


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    history: list[dict[str, float]]  # metrics of every step run in this call, in order
    status: str  # 'done' | 'preempted' | 'data_exhausted'


class _SigtermFlag:
    """Sets a flag on SIGTERM while active (main thread only; elsewhere it is inert)."""

    def __init__(self):
        self.raised = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.raised = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _real_tokens(batch: dict) -> int:
    """Tokens of this process's batch that are not padding (``segment_ids > 0``; every slot without them)."""
    if "segment_ids" in batch:
        return int(np.count_nonzero(batch["segment_ids"]))
    return int(np.prod(batch["inputs"].shape))


def train_loop(
    state: TrainState,
    step_fn: Callable,
    data_iter: Iterator[dict],
    *,
    put_batch: Callable[[dict], dict],
    num_steps: int,
    checkpointer: Checkpointer | None = None,
    writer: EventWriter | None = None,
    log_every: int = 10,
    max_nonfinite_in_row: int = 5,
    progress: bool = True,
    print_fn: Callable[[str], Any] = print,
) -> LoopResult:
    """Run ``step_fn`` from ``state.step`` up to ``num_steps`` (total, not additional)."""
    start = int(state.step)
    history: list[dict[str, float]] = []
    bad_in_row = 0
    status = "done"
    bar = tqdm(
        total=num_steps, initial=start, disable=not progress, desc="train", unit="step", dynamic_ncols=True
    )
    counts_fn = getattr(data_iter, "counts", None)
    with _SigtermFlag() as sigterm:
        step = start
        while step < num_steps:
            t0 = time.perf_counter()
            try:
                host_batch = next(data_iter)
            except StopIteration:
                status = "data_exhausted"
                print_fn(f"data exhausted after step {step}; stopping")
                break
            tokens = _real_tokens(host_batch)
            state, m = step_fn(state, put_batch(host_batch))
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            step += 1
            dt = time.perf_counter() - t0
            m.update(step_time_s=dt, nonpad_tokens_per_s=tokens / dt)
            if counts_fn is not None:
                m.update({k: float(v) for k, v in counts_fn().items() if k.startswith("skipped/")})
            history.append(m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['nonpad_tokens_per_s']:.3g}")
            if writer is not None:
                writer.scalars(step, {k: v for k, v in m.items() if k != "finite"})
            if log_every and (step % log_every == 0 or step == num_steps or step == start + 1):
                shown = {
                    k: v
                    for k, v in m.items()
                    if k not in ("finite", "nonfinite_total") and not (k.startswith("skipped/") and v == 0)
                }
                bar.write(format_metrics(step, shown)) if progress else print_fn(format_metrics(step, shown))
            if m["finite"]:
                bad_in_row = 0
            else:
                bad_in_row += 1
                log.warning(
                    "step %d: non-finite gradients (grad_norm=%s); update skipped", step, m["grad_norm"]
                )
                if bad_in_row >= max_nonfinite_in_row:
                    bar.close()
                    raise NonFiniteError(
                        f"{bad_in_row} steps in a row ({step - bad_in_row + 1}..{step}) had non-finite gradients "
                        f"and were skipped (max_nonfinite_in_row={max_nonfinite_in_row}); the params are those of "
                        f"step {step - bad_in_row}. Lower the learning rate, check the data, or resume from an "
                        "earlier checkpoint."
                    )
            if checkpointer is not None:
                if sigterm.raised:
                    checkpointer.save(state, data_iter, force=True)
                    checkpointer.wait()
                    status = "preempted"
                    print_fn(
                        f"SIGTERM: saved a checkpoint at step {step} in {checkpointer.directory}; exiting"
                    )
                    break
                checkpointer.save(state, data_iter)
            elif sigterm.raised:
                status = "preempted"
                print_fn(f"SIGTERM at step {step}: no checkpointer, exiting without saving")
                break
    bar.close()
    if checkpointer is not None and status != "preempted":
        checkpointer.save(state, data_iter, force=True)  # the final step, whatever the interval
        checkpointer.wait()
    return LoopResult(state=state, history=history, status=status)

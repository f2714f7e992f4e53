"""What the evaluation commands share: the user-error type, the list of errors shown as one line, distributed start.

A subcommand (a module with ``add_arguments(parser)`` and ``run(args) -> int``, listed in
:mod:`lct_jax.eval.__main__`) raises :class:`EvalError` (or one of :data:`USER_ERRORS`) for anything the user can
fix; the entry point prints it as one ``error: ...`` line and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os

from lct_jax.convert.mapping import ConversionError
from lct_jax.data.unires import BadImageError
from lct_jax.data.video import BadVideoError
from lct_jax.eval.store import StoreError


class EvalError(ValueError):
    """A mistake the user can fix (a flag, a path, the wrong checkpoint); the message says how."""


# shown as `error: <message>` with exit status 2
USER_ERRORS = (
    EvalError,
    StoreError,
    BadVideoError,
    BadImageError,
    ConversionError,
    FileNotFoundError,
    FileExistsError,
)


def add_distributed_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--distributed",
        choices=("auto", "yes", "no"),
        default="auto",
        help="call jax.distributed.initialize() first: auto = on a multi-host Cloud TPU VM (every host runs the "
        "same command)",
    )


def start_distributed(mode: str) -> None:
    """Connect the hosts of a pod (as ``python -m lct_jax.train --distributed`` does)."""
    import jax  # noqa: PLC0415 - only the commands that compute need jax; make-video/make-needles start fast

    # Cloud TPU VMs list every host of the slice here; more than one host = a pod slice
    on_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or bool(
        os.environ.get("MEGASCALE_COORDINATOR_ADDRESS")
    )
    if mode == "yes" or (mode == "auto" and on_pod):
        jax.distributed.initialize()

"""What the evaluation commands share: the user-error type and the distributed start of the ones that compute.

A subcommand (a module with ``add_arguments(parser)`` and ``run(args) -> int``, listed in
:mod:`lct_jax.eval.__main__`) raises :class:`EvalError` (or another :class:`lct_jax.errors.UserError`) for
anything the user can fix; the entry point prints it as one ``error: ...`` line and exits with status 2, without a
traceback (:func:`lct_jax.cli.report_errors`). The commands that run a model take the same distributed flags as
``python -m lct_jax.train`` (:mod:`lct_jax.train.distributed`): every host of a pod runs the same command.
"""

from __future__ import annotations

import argparse

from lct_jax.cli import skip_absent_tpu
from lct_jax.errors import UserError


class EvalError(UserError, ValueError):
    """A mistake the user can fix (a flag, a path, the wrong checkpoint); the message says how."""


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--distributed`` and the explicit settings, as ``python -m lct_jax.train`` has them."""
    # imports jax: only the commands that compute take these flags; make-video/make-needles start without it
    from lct_jax.train import distributed  # noqa: PLC0415

    def flag(key, **kw):  # train's spelling (--process_id) and this CLI's (--process-id)
        names = dict.fromkeys((f"--{key}", f"--{key.replace('_', '-')}"))
        parser.add_argument(*names, help=distributed.FLAG_HELP[key], **kw)

    flag("distributed", choices=distributed.MODES, default="auto")
    for key in distributed.ENV_VARS:
        flag(key, default=None)
    flag("distributed_timeout", type=float, default=distributed.TIMEOUT_S)


def start_distributed(args: argparse.Namespace) -> None:
    """Pick the platform (CPU on a host without accelerators) and connect the hosts of a pod, before any device
    is touched; prints which (one line)."""
    from lct_jax.train import distributed  # noqa: PLC0415 - imports jax (see above)

    skip_absent_tpu()
    given = {key: getattr(args, key) for key in distributed.ENV_VARS}
    print(
        distributed.start(args.distributed, distributed.settings(given), args.distributed_timeout), flush=True
    )

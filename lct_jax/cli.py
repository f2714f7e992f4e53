"""What the command-line entry points share: one-line errors and a quiet start on hosts without a TPU.

Every failure the user can cause (a :class:`lct_jax.errors.UserError`, a file that is missing or cannot be
written, a full disk) ends in one line on stderr and exit code 2::

    error: output /data/out exists and is a file, not a directory; choose another --out

A genuine bug keeps its traceback. ``--debug`` on the command line (or ``LCT_DEBUG=1``) shows the traceback of every
failure.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence

from lct_jax.errors import DiskFullError, UserError, is_disk_full

# file-system errors that come from the user's paths or machine, not from a bug, with the fix to suggest
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.EACCES: "choose a location you can write to, or fix its permissions",
    errno.EPERM: "choose a location you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only; choose another location",
    errno.EEXIST: "remove it or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "it is a directory; give a file",
    errno.ENOTEMPTY: "the directory is not empty; remove it or choose another path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def debug_requested(argv: Sequence[str] = ()) -> bool:
    return "--debug" in argv or os.environ.get("LCT_DEBUG", "") not in ("", "0")


def _first_filename(e: BaseException | None) -> str | None:
    while e is not None:
        if isinstance(e, OSError) and e.filename:
            return os.fspath(e.filename)
        e = e.__cause__ or e.__context__
    return None


def user_message(e: BaseException) -> str | None:
    """The one-line message for a failure the user can fix, or ``None`` for a bug (keep the traceback)."""
    if isinstance(e, UserError):
        return str(e)
    if is_disk_full(e):
        return str(DiskFullError(_first_filename(e)))
    if isinstance(e, OSError) and e.errno in _OS_FIXES:
        where = f"{os.fspath(e.filename)}: " if e.filename else ""
        return f"{where}{e.strerror}; {_OS_FIXES[e.errno]}"
    return None


def one_line(message: str) -> str:
    return "; ".join(part.strip() for part in message.splitlines() if part.strip())


class _OrbaxTracebacks(logging.Filter):
    """Drops log records that carry a traceback from Orbax (a failed background write, a failed finalize) or of a
    full disk from any logger (asyncio's "Task exception was never retrieved" for a write that fails late): Orbax
    re-raises the same exception to its caller, which reports it (one line for a full disk, a traceback for a
    bug); ``--debug`` keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None:
            return True
        return not (f"{os.sep}orbax{os.sep}" in record.pathname or is_disk_full(record.exc_info[1]))


def _without_closed_loop_noise(hook):
    """``sys.unraisablehook`` that drops ``RuntimeError('Event loop is closed')``: after a failed Orbax save (a
    full disk) tensorstore still completes the other writes from its own threads, and each completion callback that
    finds Orbax's event loop already closed is printed as an unraisable traceback."""

    def unraisablehook(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            hook(u)

    return unraisablehook


def report_errors(fn: Callable[[], int], argv: Sequence[str] = ()) -> int:
    """``fn()``'s exit code, or 2 after printing ``error: ...`` for a failure the user can fix."""
    if debug_requested(argv):
        return fn()
    quiet, hook = _OrbaxTracebacks(), sys.unraisablehook
    handlers = [*logging.getLogger().handlers, *logging.getLogger("absl").handlers, logging.lastResort]
    for h in handlers:
        h.addFilter(quiet)
    sys.unraisablehook = _without_closed_loop_noise(hook)

    def loud():
        sys.unraisablehook = hook
        for h in handlers:
            h.removeFilter(quiet)

    try:
        code = fn()
    except Exception as e:
        message = user_message(e)
        if message is None:
            loud()
            raise
        print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
        return 2  # filters and hook stay: the process is about to exit, and the late noise comes at exit
    loud()
    return code


def skip_absent_tpu() -> None:
    """Use the CPU platform on a host with neither a TPU chip nor an NVIDIA GPU, unless a platform was chosen.

    With libtpu installed (the ``tpu`` extra, for compile-only checks) JAX also tries a TPU backend on hosts without
    TPU chips; libtpu then prints an ``E0000 ... INVALID_ARGUMENT: ... TPU_WORKER_HOSTNAMES`` block before JAX falls
    back to the CPU, which reads like a failure. This picks the platform through ``jax.config``, not through
    environment variables: JAX's cluster auto-detection reads ``TPU_WORKER_HOSTNAMES`` and friends on real pods.
    Call it before anything initializes JAX's backends (``jax.devices()``, ``jax.distributed.initialize()``).
    """
    import jax  # noqa: PLC0415 - the CLIs import JAX only once they need it
    from jax._src import hardware_utils  # noqa: PLC0415 - JAX's own chip/GPU probe (no public equivalent)

    if jax.config.jax_platforms:  # JAX_PLATFORMS or an explicit jax.config.update
        return
    tpu_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    if tpu_chips or hardware_utils.has_visible_nvidia_gpu():
        return
    jax.config.update("jax_platforms", "cpu")

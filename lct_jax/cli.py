"""What the command-line entry points share: one-line errors and a quiet start on hosts without a TPU.

Every failure the user can cause (a :class:`lct_jax.errors.UserError`, a file that is missing or cannot be
written, a full disk) ends in one line on stderr and exit code 2::

    error: output /data/out exists and is a file, not a directory; choose another --out

A genuine bug keeps its traceback. ``--debug`` on the command line (or ``LCT_DEBUG=1``) shows the traceback of every
failure.
"""

from __future__ import annotations

import errno
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


def report_errors(fn: Callable[[], int], argv: Sequence[str] = ()) -> int:
    """``fn()``'s exit code, or 2 after printing ``error: ...`` for a failure the user can fix."""
    try:
        return fn()
    except Exception as e:
        message = None if debug_requested(argv) else user_message(e)
        if message is None:
            raise
        print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
        return 2


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

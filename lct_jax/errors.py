"""Failures the user can fix, and how they read: one line naming the thing and the fix.

:class:`UserError` marks an error caused by the input (a flag, a file, a directory, the data, the disk), not by a
bug. The entry points (:mod:`lct_jax.cli`) print such errors as one ``error: ...`` line and exit with code 2;
anything else is a bug and keeps its traceback. Subclasses say where the problem is: the data
(:class:`DataError`), the run directory (:class:`WorkdirError`), a checkpoint (:class:`CheckpointError`), the
configuration (:class:`ConfigError`), an output path (:class:`OutputExistsError`), the disk
(:class:`DiskFullError`). Conversion errors
(:class:`lct_jax.convert.mapping.ConversionError`) and bad records (:class:`lct_jax.data.skips.BadRecord`) are
user errors too.

Every class takes one message argument, so an error raised in a grain worker process pickles back to the main
process unchanged.
"""

from __future__ import annotations

import errno
import os


class UserError(Exception):
    """An error the user can fix; its message names the thing and the fix."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (``--config.<field>``)."""


class DataError(UserError):
    """The data yields nothing usable (every record skipped, or too many of them)."""


class WorkdirError(UserError):
    """The run directory belongs to another stage or model, or another trainer holds it."""


class CheckpointError(UserError):
    """No checkpoint step that can be restored (or the one asked for is damaged)."""


class OutputExistsError(UserError, FileExistsError):
    """An output path that is taken (a non-empty directory, or a file where a directory should go)."""


class DiskFullError(UserError):
    """No space left on the device while writing ``path`` (the writers leave nothing half-written behind)."""

    def __init__(self, path: str | os.PathLike | None = None):
        where = f" holding {os.fspath(path)}" if path is not None else ""
        super().__init__(
            f"no space left on the device{where} (disk full): free space there or choose another location, "
            "then run again"
        )
        self.path = None if path is None else os.fspath(path)

    def __reduce__(self):
        return DiskFullError, (self.path,)


_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "storagefull")


def is_disk_full(e: BaseException | None) -> bool:
    """Whether ``e`` or an exception it was raised from is a full disk (``ENOSPC``/``EDQUOT``). Orbax/tensorstore
    and safetensors report it as text inside their own exception types, so the text is checked as well."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DiskFullError):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(e).lower() for t in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False

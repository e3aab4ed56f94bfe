"""Errors a user can cause, and the exit codes the CLI maps them to.

Every message names the file, subject or option at fault and says what to do, so the CLI can print
it on one line without a traceback (exit 2 for usage errors, 1 for data errors).
"""

from __future__ import annotations

import errno


class CmrfedError(Exception):
    """Base class of every error cmrfed reports to the user instead of a traceback."""

    exit_code = 1


class UsageError(CmrfedError):
    """A bad option or a bad combination of options (exit code 2)."""

    exit_code = 2


class DataError(CmrfedError):
    """Input data that is missing, malformed or inconsistent (exit code 1)."""

    exit_code = 1


_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def from_os_error(exc: OSError) -> CmrfedError | None:
    """The one-line error of a file that cannot be written (permissions, read-only filesystem, a
    full disk), wherever it happens; None for other OS errors (those are bugs to see in full)."""
    if exc.errno not in _UNWRITABLE:
        return None
    where = f" {exc.filename}" if exc.filename else ""
    return DataError(f"cannot write{where} ({exc.strerror}); choose a folder you can write, or "
                     "free space, and run the command again")

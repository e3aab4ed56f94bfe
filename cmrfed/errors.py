"""Errors a user can cause, and the exit codes the CLI maps them to.

Every message names the file, subject or option at fault and says what to do, so the CLI can print
it on one line without a traceback (exit 2 for usage errors, 1 for data errors).
"""

from __future__ import annotations


class CmrfedError(Exception):
    """Base class of every error cmrfed reports to the user instead of a traceback."""

    exit_code = 1


class UsageError(CmrfedError):
    """A bad option or a bad combination of options (exit code 2)."""

    exit_code = 2


class DataError(CmrfedError):
    """Input data that is missing, malformed or inconsistent (exit code 1)."""

    exit_code = 1

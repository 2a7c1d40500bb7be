"""Errors a user can act on. The command line prints these as one line; any other exception is a bug and
keeps its traceback (`ecgtwin --debug` shows tracebacks for these too)."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input, configuration or state that the user can fix; the message says what and where.

    A ValueError, so that library callers who catch ValueError keep working."""


class MissingInput(UserError, FileNotFoundError):
    """A file or folder the user named (or that a step before should have written) does not exist."""

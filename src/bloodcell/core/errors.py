"""Errors a user can act on."""

from __future__ import annotations


class BloodcellError(Exception):
    """An error the user can act on; the CLI prints its message as one line, without a traceback."""


class ImageReadError(Exception):
    """One item could not be used; the message says why. The run goes on without it."""


class MissingExtraError(BloodcellError):
    """A feature needs an optional extra that is not installed."""

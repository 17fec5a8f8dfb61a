"""User-facing errors: the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations


class GlitError(Exception):
    """An error the user can cause and fix (bad input, missing file, ...)."""


class SpaceError(GlitError):
    """Unknown preset or inconsistent search-space definition."""


class ArchError(GlitError):
    """An architecture that is malformed or does not belong to the search space."""


class DataError(GlitError):
    """A dataset that is missing or malformed."""


class CheckpointError(GlitError):
    """A checkpoint that is missing, corrupt or from another run."""


class RunError(GlitError):
    """A run directory that is missing or used inconsistently."""

"""The errors that are a user's to fix: the ``moleflow`` command prints each as one line (its traceback only with
``--verbose``). Each message says what is wrong and what to do."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, files or environment, explained by its message."""


class DatasetError(UserError, RuntimeError):
    """A dataset is missing, incomplete or unreadable."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be used (damaged, not a checkpoint, or with non-finite weights)."""


class PredictionError(UserError, RuntimeError):
    """Some images could not be scored; every other image was (the CSV names each failure)."""

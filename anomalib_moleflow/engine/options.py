"""Command-line options shared by the commands that write a run folder (``continual``, ``benchmark``, ``export``)."""

from __future__ import annotations

from jsonargparse import ArgumentParser


def add_run_options(parser: ArgumentParser, resume_help: str) -> None:
    """Add ``--resume``, ``--overwrite``, ``--accelerator``, ``--devices`` and ``--precision`` to ``parser``."""
    parser.add_argument("--resume", type=bool, nargs="?", const=True, default=False, help=resume_help)
    add_overwrite_option(
        parser, "Delete the earlier run's outputs in --output first (without it or --resume, such a folder is refused)."
    )
    parser.add_argument("--accelerator", type=str, default="auto")
    parser.add_argument("--devices", type=int | str, default=1)
    parser.add_argument(
        "--precision",
        type=str | None,
        default=None,
        help="Lightning precision of every fit and test, e.g. bf16-mixed or 16-mixed on a GPU (default: float32).",
    )


def add_overwrite_option(parser: ArgumentParser, help_text: str) -> None:
    """Add ``--overwrite`` (a bare flag, or ``--overwrite true|false``) to ``parser``."""
    parser.add_argument("--overwrite", type=bool, nargs="?", const=True, default=False, help=help_text)

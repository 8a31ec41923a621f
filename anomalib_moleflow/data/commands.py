"""``moleflow generate-demo`` and ``moleflow convert-8bit``: their options (from the functions' signatures) and runs."""

from __future__ import annotations

from collections.abc import Sequence

from jsonargparse import ArgumentParser

from anomalib_moleflow.parser import OptionParser

from .convert import convert_8bit
from .synthetic.command import generate_demo


def generate_demo_parser() -> ArgumentParser:
    """Options of ``moleflow generate-demo``."""
    parser = OptionParser(
        prog="moleflow generate-demo",
        description="Generate the offline demo dataset (MVTec AD layout, images and masks).",
    )
    parser.add_function_arguments(generate_demo, as_positional=True)
    return parser


def generate_demo_command(argv: Sequence[str]) -> str:
    """``moleflow generate-demo ARGS``; returns the generated folders, one per line."""
    folders = generate_demo(**generate_demo_parser().parse_args(list(argv)).as_dict())
    return "".join(f"{folder}\n" for folder in folders)


def convert_parser() -> ArgumentParser:
    """Options of ``moleflow convert-8bit``."""
    parser = OptionParser(
        prog="moleflow convert-8bit", description="Copy a dataset folder with its 16-bit images converted to 8 bits."
    )
    parser.add_function_arguments(convert_8bit, as_positional=True)
    return parser


def convert_command(argv: Sequence[str]) -> str:
    """``moleflow convert-8bit ARGS``; returns a one-line summary."""
    options = convert_parser().parse_args(list(argv))
    converted = convert_8bit(**options.as_dict())
    return f"{converted} image(s) converted into {options.target}\n"

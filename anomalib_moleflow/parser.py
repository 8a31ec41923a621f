"""The options' parser of every ``moleflow`` command: jsonargparse's, with an option error said in one line.

jsonargparse answers a wrong value with the command's whole usage (some 50 lines for ``moleflow continual``) and,
for a union type such as ``int | None``, each subtype's own error; the one line here names the option, what it takes
and what was given, and where the options are listed.
"""

from __future__ import annotations

import re
import sys
from typing import NoReturn

from jsonargparse import ArgumentParser


def _type_name(text: str) -> str:
    """A type as jsonargparse prints it, as a user reads it: ``<class 'int'>`` → ``int``, a ``Literal`` → its values."""
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if literal:
        return f"one of {literal.group(1)}"
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text)
    text = re.sub(r"\b(?:typing|collections\.abc)\.", "", text)
    return {"NoneType": "null", "Sequence": "a list"}.get(text, text)


def one_line(message: str) -> str:
    """jsonargparse's error ``message`` as one line: ``KEY: expected A or B, got VALUE`` where it names a key, a
    value and what the key takes, ``KEY: what is wrong`` where it names a key only; its lines joined otherwise."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    key = re.match(r'Parser key "([^"]+)":\s*(.*)$', lines[0]) if lines else None
    expected = [
        match.group(1) for line in lines if (match := re.match(r"(?:- )?Expected a (.+?)(?:\. Got value: .*)?$", line))
    ]
    given = [line.split(": ", 1)[1] for line in lines if line.startswith("Given value: ")]
    got = [match.group(1) for line in lines if (match := re.search(r"\. Got value: (.*)$", line))]
    value = (given or got or [None])[-1]
    if key is None:
        return " ".join(lines)
    if not expected or value is None:
        return f"{key.group(1)}: {' '.join(filter(None, [key.group(2), *lines[1:]]))}"
    takes = " or ".join(dict.fromkeys(_type_name(text) for text in expected))
    return f"{key.group(1)}: expected {takes}, got {value}"


class OptionParser(ArgumentParser):
    """jsonargparse's ``ArgumentParser`` whose option errors (with ``exit_on_error``) are one line on stderr, exit 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Write ``PROG: error: ...`` in one line and exit with 2; raise as jsonargparse does without
        ``exit_on_error``."""
        if not self.exit_on_error:
            super().error(message, ex)
        sys.stderr.write(f"{self.prog}: error: {one_line(message)} ({self.prog} --help lists the options)\n")
        self.exit(2)

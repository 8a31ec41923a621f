"""The README's commands work as written: every ``moleflow`` command parses (flags, configs and their keys), and
anomalib's own CLI accepts every ``anomalib`` command with the plugin's model. The demo command itself runs (with
tiny data) in ``test_continual.py::test_cli_runs_reduced_demo_config``."""

from __future__ import annotations

import importlib
import inspect
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from anomalib_moleflow.cli.main import parse

REPO = Path(__file__).resolve().parents[1]


def readme_commands(program: str) -> list[list[str]]:
    """Every command of ``program`` in the README's bash blocks (``&&`` chains split), as argument lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():  # continuation lines joined
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                if words[0] == program:
                    commands.append(words[1:end])
                words = words[end + 1 :]
    return commands


def _components(node: object) -> Iterator[tuple[str, dict]]:
    """Every ``class_path`` of a YAML tree with its ``init_args``."""
    if isinstance(node, dict):
        if "class_path" in node:
            yield node["class_path"], node.get("init_args") or {}
        for value in node.values():
            yield from _components(value)
    elif isinstance(node, list):
        for item in node:
            yield from _components(item)


def test_readme_shows_the_commands_we_check() -> None:
    moleflow = readme_commands("moleflow")
    assert {argv[0] for argv in moleflow} >= {"continual", "benchmark", "generate-demo", "anomalib"}
    assert any("--resume" in argv for argv in moleflow)
    assert readme_commands("anomalib")


@pytest.mark.parametrize("argv", readme_commands("moleflow"), ids=lambda argv: " ".join(argv)[:80])
def test_every_moleflow_command_parses(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # configs are given relative to the repository
    if argv[0] == "anomalib":  # anomalib's own CLI: its config names importable classes and their own arguments
        config = REPO / argv[argv.index("--config") + 1]
        components = list(_components(yaml.safe_load(config.read_text())))
        assert components, f"{config}: no class_path"
        for path, arguments in components:
            module, _, name = path.rpartition(".")
            owners = [
                importlib.import_module(m) for m in ([module] if module else ["anomalib.models", "anomalib.data"])
            ]
            cls = next((getattr(owner, name) for owner in owners if hasattr(owner, name)), None)
            assert cls is not None, f"{config}: {path} does not import"
            accepted = set(inspect.signature(cls.__init__).parameters)
            assert set(arguments) <= accepted, f"{config}: {path} takes no {sorted(set(arguments) - accepted)}"
        return
    command, options = parse(argv)
    if command in {"continual", "benchmark"}:
        assert options.tasks, f"{argv}: the config has no tasks"
    if "--resume" in argv:
        assert options.resume is True


def test_every_anomalib_command_is_accepted_by_anomalibs_cli(tmp_path: Path) -> None:
    # One process for all: anomalib's CLI parses each command (model class, its options, the data) and prints the
    # resolved config instead of running (--print_config), as it does for any user typing the command.
    commands = readme_commands("anomalib")
    script = (
        "import sys\n"
        "from anomalib.cli import cli\n"
        f"for argv in {commands!r}:\n"
        "    try:\n"
        "        cli.AnomalibCLI(args=[*argv, '--print_config'])\n"
        "    except SystemExit as exit_:\n"
        "        assert exit_.code in (0, None), (argv, exit_.code)\n"
        "    print('OK', argv[0], flush=True)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("OK ") == len(commands), completed.stdout[-2000:]
    assert "MoleFlow" in completed.stdout

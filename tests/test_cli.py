"""The ``moleflow`` command line: subcommands, the study's flags, bare switches."""

from __future__ import annotations

import pytest

from anomalib_moleflow.cli.main import COMMANDS, main, parse
from anomalib_moleflow.engine.runner import model_argument_names, translate_study_flags


def test_help_lists_every_subcommand_and_each_one_has_its_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: moleflow")
    listed = [line.split()[0] for line in out.split("commands:")[1].split("options:")[0].splitlines() if line.strip()]
    assert listed == [*COMMANDS, "anomalib"]
    assert set(COMMANDS) == {"continual", "benchmark", "ablate", "predict", "export", "generate-demo", "convert-8bit"}
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: moleflow {command}"), command


def test_study_flags_become_model_options_and_routing_stays_the_engines() -> None:
    argv = ["--no_lora", "--tail_weight", "0", "--use_task_separated", "--routing", "oracle", "--seed", "3"]
    translated = translate_study_flags(argv, model_argument_names())
    assert translated == [
        "--model.use_lora", "false", "--model.tail_weight", "0", "--model.task_separated", "true",
        "--routing", "oracle", "--seed", "3",
    ]  # fmt: skip
    _, config = parse(["continual", *argv])
    assert config.model.use_lora is False
    assert config.model.tail_weight == 0.0
    assert config.model.task_separated is True
    assert config.routing == "oracle"
    assert config.seed == 3
    assert "routing" not in config.model


@pytest.mark.parametrize(("argv", "expected"), [([], False), (["--resume"], True), (["--resume", "false"], False)])
def test_resume_is_a_bare_switch(argv: list[str], expected: bool) -> None:
    assert parse(["continual", *argv])[1].resume is expected
    assert parse(["benchmark", *argv])[1].resume is expected


def test_continual_without_tasks_fails_clearly(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["continual", "--output", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "No tasks" in capsys.readouterr().err


def test_every_model_option_has_its_help_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Each ``--model.*`` option says what it does, architecture settings included (not only its type)."""
    from anomalib_moleflow.models.moleflow.settings import MoleFlowSettings

    with pytest.raises(SystemExit):
        main(["continual", "--help"])
    options = capsys.readouterr().out.split("Every setting of ``MoleFlow``")[1]
    entries = {
        block.split()[0]: " ".join(block.split()[1:])
        for block in ("\n" + options).split("\n  --model.")[1:]  # one block per option
    }
    assert set(entries) == set(MoleFlowSettings.__dataclass_fields__)
    undocumented = [name for name, text in entries.items() if text.split("(type:")[0].strip() in ("", name.upper())]
    assert not undocumented, undocumented
    assert "timm backbone name" in entries["backbone"]
    assert "Adam learning rate" in entries["lr"]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["continual", "--model.lr", "abc"], "model.lr: expected float, got abc"),
        (["continual", "--model.embed_dim", "abc"], "model.embed_dim: expected null or int, got abc"),
        (
            ["continual", "--model.router_embedding", "foo"],
            "model.router_embedding: expected one of 'mean', 'max', 'quadrant_max', got foo",
        ),
        (["continual", "--no_such", "1"], "Unrecognized arguments: --no_such 1"),
        (["continual", "--config", "/missing.yaml"], "config: File does not exist: '/missing.yaml'"),
        (["benchmark", "--seeds", "x"], "seeds: expected null or list, got x"),
        (["ablate", "--executor", "foo"], "executor: expected one of 'serial', 'ray', got foo"),
        (["generate-demo", "--image_size", "x"], "image_size: expected int, got x"),
    ],
)
def test_an_option_error_is_one_line_naming_the_option_and_what_it_takes(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    command = f"moleflow {argv[0]}"
    assert capsys.readouterr().err.splitlines() == [f"{command}: error: {said} ({command} --help lists the options)"]


def test_a_config_dict_with_a_wrong_value_is_refused_in_one_line() -> None:
    from anomalib_moleflow.engine.runner import resolve

    with pytest.raises(ValueError, match=r"^Invalid continual config: model.embed_dim: expected null or int, got abc$"):
        resolve({"model": {"embed_dim": "abc"}})

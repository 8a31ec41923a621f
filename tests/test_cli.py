"""The ``moleflow`` command line: subcommands, the study's flags, bare switches."""

from __future__ import annotations

import pytest

from anomalib_moleflow.cli.main import build_parser, main, model_argument_names, translate_study_flags


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: moleflow")
    commands = ("continual", "benchmark", "ablate", "predict", "generate-demo", "convert-8bit", "moleflow anomalib")
    for command in commands:
        assert command in out


def test_study_flags_become_model_options_and_routing_stays_the_engines() -> None:
    argv = ["--no_lora", "--tail_weight", "0", "--use_task_separated", "--routing", "oracle", "--seed", "3"]
    translated = translate_study_flags(argv, model_argument_names())
    assert translated == [
        "--model.use_lora", "false", "--model.tail_weight", "0", "--model.task_separated", "true",
        "--routing", "oracle", "--seed", "3",
    ]  # fmt: skip
    config = build_parser().parse_args(["continual", *translated]).continual
    assert config.model.use_lora is False
    assert config.model.tail_weight == 0.0
    assert config.model.task_separated is True
    assert config.routing == "oracle"
    assert config.seed == 3
    assert "routing" not in config.model


@pytest.mark.parametrize(("argv", "expected"), [([], False), (["--resume"], True), (["--resume", "false"], False)])
def test_resume_is_a_bare_switch(argv: list[str], expected: bool) -> None:
    assert build_parser().parse_args(["continual", *argv]).continual.resume is expected
    assert build_parser().parse_args(["benchmark", *argv]).benchmark.resume is expected


def test_continual_without_tasks_fails_clearly(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["continual", "--output", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "No tasks" in capsys.readouterr().err

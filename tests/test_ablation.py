"""Ablation suites: the core suite at smoke scale gives the study's table, reruns skip, divergence is a failed row,
the summary merges suites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from anomalib_moleflow.ablation import load_suite, run_suite
from anomalib_moleflow.ablation.suite import suite_path, validate
from anomalib_moleflow.cli.main import main
from anomalib_moleflow.engine.runner import resolve
from anomalib_moleflow.reports.ablation_table import write_summary

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def core_smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("ablations")
    run_suite(load_suite(suite_path("core")), output, "smoke")
    return output


def test_core_suite_at_smoke_scale_writes_the_studys_table(core_smoke: Path) -> None:
    report = json.loads((core_smoke / "core" / "suite.json").read_text())
    assert [row["run"] for row in report["rows"]][:2] == ["MAIN", "w/o Tail Aware Loss"]
    assert len(report["rows"]) == 9
    assert all(row["status"] == "ok" for row in report["rows"])
    assert all(row["Δ Img AUROC"] is not None and row["Δ Pix AP"] is not None for row in report["rows"])
    assert report["rows"][0]["Δ Pix AP"] == 0.0
    table = (core_smoke / "core" / "suite.md").read_text()
    assert "| run | Img AUROC | Pix AUROC | Img AP | Pix AP | Rt Acc | Δ Img AUROC | Δ Pix AP |" in table
    assert "| 98.05 | 55.80 |" in table  # the study's MAIN beside ours
    assert (core_smoke / "core" / "suite.csv").read_text().count("\n") == 10
    # Removing a component really changes the result (the runs are not copies of MAIN).
    assert len({row["Img AUROC"] for row in report["rows"]}) > 2


def test_rerun_skips_finished_runs(core_smoke: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = {path: path.stat().st_mtime_ns for path in (core_smoke / "core" / "runs").rglob("run.json")}
    with caplog.at_level("INFO"):
        run_suite(load_suite(suite_path("core")), core_smoke, "smoke")
    assert {path: path.stat().st_mtime_ns for path in (core_smoke / "core" / "runs").rglob("run.json")} == before
    assert caplog.text.count("finished earlier, skipped") == 9


def test_suite_json_is_written_after_the_tables_it_indexes(
    core_smoke: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib_moleflow.reports import ablation_table

    report = json.loads((core_smoke / "core" / "suite.json").read_text())
    written = []
    write = ablation_table.atomic_write_text
    monkeypatch.setattr(
        ablation_table, "atomic_write_text", lambda path, text: written.append(path.name) or write(path, text)
    )
    ablation_table.write_suite_report("core", None, report["records"], tmp_path)
    assert written[-1] == "suite.json"  # a reader who finds the JSON finds the table and the CSV too
    assert set(written) == {"suite.md", "suite.csv", "suite.json"}


def test_diverging_run_is_a_failed_row_and_the_suite_goes_on(tmp_path: Path) -> None:
    suite = {
        "name": "diverge",
        "base": str(REPO / "configs" / "continual" / "mvtec_1x1.yaml"),
        "runs": [
            {"name": "MAIN"},
            {"name": "lr 1e30", "set": {"model.lr": 1.0e30}},
            {"name": "w/o LoRA", "set": {"model.use_lora": False}},
        ],
    }
    path = tmp_path / "diverge.yaml"
    path.write_text(yaml.safe_dump(suite))
    report = run_suite(load_suite(path), tmp_path / "out", "smoke")
    statuses = [row["status"] for row in report["rows"]]
    assert statuses == ["ok", "failed", "ok"]
    assert "Non-finite" in report["rows"][1]["reason"]
    assert "❌ failed" in (tmp_path / "out" / "diverge" / "suite.md").read_text()


def test_summary_merges_a_component_suite_and_a_sweep(
    core_smoke: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sweep = {
        "name": "tail_weight",
        "base": str(REPO / "configs" / "continual" / "mvtec_1x1.yaml"),
        "sweep": {"key": "model.tail_weight", "values": [0.0, 0.7], "main": 0.7},
    }
    path = tmp_path / "tail_weight.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["ablate", "--config", str(path), "--output", str(core_smoke), "--scale", "smoke"]) == 0
    assert "tail_weight=0.7" in capsys.readouterr().out
    assert (core_smoke / "tail_weight" / "suite.png").exists()
    summary = write_summary(core_smoke).read_text()
    assert "## Component ranking" in summary
    assert summary.count("| w/o ") == 8
    assert "## Sensitivity" in summary
    assert "| tail_weight | " in summary


def test_every_suite_of_the_study_loads(tmp_path: Path) -> None:
    """Every suite resolves at both scales through the continual runner's parser, and every run's ``set:`` keys land
    in the resolved config with their values (a key the parser did not know would have failed)."""
    names = sorted(path.stem for path in (REPO / "configs" / "ablations").glob("*.yaml"))
    assert names == sorted([
        "core", "blocks", "strategy", "lora_rank", "lambda_logdet", "scale_context_kernel",
        "spatial_context_kernel", "tail_weight", "tail_top_k_ratio", "score_aggregation_top_k",
    ])  # fmt: skip
    for name in names:
        suite = load_suite(suite_path(name))
        assert suite.runs[0].reference, name  # MAIN carries the study's values
        assert all(isinstance(value, (int, float, bool)) for run in suite.runs for value in run.settings.values())
        for scale in ("full", "smoke"):
            for run, config in zip(suite.runs, validate(suite, scale, tmp_path), strict=True):
                resolved = resolve(config)
                for key, value in run.settings.items():
                    assert resolved[key] == value, (name, scale, run.name, key)

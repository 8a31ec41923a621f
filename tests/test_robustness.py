"""Robustness: output folders are never mixed or silently replaced, damaged checkpoints are refused, settings given
with a checkpoint are checked or applied."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from lightning.pytorch import seed_everything

from anomalib_moleflow import MoleFlow
from anomalib_moleflow.checkpoint import CheckpointError, read_checkpoint
from anomalib_moleflow.cli.main import main
from anomalib_moleflow.data import DatasetError
from anomalib_moleflow.engine import ContinualEngine
from anomalib_moleflow.engine.continual import RUN_OUTPUTS
from anomalib_moleflow.io import claim_output_dir

from conftest import TINY_CATEGORIES, TINY_MODEL_KWARGS


def _tasks(root: Path, categories: tuple[str, ...] = TINY_CATEGORIES[:1]) -> list[MVTecAD]:
    return [MVTecAD(root=root, category=c, train_batch_size=4, eval_batch_size=8, num_workers=0) for c in categories]


def _engine(output: Path, **kwargs) -> ContinualEngine:
    return ContinualEngine(output_dir=output, enable_progress_bar=False, overlays_per_task=0, **kwargs)


def _model(**overrides) -> MoleFlow:
    seed_everything(0, verbose=False)
    return MoleFlow(**{**TINY_MODEL_KWARGS, **overrides})


@pytest.fixture(scope="module")
def one_task_run(tiny_mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of a finished one-task run (do not modify: copy files out first)."""
    output = tmp_path_factory.mktemp("one_task")
    _engine(output).run(_model(), _tasks(tiny_mvtec_root))
    return output


# ------------------------------------------------------------------------------------------------ output folders
def test_second_run_into_the_same_output_is_refused_and_changes_nothing(
    one_task_run: Path, tiny_mvtec_root: Path
) -> None:
    before = {path.name: path.read_bytes() for path in one_task_run.iterdir() if path.is_file()}
    with pytest.raises(FileExistsError, match=r"--resume to continue.*--overwrite"):
        _engine(one_task_run).run(_model(), _tasks(tiny_mvtec_root))
    assert {path.name: path.read_bytes() for path in one_task_run.iterdir() if path.is_file()} == before


def test_overwrite_deletes_only_the_earlier_runs_outputs(tmp_path: Path) -> None:
    (tmp_path / "tasks" / "00_old").mkdir(parents=True)
    (tmp_path / "tasks" / "00_old" / "overlay.png").write_bytes(b"old")
    for name in ("state.json", "model.ckpt", "model.ckpt.sha256", "results.md", "heatmap_image_AUROC.png"):
        (tmp_path / name).write_text("old")
    (tmp_path / "my_notes.txt").write_text("keep me")
    claim_output_dir(tmp_path, RUN_OUTPUTS, resume=False, overwrite=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["my_notes.txt"]


def test_resume_and_overwrite_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        claim_output_dir(tmp_path, RUN_OUTPUTS, resume=True, overwrite=True)


def test_benchmark_into_an_earlier_benchmark_is_refused(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    from anomalib_moleflow.benchmark import run_benchmark

    (tmp_path / "benchmark.json").write_text("{}")
    (tmp_path / "benchmark.yaml").write_text("mine")  # a user's file, not an output
    dataset = {"class_path": "anomalib.data.MVTecAD", "init_args": {"root": str(tiny_mvtec_root), "num_workers": 0}}
    config = {
        "output": str(tmp_path),
        "rows": ["moleflow"],
        "pre_trained": False,  # the MoLE-Flow row's model is built (and checked) before the output folder is claimed
        "tasks": {"dataset": dataset, "categories": ["woven"]},
    }
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_benchmark(config)
    # With --overwrite, a dataset error still comes first and the earlier outputs stay.
    missing = {**dataset, "init_args": {**dataset["init_args"], "root": str(tmp_path / "nowhere")}}
    with pytest.raises(DatasetError):
        run_benchmark({**config, "overwrite": True, "tasks": {"dataset": missing, "categories": ["woven"]}})
    assert (tmp_path / "benchmark.json").read_text() == "{}"
    assert (tmp_path / "benchmark.yaml").read_text() == "mine"


def test_overwrite_never_deletes_the_checkpoint_a_run_starts_from(
    one_task_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    output = tmp_path / "run"
    shutil.copytree(one_task_run, output)
    tasks = {"dataset": {"class_path": "anomalib.data.MVTecAD", "init_args": {"root": str(tmp_path)}}, "categories": []}
    argv = ["continual", "--tasks", json.dumps(tasks), "--output", str(output), "--overwrite"]
    with pytest.raises(SystemExit):
        main([*argv, "--from_checkpoint", str(output / "model.ckpt")])
    assert "would delete" in capsys.readouterr().err
    assert (output / "model.ckpt").read_bytes() == (one_task_run / "model.ckpt").read_bytes()


def test_resume_may_change_speed_only_settings(one_task_run: Path, tiny_mvtec_root: Path, tmp_path: Path) -> None:
    import shutil

    output = tmp_path / "run"
    shutil.copytree(one_task_run, output)
    results = _engine(output, resume=True).run(_model(feature_cache="off"), _tasks(tiny_mvtec_root))
    speed = {"feature_cache": "auto", "feature_cache_dtype": "float32", "compile_mode": "off"}
    assert results["config"]["speed"] == speed  # the run's


# ----------------------------------------------------------------------------------------------------- checksums
def test_checkpoint_has_a_sha256sum_checksum(one_task_run: Path) -> None:
    checkpoint = one_task_run / "model.ckpt"
    digest, name = (one_task_run / "model.ckpt.sha256").read_text().split()
    assert name == "model.ckpt"
    assert digest == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert read_checkpoint(checkpoint)["state_dict"]


def _damaged(one_task_run: Path, folder: Path, kind: str) -> Path:
    data = (one_task_run / "model.ckpt").read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.ckpt"
    if kind == "flipped":
        (folder / "model.ckpt.sha256").write_bytes((one_task_run / "model.ckpt.sha256").read_bytes())
        middle = len(data) // 2
        data = data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1 :]
    contents = {"empty": b"", "truncated": data[: len(data) // 3], "text": b"not a checkpoint\n", "flipped": data}
    path.write_bytes(contents[kind])
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [("empty", "is empty"), ("truncated", "cannot be read"), ("text", "cannot be read"), ("flipped", "checksum")],
)
def test_damaged_checkpoint_gives_one_clear_message(
    one_task_run: Path, tmp_path: Path, kind: str, message: str
) -> None:
    path = _damaged(one_task_run, tmp_path, kind)
    with pytest.raises(CheckpointError, match=message) as error:
        read_checkpoint(path)
    assert "weights_only" not in str(error.value)
    with pytest.raises(CheckpointError, match=message):
        MoleFlow.continue_from(path)


def test_resume_from_a_damaged_checkpoint_is_refused_and_keeps_the_file(
    one_task_run: Path, tiny_mvtec_root: Path, tmp_path: Path
) -> None:
    for name in ("state.json", "model.ckpt.sha256"):
        (tmp_path / name).write_bytes((one_task_run / name).read_bytes())
    path = _damaged(one_task_run, tmp_path, "flipped")
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="checksum"):
        _engine(tmp_path, resume=True).run(_model(), _tasks(tiny_mvtec_root))
    assert path.read_bytes() == before


def test_checkpoint_with_non_finite_weights_is_refused(one_task_run: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(one_task_run / "model.ckpt", map_location="cpu", weights_only=False)
    key = next(
        k
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("model.") and isinstance(v, torch.Tensor) and v.is_floating_point()
    )
    checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], float("nan"))
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=f"non-finite weights \\('{key}'"):
        read_checkpoint(tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match="non-finite"):
        MoleFlow.load_from_checkpoint(tmp_path / "nan.ckpt")


# ---------------------------------------------------------------------------------- settings with a checkpoint
def test_continue_from_applies_training_settings_and_refuses_architecture_ones(one_task_run: Path) -> None:
    checkpoint = one_task_run / "model.ckpt"
    model = MoleFlow.continue_from(checkpoint, lr=0.0123, max_epochs=2, tail_weight=0.5, visualizer=False)
    assert model.task_names == [TINY_CATEGORIES[0]]
    assert (model.lr, model.max_epochs, model.loss.tail_weight) == (0.0123, 2, 0.5)
    assert model.hparams["lr"] == 0.0123  # what the results record
    same = MoleFlow.continue_from(checkpoint, backbone="resnet18", layers=["layer1", "layer2"], embed_dim=32)
    assert same.task_names == [TINY_CATEGORIES[0]]
    with pytest.raises(
        ValueError, match=r"image_size \(checkpoint 64, given 96\); lora_rank \(checkpoint 4, given 8\)"
    ):
        MoleFlow.continue_from(checkpoint, lora_rank=8, image_size=96, lr=0.1)


def test_cli_from_checkpoint_names_each_differing_architecture_option(
    one_task_run: Path, tiny_mvtec_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = {"dataset": {"class_path": "anomalib.data.MVTecAD", "init_args": {"root": str(tiny_mvtec_root)}}}
    tasks["categories"] = list(TINY_CATEGORIES[:2])
    argv = ["continual", "--tasks", json.dumps(tasks), "--output", str(tmp_path / "out")]
    argv += ["--from_checkpoint", str(one_task_run / "model.ckpt"), "--lora_rank", "8", "--model.image_size", "96"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "lora_rank (checkpoint 4, given 8)" in error
    assert "image_size (checkpoint 64, given 96)" in error
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ unknown products
@pytest.fixture(scope="module")
def unknown_product_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[MoleFlow, Path, Path]:
    """Two products learned (16 training images each, enough for thresholds); a third generated, never learned."""
    from anomalib_moleflow.data.synthetic import SyntheticConfig, generate_dataset

    root = tmp_path_factory.mktemp("unknown_data")
    config = SyntheticConfig(image_size=64, n_train=16, n_test_good=4, n_test_defect=2, seed=0)
    generate_dataset(root, TINY_CATEGORIES, config)
    output = tmp_path_factory.mktemp("unknown_run")
    model = _model()
    _engine(output).run(model, _tasks(root, (TINY_CATEGORIES[0], TINY_CATEGORIES[2])))
    return model, root, output


def _third_product_images(model: MoleFlow, root: Path) -> torch.Tensor:
    datamodule = _tasks(root, (TINY_CATEGORIES[1],))[0]
    datamodule.setup()
    return torch.cat([batch.image for batch in datamodule.test_dataloader()])


def test_unknown_product_is_flagged_and_learned_ones_are_not(unknown_product_run: tuple[MoleFlow, Path, Path]) -> None:
    import csv

    model, root, output = unknown_product_run
    assert all(float(p.threshold) > 0 for p in model.model.router.prototypes)
    for name in (TINY_CATEGORIES[0], TINY_CATEGORIES[2]):
        with (output / "tasks" / f"01_{TINY_CATEGORIES[2]}" / "test" / name / "routing.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 12
        assert {row["routed_task"] for row in rows} == {name}
        assert all(row["unknown_product"] == "0" and float(row["router_distance"]) > 0 for row in rows)
    _, routed = model.model.predict(_third_product_images(model, root))
    assert routed.unknown.all(), routed.distance
    # With a factor so small that every image is "unknown", a learned product's images show what the setting does:
    # scored anomalous (normalised score 1, anomalous label) by default, only flagged with unknown_as_anomalous off.
    learned = _tasks(root, (TINY_CATEGORIES[0],))[0]
    learned.setup()
    images = next(iter(learned.test_dataloader())).image
    model.eval()
    normal = model(images).pred_score
    assert not (normal == 1).all()
    model.model.unknown_factor = 1e-9
    try:
        assert model.model.predict(images)[1].unknown.all()
        flagged = model(images)
        assert (flagged.pred_score == 1).all()
        assert flagged.pred_label.all()
        model.unknown_as_anomalous = False
        assert torch.equal(model(images).pred_score, normal)
    finally:
        model.unknown_as_anomalous = True
        model.model.unknown_factor = None
    assert not model.model.predict(_third_product_images(model, root))[1].unknown.any()  # None: never flagged
    model.model.unknown_factor = 3.0


def test_unknown_product_thresholds_survive_the_checkpoint(unknown_product_run: tuple[MoleFlow, Path, Path]) -> None:
    model, root, output = unknown_product_run
    loaded = MoleFlow.continue_from(output / "model.ckpt")
    expected = [float(p.threshold) for p in model.model.router.prototypes]
    assert [float(p.threshold) for p in loaded.model.router.prototypes] == expected
    assert loaded.model.predict(_third_product_images(model, root))[1].unknown.all()


def test_predict_routes_a_mixed_nested_folder_and_writes_the_csv(
    unknown_product_run: tuple[MoleFlow, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv
    import shutil

    _, root, output = unknown_product_run
    mixed = tmp_path / "line"
    expected: dict[str, str] = {}
    for category, subfolder in ((TINY_CATEGORIES[0], "a"), (TINY_CATEGORIES[2], "b/nested"), (TINY_CATEGORIES[1], "c")):
        for source in sorted((root / category / "test" / "good").glob("*.png"))[:3]:
            target = mixed / subfolder / source.name  # the same file names in every folder
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
            expected[str(target)] = category
    masks = mixed / "a" / "ground_truth" / "scratch"  # anomalib's mask folder: skipped, counted
    masks.mkdir(parents=True)
    for mask in sorted((root / TINY_CATEGORIES[0] / "ground_truth").rglob("*.png"))[:2]:
        shutil.copy(mask, masks / mask.name)
    argv = ["predict", "--ckpt", str(output / "model.ckpt"), "--input", str(mixed), "--output", str(tmp_path / "p")]
    assert main([*argv, "--progress_bar", "false", "--batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert "9 image(s) scored" in out
    assert "2 mask file(s)" in out
    with (tmp_path / "p" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["image_path"] for row in rows} == set(expected)
    for row in rows:
        category = expected[row["image_path"]]
        if category == TINY_CATEGORIES[1]:  # never learned
            assert row["unknown_product"] == "1"
            assert row["label"] == "anomalous"
        else:
            assert row["routed_task"] == category
            assert row["unknown_product"] == "0"
        assert 0.0 <= float(row["normalized_score"]) <= 1.0
        assert float(row["router_distance"]) > 0
        assert row["error"] == ""
    # one overlay per row, at the image's path below --input (same names in different folders do not collide)
    overlays = sorted(str(path.relative_to(tmp_path / "p" / "overlays")) for path in (tmp_path / "p").rglob("*.png"))
    assert overlays == sorted(str(Path(path).relative_to(mixed)) for path in expected)

    # a second prediction into the same folder is refused (nothing replaced), --overwrite replaces it
    before = (tmp_path / "p" / "predictions.csv").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--progress_bar", "false"])
    assert exit_info.value.code == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "p" / "predictions.csv").read_bytes() == before
    assert main([*argv, "--progress_bar", "false", "--overwrite", "--overlays", "false"]) == 0
    assert not (tmp_path / "p" / "overlays").exists()


def test_predict_scores_every_readable_image_and_lists_every_unreadable_one(
    unknown_product_run: tuple[MoleFlow, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv
    import shutil

    _, root, output = unknown_product_run
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted((root / TINY_CATEGORIES[0] / "test" / "good").glob("*.png"))[:3]
    for source in good:
        shutil.copy(source, folder / source.name)
    data = good[0].read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "not_an_image.png").write_text("hello")
    argv = ["predict", "--ckpt", str(output / "model.ckpt"), "--input", str(folder), "--output", str(tmp_path / "p")]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--progress_bar", "false"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "truncated.png" in error
    assert "not_an_image.png" in error
    assert len(error.strip().splitlines()[-1]) > 0
    assert "Traceback" not in error
    with (tmp_path / "p" / "predictions.csv").open() as handle:
        rows = {Path(row["image_path"]).name: row for row in csv.DictReader(handle)}
    assert len(rows) == 5
    for source in good:
        assert rows[source.name]["error"] == ""
        assert float(rows[source.name]["raw_score"]) > -1e9
    for broken in ("truncated.png", "not_an_image.png"):
        assert "unreadable image" in rows[broken]["error"]
        assert rows[broken]["raw_score"] == ""


def test_predict_without_thresholds_labels_nothing(
    unknown_product_run: tuple[MoleFlow, Path, Path], tmp_path: Path
) -> None:
    import shutil

    from anomalib_moleflow.engine.predict import predict_folder

    model, root, _ = unknown_product_run
    folder = tmp_path / "in"
    folder.mkdir()
    for source in sorted((root / TINY_CATEGORIES[0] / "test").rglob("*.png"))[:3]:
        shutil.copy(source, folder / source.name)
    model.post_processor.enable_thresholding = False
    try:
        summary = predict_folder(model, folder, tmp_path / "p", overlays=False, progress=False)
    finally:
        model.post_processor.enable_thresholding = True
    import csv

    with summary.csv.open() as handle:
        labels = {row["label"] for row in csv.DictReader(handle)}
    assert labels == {""}  # never "anomalous" for want of a threshold


def test_torch_export_of_a_two_task_model_matches_pytorch(
    unknown_product_run: tuple[MoleFlow, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib.data.utils import read_image
    from anomalib.deploy import ExportType, TorchInferencer
    from anomalib.engine import Engine

    model, root, _ = unknown_product_run
    path = Engine(default_root_dir=tmp_path, logger=False).export(model, ExportType.TORCH, export_root=tmp_path)
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib refuses pickled models unless the user trusts the file
    inferencer = TorchInferencer(path=path, device="cpu")
    model.eval()
    for task, category in enumerate((TINY_CATEGORIES[0], TINY_CATEGORIES[2])):
        for image in sorted((root / category / "test").rglob("*.png"))[:3]:
            exported = inferencer.predict(str(image))
            with torch.no_grad(), model.record_routing() as log:
                expected = model(read_image(image, as_tensor=True)[None])
            assert log.tasks().tolist() == [task]
            torch.testing.assert_close(exported.pred_score.detach(), expected.pred_score.detach(), atol=1e-3, rtol=0)
            exported_map = exported.anomaly_map.detach().reshape(expected.anomaly_map.shape)
            torch.testing.assert_close(exported_map, expected.anomaly_map.detach(), atol=1e-3, rtol=0)


def test_anomalib_predict_cli_scores_a_mixed_folder_with_the_checkpoint(
    unknown_product_run: tuple[MoleFlow, Path, Path], tmp_path: Path
) -> None:
    import shutil
    import subprocess
    import sys

    _, root, output = unknown_product_run
    folder = tmp_path / "mixed"
    folder.mkdir()
    for category in (TINY_CATEGORIES[0], TINY_CATEGORIES[2]):
        shutil.copy(sorted((root / category / "test" / "good").glob("*.png"))[0], folder / f"{category}.png")
    model_args = []
    for key in ("backbone", "image_size", "embed_dim", "lora_rank", "num_coupling_layers", "dia_blocks"):
        model_args += [f"--model.{key}", str(TINY_MODEL_KWARGS[key])]
    model_args += ["--model.layers", json.dumps(list(TINY_MODEL_KWARGS["layers"])), "--model.pre_trained", "false"]
    command = [
        sys.executable, "-m", "anomalib.cli.cli", "predict", "--model", "anomalib_moleflow.MoleFlow", *model_args,
        "--ckpt_path", str(output / "model.ckpt"), "--data", str(folder), "--default_root_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    written = sorted(path.name for path in (tmp_path / "out").rglob("*.png"))
    assert written == sorted(f"{category}.png" for category in (TINY_CATEGORIES[0], TINY_CATEGORIES[2]))

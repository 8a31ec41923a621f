"""Deployment: one exported artefact with the router and every expert, run by ONNX Runtime / OpenVINO without torch.

A two-task model is exported; the export's scores, maps and routed tasks must match the PyTorch model's on the test
images of both tasks and of a product it never learned.
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.data.utils import read_image
from lightning.pytorch import seed_everything

from anomalib_moleflow import MoleFlow
from anomalib_moleflow.cli.main import main
from anomalib_moleflow.data.synthetic import SyntheticConfig, generate_dataset
from anomalib_moleflow.engine.continual import ContinualEngine
from anomalib_moleflow.engine.export import LOADER_NAME, export_model
from anomalib_moleflow.engine.predict import COLUMNS, predict_folder
from anomalib_moleflow.models.moleflow.export import ROUTED_OUTPUTS

from conftest import TINY_CATEGORIES, TINY_MODEL_KWARGS

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

LEARNED = (TINY_CATEGORIES[0], TINY_CATEGORIES[2])
UNLEARNED = TINY_CATEGORIES[1]


@pytest.fixture(scope="module")
def two_task_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[MoleFlow, Path, Path]:
    """Two products learned (16 training images each: enough for unknown-product thresholds), a third not."""
    root = tmp_path_factory.mktemp("deploy_data")
    generate_dataset(root, TINY_CATEGORIES, SyntheticConfig(image_size=64, n_train=16, n_test_good=4, n_test_defect=2))
    output = tmp_path_factory.mktemp("deploy_run")
    seed_everything(0, verbose=False)
    model = MoleFlow(**TINY_MODEL_KWARGS)
    tasks = [MVTecAD(root=root, category=c, train_batch_size=4, eval_batch_size=8, num_workers=0) for c in LEARNED]
    ContinualEngine(output_dir=output, enable_progress_bar=False, overlays_per_task=0).run(model, tasks)
    return model.eval(), root, output


@pytest.fixture(scope="module")
def onnx_export(two_task_run: tuple[MoleFlow, Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(two_task_run[0], tmp_path_factory.mktemp("deploy_onnx"), "onnx")


def _files(root: Path) -> list[Path]:
    return [path for category in TINY_CATEGORIES for path in sorted((root / category / "test").rglob("*.png"))[:4]]


def _load_loader(folder: Path) -> ModuleType:
    """The loader that the export copied beside the model, imported from there (as a user on another PC would)."""
    spec = importlib.util.spec_from_file_location("moleflow_inferencer", folder / LOADER_NAME)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _assert_matches_pytorch(model: MoleFlow, path: Path, root: Path) -> None:
    loader = _load_loader(path.parent)
    inferencer = loader.RoutedInferencer(path)
    assert inferencer.task_names == list(LEARNED)
    images = torch.stack([read_image(file, as_tensor=True) for file in _files(root)])
    out = inferencer.run(images.numpy())
    assert list(out) == list(ROUTED_OUTPUTS)
    with torch.no_grad():
        raw, final, routed = model.score_images(images)
    # routing: each learned product to its task, the third flagged as unknown
    assert out["routed_task"].tolist() == routed.task.tolist()
    assert out["unknown_product"].tolist() == routed.unknown.tolist()
    assert routed.task[:4].tolist() == [0] * 4
    assert routed.task[-4:].tolist() == [1] * 4
    assert routed.unknown.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    for name, expected in (
        ("pred_score", final.pred_score),
        ("raw_score", raw.pred_score),
        ("anomaly_map", final.anomaly_map),
        ("router_distance", routed.distance),
    ):
        torch.testing.assert_close(torch.from_numpy(out[name]), expected.float(), atol=1e-3, rtol=1e-5, msg=name)
    # Labels agree wherever the score is not within float tolerance of the 0.5 threshold. The adaptive threshold is
    # one validation image's own raw score, so that image normalises to exactly 0.5: a tie that 1e-5 can flip.
    clear = (final.pred_score - 0.5).abs() > 1e-3
    assert clear.sum() >= len(clear) - 2
    assert out["pred_label"][clear.numpy()].tolist() == final.pred_label[clear].tolist()
    single = inferencer.run(images[-1:].numpy())  # a batch of one image
    np.testing.assert_allclose(single["pred_score"], out["pred_score"][-1:], atol=1e-5)
    with pytest.raises(ValueError, match="images, got shape"):  # not the model's size: read_image resizes files
        inferencer.run(np.zeros((1, 3, 32, 32), dtype=np.float32))


def test_onnx_export_of_a_two_task_model_matches_pytorch(
    two_task_run: tuple[MoleFlow, Path, Path], onnx_export: Path
) -> None:
    model, root, _ = two_task_run
    assert [path.grid for path in model.model.paths] == [(16, 16), (8, 8)]  # the default: one flow per stage
    assert onnx_export.name == "model.onnx"
    assert sorted(path.name for path in onnx_export.parent.iterdir()) == [
        "metadata.json",
        "model.onnx",
        LOADER_NAME,
    ]
    _assert_matches_pytorch(model, onnx_export, root)


@pytest.mark.parametrize(
    ("settings", "grids"),
    [
        # the study's layout (score maps): one density over both stages on the finest grid
        ({"flow_layout": "joint", "anomaly_map_value": "score"}, [(16, 16)]),
        # two flows on the coarse stage, averaged before the stages
        ({"whitening_norm": ["image", ["image", "patch_floored"]]}, [(16, 16), (8, 8), (8, 8)]),
    ],
    ids=["joint", "two_norms_on_a_stage"],
)
def test_onnx_export_of_other_flow_layouts_matches_pytorch(
    tmp_path_factory: pytest.TempPathFactory, settings: dict[str, object], grids: list[tuple[int, int]]
) -> None:
    root = tmp_path_factory.mktemp("deploy_joint_data")
    generate_dataset(root, TINY_CATEGORIES, SyntheticConfig(image_size=64, n_train=16, n_test_good=4, n_test_defect=2))
    seed_everything(0, verbose=False)
    model = MoleFlow(**{**TINY_MODEL_KWARGS, **settings})
    assert [path.grid for path in model.model.paths] == grids
    tasks = [MVTecAD(root=root, category=c, train_batch_size=4, eval_batch_size=8, num_workers=0) for c in LEARNED]
    output = tmp_path_factory.mktemp("deploy_joint_run")
    ContinualEngine(output_dir=output, enable_progress_bar=False, overlays_per_task=0).run(model, tasks)
    model.eval()
    _assert_matches_pytorch(model, export_model(model, tmp_path_factory.mktemp("deploy_joint_onnx"), "onnx"), root)


def test_openvino_export_matches_pytorch(two_task_run: tuple[MoleFlow, Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    model, root, _ = two_task_run
    path = export_model(model, tmp_path, "openvino")
    assert path.name == "model.xml"
    assert (tmp_path / "model.bin").is_file()
    assert not (tmp_path / "model.onnx").exists()
    _assert_matches_pytorch(model, path, root)


def test_exported_model_runs_without_torch_and_agrees_with_moleflow_predict(
    two_task_run: tuple[MoleFlow, Path, Path], onnx_export: Path, tmp_path: Path
) -> None:
    model, root, _ = two_task_run
    from PIL import Image

    folder = tmp_path / "line"
    for index, file in enumerate(_files(root)):
        target = folder / file.parent.parent.parent.name / f"{file.parent.name}_{file.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.read_bytes())
        if index % 4 == 0:  # a camera image of another size: both sides resize it to the model's 64 x 64
            with Image.open(file) as image:
                image.resize((100, 80), Image.Resampling.BICUBIC).save(target.with_name(f"big_{target.name}"))
    exported_csv = tmp_path / "exported.csv"
    script = f"""
import runpy, sys
sys.argv = ["{LOADER_NAME}", r"{onnx_export}", r"{folder}", "--csv", r"{exported_csv}", "--batch_size", "5"]
try:
    runpy.run_path(r"{onnx_export.parent / LOADER_NAME}", run_name="__main__")
except SystemExit as exit:
    assert exit.code == 0, exit.code
loaded = sorted(name for name in sys.modules if name.split(".")[0] in {{"torch", "anomalib", "anomalib_moleflow"}})
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=240, cwd=tmp_path)
    reference = predict_folder(model, folder, tmp_path / "predict", overlays=False, progress=False).csv
    with exported_csv.open() as handle:
        exported = list(csv.DictReader(handle))
    with reference.open() as handle:
        expected = list(csv.DictReader(handle))
    assert list(exported[0]) == list(COLUMNS)
    assert [row["image_path"] for row in exported] == [row["image_path"] for row in expected]
    for got, want in zip(exported, expected, strict=True):
        assert (got["routed_task"], got["unknown_product"]) == (want["routed_task"], want["unknown_product"])
        assert float(got["normalized_score"]) == pytest.approx(float(want["normalized_score"]), abs=1e-3)
        assert float(got["raw_score"]) == pytest.approx(float(want["raw_score"]), abs=1e-3)
        if abs(float(want["normalized_score"]) - 0.5) > 1e-3:
            assert got["label"] == want["label"]


def test_exported_loader_scores_every_readable_image_and_names_every_unreadable_one(
    two_task_run: tuple[MoleFlow, Path, Path], onnx_export: Path, tmp_path: Path
) -> None:
    _, root, _ = two_task_run
    folder = tmp_path / "line"
    folder.mkdir()
    files = _files(root)[:3]
    for file in files:
        (folder / file.name).write_bytes(file.read_bytes())
    data = files[0].read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "ground_truth").mkdir()
    (folder / "ground_truth" / "000_mask.png").write_bytes(data)  # a mask folder: skipped
    output = tmp_path / "out.csv"
    completed = subprocess.run(
        [sys.executable, str(onnx_export.parent / LOADER_NAME), str(onnx_export), str(folder), "--csv", str(output)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert completed.returncode == 1
    assert "truncated.png" in completed.stderr
    assert "Traceback" not in completed.stderr
    with output.open() as handle:
        rows = {Path(row["image_path"]).name: row for row in csv.DictReader(handle)}
    assert set(rows) == {*(file.name for file in files), "truncated.png"}
    assert "unreadable image" in rows["truncated.png"]["error"]
    assert all(rows[file.name]["error"] == "" and rows[file.name]["routed_task"] for file in files)
    assert "1 mask file(s) skipped" in completed.stdout


def test_anomalib_engine_exports_run_in_anomalib_inferencers(
    two_task_run: tuple[MoleFlow, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine

    model, root, _ = two_task_run
    engine = Engine(default_root_dir=tmp_path, logger=False)
    images = torch.stack([read_image(file, as_tensor=True) for file in _files(root)])
    with torch.no_grad():
        expected = model(images)
    onnx_path = engine.export(model, ExportType.ONNX, export_root=tmp_path / "onnx")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    pred_score, _, anomaly_map, _ = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    np.testing.assert_allclose(pred_score, expected.pred_score.numpy(), atol=1e-3)
    np.testing.assert_allclose(anomaly_map, expected.anomaly_map.numpy(), atol=1e-3)
    if importlib.util.find_spec("openvino") is None:
        return
    from anomalib.deploy import OpenVINOInferencer

    monkeypatch.chdir(tmp_path)  # the inferencer writes its cache folder into the working directory
    xml = engine.export(model, ExportType.OPENVINO, export_root=tmp_path / "openvino")
    inferencer = OpenVINOInferencer(path=xml, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})
    for index in (0, 11):
        prediction = inferencer.predict(images[index].numpy())
        np.testing.assert_allclose(prediction.pred_score.reshape(-1), expected.pred_score[index : index + 1], atol=1e-3)


def test_export_command_refuses_a_used_folder_and_a_task_separated_model(
    two_task_run: tuple[MoleFlow, Path, Path], onnx_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, _, output = two_task_run
    argv = ["export", "--ckpt", str(output / "model.ckpt"), "--output", str(onnx_export.parent)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "--overwrite" in error
    assert "--resume" not in error
    separated = MoleFlow(**{**TINY_MODEL_KWARGS, "task_separated": True})
    separated.add_task("a")
    with pytest.raises(ValueError, match="task-separated"):
        export_model(separated, tmp_path / "separated", "onnx")
    with pytest.raises(ValueError, match="no task"):
        export_model(MoleFlow(**TINY_MODEL_KWARGS), tmp_path / "empty", "onnx")

"""MoleFlow inside anomalib: Engine fit/validate/test/predict/train-from-checkpoint, and the anomalib CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_moleflow import MoleFlow
from anomalib_moleflow.models.moleflow.post_processor import STAT_COLUMNS

from conftest import TINY_CATEGORIES, TINY_MODEL_KWARGS

METRIC_KEYS = {"image_AUROC", "image_AUPR", "pixel_AUROC", "pixel_AUPR", "pixel_AUPRO"}


def _datamodule(root: Path, category: str) -> MVTecAD:
    return MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=8, num_workers=0)


def _engine(root_dir: Path, **kwargs) -> Engine:
    return Engine(default_root_dir=root_dir, logger=False, enable_progress_bar=False, accelerator="cpu", **kwargs)


def test_engine_fit_validate_test_predict_and_train_from_checkpoint(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    seed_everything(0)
    category = TINY_CATEGORIES[0]
    model = MoleFlow(**TINY_MODEL_KWARGS)
    engine = _engine(tmp_path / "a")
    engine.fit(model, datamodule=_datamodule(tiny_mvtec_root, category))
    assert model.task_names == [category]  # named after the datamodule's category
    checkpoint = engine.trainer.checkpoint_callback.best_model_path or engine.best_model_path
    assert checkpoint
    assert Path(checkpoint).exists()

    # Validation computes the task's thresholds and min/max: wipe them, then validate in a new Engine.
    fitted_stats = model.post_processor.task_stats.clone()
    assert fitted_stats.shape == (1, len(STAT_COLUMNS))
    assert torch.isfinite(fitted_stats).all()
    model.post_processor.task_stats.fill_(float("nan"))
    validated = _engine(tmp_path / "b").validate(model, datamodule=_datamodule(tiny_mvtec_root, category))
    assert isinstance(validated, list)
    assert len(validated) == 1  # one validation dataloader
    stats = model.post_processor.stats_of(0)
    torch.testing.assert_close(model.post_processor.task_stats, fitted_stats)  # same data: same statistics again
    assert stats["image_min"] <= stats["image_threshold"] <= stats["image_max"]
    assert stats["pixel_min"] <= stats["pixel_threshold"] <= stats["pixel_max"]
    assert stats["image_min"] < stats["image_max"]

    tested = _engine(tmp_path / "c").test(model, datamodule=_datamodule(tiny_mvtec_root, category))
    assert set(tested[0]) >= METRIC_KEYS
    assert all(0.0 <= tested[0][key] <= 1.0 for key in METRIC_KEYS), tested[0]

    predictions = _engine(tmp_path / "d").predict(model, datamodule=_datamodule(tiny_mvtec_root, category))
    batch = predictions[0]
    assert batch.pred_score.shape[0] == batch.image.shape[0]
    assert batch.anomaly_map.shape[-2:] == (TINY_MODEL_KWARGS["image_size"],) * 2
    assert torch.all((batch.pred_score >= 0) & (batch.pred_score <= 1))  # normalised with the task's statistics
    # The label is the normalised score against anomalib's normalised threshold (0.5) ...
    assert batch.pred_label.dtype == torch.bool
    assert batch.pred_label.shape == batch.pred_score.shape
    threshold = model.post_processor.normalized_image_threshold.item()
    assert threshold == pytest.approx(0.5)
    assert torch.equal(batch.pred_label, batch.pred_score > threshold)
    # ... which is the raw score against the task's own (un-normalised) image threshold.
    model.eval()
    with torch.no_grad():
        raw, (task_ids, _, _) = model.model.predict(batch.image)  # batch.image is already pre-processed
    assert task_ids.tolist() == [0] * batch.image.shape[0]
    assert torch.equal(batch.pred_label, raw.pred_score > model.post_processor.stats_of(0)["image_threshold"])
    assert batch.pred_mask.dtype == torch.bool
    assert batch.pred_mask.shape == batch.anomaly_map.shape

    # Train-from-checkpoint: a new model and Engine continue training the same task for one more epoch.
    seed_everything(0)
    resumed = MoleFlow(**{**TINY_MODEL_KWARGS, "max_epochs": 2})
    before = torch.load(checkpoint, weights_only=False)["state_dict"]
    resume_engine = _engine(tmp_path / "e")
    resume_engine.fit(resumed, datamodule=_datamodule(tiny_mvtec_root, category), ckpt_path=checkpoint)
    assert resumed.task_names == [category]
    assert resume_engine.trainer.current_epoch == 2
    after = resumed.state_dict()
    expert = next(k for k in before if ".experts.0.lora_b" in k)
    assert not torch.equal(before[expert], after[expert])  # it really trained on


def _anomalib(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    executable = shutil.which("anomalib")
    assert executable, "anomalib's CLI is not installed"
    return subprocess.run([executable, *args], capture_output=True, text=True, cwd=cwd, check=False)


def _load_config(config: str) -> dict:
    """A YAML config of the repository."""
    import yaml

    return yaml.safe_load((Path(__file__).resolve().parents[1] / config).read_text())


def _config_section(config: str, section: tuple[str, ...]) -> dict:
    """The settings under ``section`` (nested keys) of a YAML config of the repository."""
    settings = _load_config(config)
    for key in section:
        settings = settings[key]
    return settings


def _model_args() -> list[str]:
    kwargs = TINY_MODEL_KWARGS
    args = ["--model", "anomalib_moleflow.MoleFlow"]
    for key in ("backbone", "image_size", "embed_dim", "lora_rank", "num_coupling_layers", "dia_blocks", "max_epochs"):
        args += [f"--model.{key}", str(kwargs[key])]
    return [*args, "--model.layers", "[" + ", ".join(kwargs["layers"]) + "]", "--model.pre_trained", "false"]


def test_anomalib_cli_train_then_test(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    data = ["--data", "anomalib.data.MVTecAD", "--data.root", str(tiny_mvtec_root), "--data.category"]
    data += [TINY_CATEGORIES[2], "--data.num_workers", "0", "--data.train_batch_size", "4"]
    trained = _anomalib("train", *_model_args(), *data, "--default_root_dir", str(tmp_path), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    assert checkpoints
    tested = _anomalib(
        "test",
        *_model_args(),
        *data,
        "--default_root_dir",
        str(tmp_path),
        "--ckpt_path",
        str(checkpoints[0]),
        cwd=tmp_path,
    )
    assert tested.returncode == 0, tested.stderr[-3000:]
    for key in METRIC_KEYS:
        # anomalib prints a table "metric | value": each metric must have a real value in [0, 1]
        found = re.search(rf"{key}\b[^\w\n]*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?|nan)", tested.stdout)
        assert found, f"{key} has no value in:\n{tested.stdout[-3000:]}"
        assert 0.0 <= float(found.group(1)) <= 1.0, (key, found.group(1))


@pytest.mark.parametrize(
    ("config", "section"),
    [
        ("configs/moleflow.yaml", ("model", "init_args")),
        ("configs/continual/mvtec_1x1.yaml", ("model",)),
        ("configs/continual/elpv.yaml", ("model",)),
        ("configs/benchmark/mvtec_1x1.yaml", ("moleflow",)),
    ],
)
def test_study_configs_keep_the_studys_training(config: str, section: tuple[str, ...]) -> None:
    """Where our defaults depart from the study, every config that reproduces the study sets the study's value."""
    settings = _config_section(config, section)
    assert settings["exact_likelihood"] is False
    assert settings["patch_size"] == 3
    assert settings["whitening_norm"] == "patch"
    assert settings["average_last"] == 0.0
    assert settings["score_calibration"] == "none"
    assert settings["flow_layout"] == "joint"
    assert settings["anomaly_map_value"] == "score"


@pytest.mark.parametrize(
    ("config", "section"),
    [
        ("configs/continual/mvtec_dinov2.yaml", ("model",)),
        ("configs/benchmark/elpv_offline.yaml", ("moleflow",)),
    ],
)
def test_configs_with_recorded_tables_keep_the_layout_and_map_they_were_recorded_with(
    config: str, section: tuple[str, ...]
) -> None:
    """Configs whose tables were recorded with one joint flow and score maps keep both after the defaults changed."""
    settings = _config_section(config, section)
    assert (settings["flow_layout"], settings["anomaly_map_value"]) == ("joint", "score")


@pytest.mark.parametrize(
    "config", ["configs/benchmark/product_line.yaml", "configs/benchmark/product_line_masked.yaml"]
)
def test_product_line_configs_train_as_the_quality_benchmark(config: str) -> None:
    """A product line learned as one task compares with quality.yaml's two tasks: every other setting is the same."""
    product_line, quality = (_load_config(name) for name in (config, "configs/benchmark/quality.yaml"))
    assert product_line["moleflow"] == quality["moleflow"]
    shared = ("backbone", "layers", "pre_trained", "image_size", "seeds")
    assert {key: product_line[key] for key in shared} == {key: quality[key] for key in shared}
    task_names = {spec.get("task", index) for index, spec in enumerate(product_line["tasks"])}
    assert len(task_names) < len(quality["tasks"])  # two of the quality benchmark's tasks learned as one


def test_shifted_quality_config_differs_from_quality_yaml_only_by_its_training_shifts() -> None:
    """quality_shifted.yaml (docs/quality.md 0p) is quality.yaml plus one random shift per task's training images."""
    from torchvision.transforms import v2

    from anomalib_moleflow.data import build_tasks

    shifted, quality = (_load_config(f"configs/benchmark/{name}.yaml") for name in ("quality_shifted", "quality"))
    members = [member for task in build_tasks(shifted["tasks"]) for member in task.members]
    assert [type(member.train_augmentations) for member in members] == [v2.RandomAffine] * len(members)
    assert all(member.train_augmentations.translate == [0.03, 0.03] for member in members)
    transforms = [spec["dataset"]["init_args"].pop("train_augmentations") for spec in shifted["tasks"]]
    assert len(transforms) == len(quality["tasks"])
    assert {key: value for key, value in shifted.items() if key != "output"} == {
        key: value for key, value in quality.items() if key != "output"
    }


@pytest.mark.parametrize("config", ["configs/moleflow.yaml"])
def test_main_config_matches_the_constructor_defaults(config: str) -> None:
    init_args = _config_section(config, ("model", "init_args"))
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(MoleFlow.__init__).parameters.items()}
    architecture = {"backbone", "layers", "image_size", "embed_dim", "num_coupling_layers", "dia_blocks", "lora_rank"}
    assert architecture | {"lr", "max_epochs", "freeze_base"} <= set(init_args)  # the config spells the main settings
    # Our defaults depart from the study's MAIN in eleven documented places only (docs/quality.md): embed_dim is
    # derived from the backbone (768 for WRN50 layer2+layer3, the study's value), the likelihood is exact, the
    # patch embedding has no 3x3 average, the whitening normalises each image instead of each patch, the router
    # takes the max embedding and one pooled covariance, Adam's lr is 3e-3 instead of 3e-4, each task ends with
    # the mean of its last half's weights instead of the last step's, each position's score is calibrated, each
    # backbone stage has its own flow, and the map is each patch's likelihood capped by its positional score.
    from anomalib_moleflow.models.moleflow.components.embedding import default_embed_dim

    assert default_embed_dim(512 + 1024) == init_args["embed_dim"] == 768
    assert init_args["exact_likelihood"] is False
    assert init_args["patch_size"] == 3
    assert init_args["whitening_norm"] == "patch"
    assert defaults["embed_dim"] is None
    assert defaults["exact_likelihood"] is True
    assert defaults["patch_size"] == 1
    assert defaults["whitening_norm"] == "image"
    assert (init_args["router_embedding"], init_args["router_covariance"]) == ("mean", "task")
    assert (defaults["router_embedding"], defaults["router_covariance"]) == ("quadrant_max", "pooled")
    assert (init_args["lr"], defaults["lr"]) == (3e-4, 3e-3)
    assert (init_args["average_last"], defaults["average_last"]) == (0.0, 0.5)
    assert (init_args["score_calibration"], defaults["score_calibration"]) == ("none", "position")
    assert (init_args["flow_layout"], defaults["flow_layout"]) == ("joint", "stage")
    assert (init_args["anomaly_map_value"], defaults["anomaly_map_value"]) == ("score", "calibrated_likelihood")
    for key, value in init_args.items():
        study_only = {
            "embed_dim",
            "exact_likelihood",
            "patch_size",
            "whitening_norm",
            "flow_layout",
            "anomaly_map_value",
        }
        if key in study_only | {"router_embedding", "router_covariance", "lr", "average_last", "score_calibration"}:
            continue
        expected = list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]
        assert value == expected, key

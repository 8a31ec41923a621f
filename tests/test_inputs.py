"""Bad input: files that are not images fail early and clearly; grayscale and RGBA pictures just work."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from anomalib.data import MVTecAD
from lightning.pytorch import seed_everything
from PIL import Image

from anomalib_moleflow import MoleFlow
from anomalib_moleflow.data import DatasetError, check_datamodule
from anomalib_moleflow.engine import ContinualEngine

from conftest import TINY_CATEGORIES, TINY_MODEL_KWARGS


def _copy_category(root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(root / TINY_CATEGORIES[0], target / TINY_CATEGORIES[0])
    return target


def test_not_an_image_is_reported_with_its_path(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    root = _copy_category(tiny_mvtec_root, tmp_path)
    broken = root / TINY_CATEGORIES[0] / "train" / "good" / "999.png"
    broken.write_text("this is not a picture")
    datamodule = MVTecAD(root=root, category=TINY_CATEGORIES[0], num_workers=0)
    with pytest.raises(DatasetError, match=r"999\.png.*not a readable image"):
        check_datamodule(datamodule)
    engine = ContinualEngine(output_dir=tmp_path / "out", enable_progress_bar=False, overlays_per_task=0)
    with pytest.raises(DatasetError):
        engine.run(MoleFlow(**TINY_MODEL_KWARGS), [datamodule])
    assert not (tmp_path / "out" / "model.ckpt").exists()


def test_grayscale_and_rgba_images_are_accepted(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    root = _copy_category(tiny_mvtec_root, tmp_path)
    train = sorted((root / TINY_CATEGORIES[0] / "train" / "good").glob("*.png"))
    Image.open(train[0]).convert("L").save(train[0])
    Image.open(train[1]).convert("RGBA").save(train[1])
    test_good = sorted((root / TINY_CATEGORIES[0] / "test" / "good").glob("*.png"))
    Image.open(test_good[0]).convert("LA").save(test_good[0])
    datamodule = MVTecAD(root=root, category=TINY_CATEGORIES[0], train_batch_size=4, eval_batch_size=8, num_workers=0)
    check_datamodule(datamodule)
    # The converted pictures load as 3-channel images of the same size as the RGB ones.
    datamodule.setup()
    datasets = (datamodule.train_data, datamodule.val_data, datamodule.test_data)
    for path in (train[0], train[1], test_good[0]):
        items = [d[i] for d in datasets for i, p in enumerate(d.samples["image_path"]) if Path(p) == path]
        assert items, f"{path} is in no split"
        assert all(item.image.shape == (3, 64, 64) for item in items), path
    seed_everything(0)
    results = ContinualEngine(output_dir=tmp_path / "out", enable_progress_bar=False, overlays_per_task=0).run(
        MoleFlow(**TINY_MODEL_KWARGS), [datamodule]
    )
    assert results["tasks"] == [TINY_CATEGORIES[0]]
    for metric, value in results["final"].items():
        assert 0.0 <= value <= 1.0, (metric, value)  # every metric computed from finite scores

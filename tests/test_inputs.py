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


def _mvtec(root: Path, category: str = TINY_CATEGORIES[0]) -> MVTecAD:
    return MVTecAD(root=root, category=category, train_batch_size=4, eval_batch_size=8, num_workers=0)


def test_missing_category_in_an_existing_root_names_the_category_folder(tiny_mvtec_root: Path) -> None:
    with pytest.raises(DatasetError) as error:
        check_datamodule(_mvtec(tiny_mvtec_root, "bottle"))
    message = str(error.value)
    assert f"'{tiny_mvtec_root / 'bottle' / 'train'}' does not exist" in message
    assert TINY_CATEGORIES[0] in message  # the categories that are there


def test_empty_training_folder_is_named(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    root = _copy_category(tiny_mvtec_root, tmp_path)
    train = root / TINY_CATEGORIES[0] / "train" / "good"
    for path in train.iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=f"No training images in '{train}'"):
        check_datamodule(_mvtec(root))


def test_defect_image_without_its_mask_is_named(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    root = _copy_category(tiny_mvtec_root, tmp_path)
    mask = sorted((root / TINY_CATEGORIES[0] / "ground_truth").rglob("*.png"))[0]
    mask.unlink()
    image = mask.parents[2] / "test" / mask.parent.name / f"{mask.stem.removesuffix('_mask')}.png"
    with pytest.raises(DatasetError, match=f"Defect image '{image}' has no mask"):
        check_datamodule(_mvtec(root))


def test_mask_of_another_size_is_named(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    root = _copy_category(tiny_mvtec_root, tmp_path)
    mask = sorted((root / TINY_CATEGORIES[0] / "ground_truth").rglob("*.png"))[0]
    Image.open(mask).resize((32, 32)).save(mask)
    with pytest.raises(DatasetError, match=f"Mask '{mask}' is 32x32 px but its image .* is 64x64 px"):
        check_datamodule(_mvtec(root))


def test_generated_datamodules_are_checked_too(tmp_path: Path) -> None:
    from anomalib_moleflow.data import SyntheticMVTecAD

    datamodule = SyntheticMVTecAD(root=tmp_path, category="wood", image_size=64, n_train=2, n_test_good=1)
    datamodule.num_workers = 0
    check_datamodule(datamodule)  # generated, then checked like any folder
    mask = sorted((tmp_path / "wood" / "ground_truth").rglob("*.png"))[0]
    Image.open(mask).resize((16, 16)).save(mask)
    with pytest.raises(DatasetError, match="Masks must have their image's size"):
        check_datamodule(SyntheticMVTecAD(root=tmp_path, category="wood", image_size=64, n_train=2, n_test_good=1))


def test_16_bit_images_are_refused_then_read_correctly_after_conversion(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    import numpy as np

    from anomalib_moleflow.data.convert import convert_8bit

    root = _copy_category(tiny_mvtec_root, tmp_path)
    train = sorted((root / TINY_CATEGORIES[0] / "train" / "good").glob("*.png"))
    gray = np.asarray(Image.open(train[0]).convert("L"), dtype=np.uint16)
    Image.fromarray(gray * 64).save(train[0])  # 16-bit PNG, values up to 16320
    assert Image.open(train[0]).mode.startswith("I")
    with pytest.raises(DatasetError, match=r"16-bit.*moleflow convert-8bit"):
        check_datamodule(_mvtec(root))
    converted = tmp_path / "converted"
    assert convert_8bit(root, converted) == 1
    check_datamodule(_mvtec(converted))
    image = np.asarray(Image.open(converted / train[0].relative_to(root)))
    assert image.dtype == np.uint8
    # One scale for the dataset (its largest value -> 255): the picture is the original, not white.
    expected = np.rint(gray.astype(float) * 64 * 255 / (int(gray.max()) * 64))
    assert np.abs(image.astype(float) - expected).max() <= 1
    assert 0 < image.mean() < 250
    with pytest.raises(FileExistsError):
        convert_8bit(root, converted)

"""Tests of the procedural MVTec-AD-layout demo dataset (``anomalib_moleflow.data.synthetic``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from anomalib.data.datasets import MVTecADDataset
from PIL import Image

from anomalib_moleflow.data.checks import DatasetError
from anomalib_moleflow.data.files import ForeignFolderError
from anomalib_moleflow.data.synthetic import (
    DEFECT_TYPES,
    DEMO_CATEGORIES,
    MARKER_NAME,
    OBJECT_CATEGORIES,
    TEXTURE_CATEGORIES,
    SyntheticConfig,
    generate_category,
    generate_dataset,
    render_sample,
)

SMALL = SyntheticConfig(image_size=64, n_train=4, n_test_good=2, n_test_defect=3, seed=0)


def _png_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All demo categories generated once at a small size."""
    return generate_dataset(tmp_path_factory.mktemp("synthetic"), config=SMALL)


def test_public_constants() -> None:
    assert len(DEMO_CATEGORIES) >= 4
    assert len(TEXTURE_CATEGORIES) >= 2
    assert len(OBJECT_CATEGORIES) >= 2
    assert set(DEMO_CATEGORIES) == set(TEXTURE_CATEGORIES) | set(OBJECT_CATEGORIES)
    assert len(set(DEMO_CATEGORIES)) == len(DEMO_CATEGORIES)
    assert all(name.isascii() and name.islower() and name.isidentifier() for name in DEMO_CATEGORIES)
    assert len(DEFECT_TYPES) >= 3
    assert "good" not in DEFECT_TYPES
    defaults = SyntheticConfig()
    assert (defaults.image_size, defaults.n_train, defaults.n_test_good, defaults.n_test_defect, defaults.seed) == (
        128,
        40,
        10,
        6,
        0,
    )


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
def test_layout(dataset_root: Path, category: str) -> None:
    folder = dataset_root / category
    expected = {f"{i:03d}.png" for i in range(SMALL.n_train)}
    assert {p.name for p in (folder / "train" / "good").iterdir()} == expected
    assert {p.name for p in (folder / "test" / "good").iterdir()} == {f"{i:03d}.png" for i in range(SMALL.n_test_good)}
    assert {p.name for p in (folder / "train").iterdir()} == {"good"}
    assert {p.name for p in (folder / "test").iterdir()} == {"good", *DEFECT_TYPES}
    assert {p.name for p in (folder / "ground_truth").iterdir()} == set(DEFECT_TYPES)
    for defect in DEFECT_TYPES:
        names = {f"{i:03d}" for i in range(SMALL.n_test_defect)}
        assert {p.name for p in (folder / "test" / defect).iterdir()} == {f"{n}.png" for n in names}
        assert {p.name for p in (folder / "ground_truth" / defect).iterdir()} == {f"{n}_mask.png" for n in names}
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["config"] == {"image_size": 64, "n_train": 4, "n_test_good": 2, "n_test_defect": 3, "seed": 0}
    assert marker["category"] == category
    # No temporary or backup folders are left behind.
    assert sorted(p.name for p in dataset_root.iterdir()) == sorted(DEMO_CATEGORIES)


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
def test_images_and_masks(dataset_root: Path, category: str) -> None:
    folder = dataset_root / category
    for path in _png_files(folder / "train") + _png_files(folder / "test"):
        with Image.open(path) as image:
            assert image.mode == "RGB"
            assert image.size == (64, 64)
    fractions = []
    for defect in DEFECT_TYPES:
        for index in range(SMALL.n_test_defect):
            with Image.open(folder / "ground_truth" / defect / f"{index:03d}_mask.png") as mask_image:
                assert mask_image.mode == "L"
                assert mask_image.size == (64, 64)
                mask = np.asarray(mask_image)
            assert set(np.unique(mask)) <= {0, 255}
            assert mask.any(), f"empty mask for {category}/{defect}/{index}"
            fractions.append(float((mask > 0).mean()))
    # Defects of several sizes, including small ones.
    assert min(fractions) < 0.01
    assert max(fractions) > 3 * min(fractions)
    assert max(fractions) < 0.2


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
def test_defective_equals_normal_outside_mask(category: str) -> None:
    for defect in DEFECT_TYPES:
        for index in range(SMALL.n_test_defect):
            normal, image, mask = render_sample(category, defect, index, SMALL)
            assert normal.shape == image.shape == (64, 64, 3)
            assert normal.dtype == image.dtype == mask.dtype == np.uint8
            assert mask.shape == (64, 64)
            outside = mask == 0
            np.testing.assert_array_equal(image[outside], normal[outside])
            # The mask marks altered pixels: most of it differs from the normal image.
            changed = np.abs(image.astype(int) - normal.astype(int)).max(axis=-1) > 0
            assert changed[~outside].mean() > 0.5
    normal, image, mask = render_sample(category, "train", 0, SMALL)
    np.testing.assert_array_equal(normal, image)
    assert not mask.any()


def test_written_files_match_render_sample(dataset_root: Path) -> None:
    for category in DEMO_CATEGORIES:
        _, image, mask = render_sample(category, "hole", 1, SMALL)
        np.testing.assert_array_equal(_load(dataset_root / category / "test" / "hole" / "001.png"), image)
        np.testing.assert_array_equal(_load(dataset_root / category / "ground_truth" / "hole" / "001_mask.png"), mask)
        _, image, _ = render_sample(category, "train", 2, SMALL)
        np.testing.assert_array_equal(_load(dataset_root / category / "train" / "good" / "002.png"), image)


def test_objects_have_defects_on_the_object() -> None:
    # The pill lies on a dark background: every defect pixel of the pill must be on the bright pill body.
    for defect in DEFECT_TYPES:
        for index in range(SMALL.n_test_defect):
            normal, _, mask = render_sample("pill", defect, index, SMALL)
            assert normal[mask > 0].mean() > 100


def test_normal_images_vary(dataset_root: Path) -> None:
    for category in DEMO_CATEGORIES:
        images = [_load(p).astype(np.float32) for p in _png_files(dataset_root / category / "train" / "good")]
        for other in images[1:]:
            assert np.abs(other - images[0]).mean() > 1.0


def test_categories_are_visually_distinct(dataset_root: Path) -> None:
    stats = {}
    for category in DEMO_CATEGORIES:
        images = np.stack([_load(p).astype(np.float32) for p in _png_files(dataset_root / category / "train" / "good")])
        mean_colour = images.mean(axis=(0, 1, 2))
        gray = images.mean(axis=-1)
        roughness = np.abs(np.diff(gray, axis=-1)).mean()
        stats[category] = np.concatenate([mean_colour, [roughness]])
    names = list(stats)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            distance = np.abs(stats[first] - stats[second]).max()
            assert distance > 5.0, f"{first} and {second} look alike: {stats[first]} vs {stats[second]}"


def test_deterministic(tmp_path: Path) -> None:
    config = SyntheticConfig(image_size=48, n_train=2, n_test_good=1, n_test_defect=2, seed=3)
    first = generate_category(tmp_path / "a", "wood", config)
    second = generate_category(tmp_path / "b", "wood", config)
    files = [p.relative_to(first) for p in _png_files(first)]
    assert files == [p.relative_to(second) for p in _png_files(second)]
    assert len(files) == 2 + 1 + 2 * 2 * len(DEFECT_TYPES)
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes()


def test_seed_and_category_change_images() -> None:
    base = render_sample("woven", "train", 0, SMALL)[1]
    other_seed = render_sample("woven", "train", 0, SyntheticConfig(image_size=64, seed=1))[1]
    assert not np.array_equal(base, other_seed)
    # Train and test images are different samples.
    assert not np.array_equal(base, render_sample("woven", "good", 0, SMALL)[1])


def test_idempotent(tmp_path: Path) -> None:
    config = SyntheticConfig(image_size=32, n_train=2, n_test_good=1, n_test_defect=1)
    folder = generate_category(tmp_path, "pill", config)
    assert folder == tmp_path / "pill"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    assert generate_category(tmp_path, "pill", config) == folder
    assert generate_dataset(tmp_path, ["pill"], config) == tmp_path
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_changed_config_regenerates(tmp_path: Path) -> None:
    folder = generate_category(tmp_path, "screw", SyntheticConfig(image_size=32, n_train=3, n_test_defect=1))
    (folder / "stale.txt").write_text("left over")
    new_config = SyntheticConfig(image_size=40, n_train=2, n_test_good=1, n_test_defect=1)
    assert generate_category(tmp_path, "screw", new_config) == folder
    assert not (folder / "stale.txt").exists()
    assert sorted(p.name for p in (folder / "train" / "good").iterdir()) == ["000.png", "001.png"]
    assert _load(folder / "train" / "good" / "000.png").shape == (40, 40, 3)
    assert json.loads((folder / MARKER_NAME).read_text())["config"]["image_size"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["screw"]


def test_folder_without_marker_is_left_untouched(tmp_path: Path) -> None:
    # A folder named like a category but not made by the generator (e.g. a real MVTec AD category) is never replaced.
    config = SyntheticConfig(image_size=32, n_train=1, n_test_good=1, n_test_defect=1)
    user_file = tmp_path / "marble" / "train" / "good" / "999.png"
    user_file.parent.mkdir(parents=True)
    user_file.write_bytes(b"the user's image")
    with pytest.raises(ForeignFolderError, match="marble") as info:
        generate_category(tmp_path, "marble", config)
    assert isinstance(info.value, FileExistsError)
    assert isinstance(info.value, DatasetError)
    assert str(tmp_path / "marble") in str(info.value)
    assert "root" in str(info.value)
    assert user_file.read_bytes() == b"the user's image"
    assert [p.relative_to(tmp_path) for p in sorted(tmp_path.rglob("*"))] == [
        Path("marble"),
        Path("marble/train"),
        Path("marble/train/good"),
        Path("marble/train/good/999.png"),
    ]


def test_generate_dataset_checks_every_folder_before_writing(tmp_path: Path) -> None:
    (tmp_path / "screw").mkdir()
    (tmp_path / "screw" / "notes.txt").write_text("mine")
    with pytest.raises(ForeignFolderError, match="screw"):
        generate_dataset(tmp_path, ["wood", "screw"], SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["screw"]  # "wood" was not written either
    assert (tmp_path / "screw" / "notes.txt").read_text() == "mine"


def test_unknown_category(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid categories are") as info:
        generate_category(tmp_path, "carpet")
    assert all(name in str(info.value) for name in DEMO_CATEGORIES)
    with pytest.raises(ValueError, match="valid categories"):
        generate_dataset(tmp_path, ["wood", "nope"], SMALL)
    assert not any(tmp_path.iterdir())  # validated before writing anything
    with pytest.raises(ValueError, match="split"):
        render_sample("wood", "crack", 0, SMALL)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 16}, "image_size"),
        ({"image_size": 0}, "image_size"),
        ({"n_train": 0}, "n_train"),
        ({"n_test_good": -1}, "n_test_good"),
        ({"n_test_defect": 0}, "n_test_defect"),
        ({"seed": -1}, "seed"),
        ({"image_size": 64.0}, "integer"),
        ({"n_train": True}, "integer"),
    ],
)
def test_bad_config(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kwargs)


def test_anomalib_can_load_the_dataset(dataset_root: Path) -> None:

    train = MVTecADDataset(root=dataset_root, category="pill", split="train")
    test = MVTecADDataset(root=dataset_root, category="pill", split="test")
    assert len(train) == SMALL.n_train
    assert len(test) == SMALL.n_test_good + SMALL.n_test_defect * len(DEFECT_TYPES)
    assert int(test.samples.label_index.sum()) == SMALL.n_test_defect * len(DEFECT_TYPES)
    item = test[len(test) - 1]
    assert tuple(item.image.shape) == (3, 64, 64)
    assert tuple(item.gt_mask.shape) == (64, 64)
    assert bool(item.gt_mask.any())


def main(argv: list[str]) -> int:
    """``moleflow generate-demo ARGV``."""
    from anomalib_moleflow.cli.main import main as moleflow

    return moleflow(["generate-demo", *argv])


def test_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(tmp_path), "--categories", "[wood, pill]", "--image_size", "32", "--n_train", "2", "--seed", "5"]
    assert main(argv) == 0
    assert "wood" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pill", "wood"]
    marker = json.loads((tmp_path / "wood" / MARKER_NAME).read_text())
    assert marker["config"]["seed"] == 5
    assert marker["config"]["n_train"] == 2
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), "--image_size", "8"])
    assert info.value.code == 1
    assert "image_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), "--image-size", "32"])  # flags are spelled with underscores
    assert info.value.code == 2
    assert "moleflow" in capsys.readouterr().err


def test_main_refuses_foreign_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pill").mkdir()
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), "--categories", "[wood, pill]", "--image_size", "32", "--n_train", "1"])
    assert info.value.code == 1
    error = capsys.readouterr().err
    assert str(tmp_path / "pill") in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pill"]
    assert not any((tmp_path / "pill").iterdir())

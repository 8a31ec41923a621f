"""The real masked products of ``../shared/datasets`` (BSData, MPDD) as the quality benchmark reads them.

Skipped, with the reason, where the folder is absent (it lies beside the clone in CI and here; see its README).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
#: (set, category, train good, test images, defective test images) as ``../shared/datasets/README.md`` lists them.
PRODUCTS = [("bsdata", "ball_screw_drive", 550, 305, 167), ("mpdd", "metal_plate", 54, 97, 71)]

pytestmark = pytest.mark.skipif(
    not all((SHARED / name / category).is_dir() for name, category, *_ in PRODUCTS),
    reason=f"the real masked products are not in {SHARED} (the CI checkout has them beside the clone)",
)


def _datamodule(name: str, category: str) -> Any:
    from anomalib.data import MVTecAD

    return MVTecAD(root=SHARED / name, category=category, train_batch_size=8, eval_batch_size=16, num_workers=0)


@pytest.mark.parametrize(("name", "category", "train", "test", "defects"), PRODUCTS, ids=[p[1] for p in PRODUCTS])
def test_quality_benchmark_reads_each_product_with_its_masks(
    name: str, category: str, train: int, test: int, defects: int
) -> None:
    from anomalib_moleflow.data import check_datamodule

    datamodule = _datamodule(name, category)
    check_datamodule(datamodule)
    datamodule.setup()
    assert len(datamodule.train_data) == train
    samples = datamodule.test_data.samples
    assert len(samples) == test
    defective = samples[samples.label_index == 1]
    assert len(defective) == defects
    assert all(Path(mask).is_file() for mask in defective.mask_path)  # a real pixel mask for every defect
    assert datamodule.test_data.task.value == "segmentation"


def test_a_continual_run_on_a_real_product_scores_its_masks(tmp_path: Path) -> None:
    """A real product through the continual runner (tiny random backbone, one epoch): its pixel metrics are measured
    on the real masks, and nothing is written into the shared folder."""
    from anomalib_moleflow.engine.runner import run_continual

    before = sorted(path.stat().st_mtime_ns for path in (SHARED / "mpdd").rglob("*"))
    config = {
        "seed": 0,
        "output": str(tmp_path / "run"),
        "progress_bar": False,
        "threads": 1,
        "overlays_per_task": 0,
        "model": {
            "backbone": "resnet18",
            "layers": ["layer2"],
            "pre_trained": False,
            "image_size": 64,
            "num_coupling_layers": 1,
            "dia_blocks": 1,
            "lora_rank": 4,
            "max_epochs": 1,
        },
        "tasks": {
            "dataset": {
                "class_path": "anomalib.data.MVTecAD",
                "init_args": {
                    "root": str(SHARED / "mpdd"),
                    "train_batch_size": 8,
                    "eval_batch_size": 32,
                    "num_workers": 0,
                },
            },
            "categories": ["metal_plate"],
        },
    }
    results = run_continual(config)
    final = results["per_task_final"]["metal_plate"]
    assert math.isfinite(final["pixel_AUROC"])
    assert math.isfinite(final["pixel_AUPR"])
    assert 0.0 < final["pixel_AUPR"] <= 1.0
    assert sorted(path.stat().st_mtime_ns for path in (SHARED / "mpdd").rglob("*")) == before

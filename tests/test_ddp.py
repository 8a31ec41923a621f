"""One continual run on 2 CPU processes (Lightning's DDP, gloo) equals the same run in one process.

Each rank trains and tests on its shard of the images; what the ranks collect (router embeddings, position-whitening
sums, thresholds, min/max, metrics, routing) must combine to the one-process values. The learning rate is tiny so that
the flow cannot differ between the two runs (DDP averages gradients over other batches than one process does): every
remaining difference would come from combining the ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from anomalib_moleflow.data.synthetic import SyntheticConfig, generate_dataset
from anomalib_moleflow.engine.options import check_devices
from anomalib_moleflow.metrics import METRICS
from anomalib_moleflow.reports.results import read_csv

from conftest import TINY_CATEGORIES, TINY_MODEL_KWARGS

# 12 training and 6 test images per category: even, so that DistributedSampler pads no shard with a repeated image.
DATA = SyntheticConfig(image_size=64, n_train=12, n_test_good=4, n_test_defect=2, seed=0)


def _run(config: Path, output: Path, *devices: str) -> None:
    command = [
        sys.executable, "-m", "anomalib_moleflow.cli.main", "continual", "--config", str(config),
        "--output", str(output), "--accelerator", "cpu", *devices,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(command, capture_output=True, text=True, cwd=output.parent, timeout=600, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    data = generate_dataset(root / "data", TINY_CATEGORIES[:2], DATA)
    kwargs = {key: value for key, value in TINY_MODEL_KWARGS.items() if key != "visualizer"}
    model = {**kwargs, "layers": list(kwargs["layers"]), "lr": 1.0e-12, "max_epochs": 2, "whitening_norm": "position"}
    dataset = {"root": str(data), "train_batch_size": 4, "eval_batch_size": 4, "num_workers": 0}
    config: dict[str, Any] = {
        "seed": 0,
        "threads": 1,
        "progress_bar": False,
        "overlays_per_task": 0,
        "model": model,
        "tasks": {
            "dataset": {"class_path": "anomalib.data.MVTecAD", "init_args": dataset},
            "categories": list(TINY_CATEGORIES[:2]),
        },
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    _run(path, root / "one")
    _run(path, root / "two", "--devices", "2", "--strategy", "ddp")
    return root / "one", root / "two"


def test_ddp_metrics_and_routing_equal_one_process(runs: tuple[Path, Path]) -> None:
    one, two = (json.loads((path / "results.json").read_text()) for path in runs)
    for metric in METRICS:
        flat_one, flat_two = ([value for row in run["matrix"][metric] for value in row] for run in (one, two))
        assert [value is None for value in flat_two] == [value is None for value in flat_one], metric
        assert [v for v in flat_two if v is not None] == pytest.approx([v for v in flat_one if v is not None], abs=1e-6)
    assert two["routing_matrix"] == one["routing_matrix"]
    for task in ("00_" + TINY_CATEGORIES[0], "01_" + TINY_CATEGORIES[1]):
        csv = Path("tasks") / task / "test" / task[3:] / "routing.csv"
        rows_one, rows_two = (read_csv(run / csv) for run in runs)
        # every image, in order, written once, to the same task; the distance up to float32 rounding (each process
        # embeds other batches, and the backbone's kernels round batches of other sizes differently)
        assert [(r["image_path"], r["routed_task"], r["unknown_product"]) for r in rows_two] == [
            (r["image_path"], r["routed_task"], r["unknown_product"]) for r in rows_one
        ]
        distances_one, distances_two = ([float(r["router_distance"]) for r in rows] for rows in (rows_one, rows_two))
        assert distances_two == pytest.approx(distances_one, rel=1e-5)


def test_ddp_checkpoint_loads_in_one_process_with_the_combined_statistics(runs: tuple[Path, Path]) -> None:
    from anomalib_moleflow.models import MoleFlow

    one, two = (MoleFlow.load_from_checkpoint(path / "model.ckpt", map_location="cpu") for path in runs)
    assert two.task_names == one.task_names == list(TINY_CATEGORIES[:2])
    reference = one.state_dict()
    combined = [key for key in reference if ".router." in key or "task_stats" in key or "position_" in key]
    assert any(key.endswith("prototypes.0.count") for key in combined)
    for key, value in two.state_dict().items():
        if not isinstance(value, torch.Tensor):  # the settings' fingerprint (extra state)
            assert value == reference[key], key
            continue
        assert torch.allclose(value.double(), reference[key].double(), rtol=1e-5, atol=1e-6, equal_nan=True), key
    for task in range(2):  # each prototype saw every training image once, not a shard
        assert int(two.model.router.prototypes[task].count) == DATA.n_train
        assert float(two.model.router.prototypes[task].threshold) > 0  # enough images to measure the spread


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"strategy": "auto"}, "need --strategy ddp"),
        ({"strategy": "ddp", "baseline": True}, "DDP runs MoLE-Flow only"),
        ({"strategy": "ddp", "threshold": "good_fpr"}, "good_fpr"),
    ],
)
def test_several_devices_are_refused_where_ranks_cannot_combine(arguments: dict[str, Any], message: str) -> None:
    check_devices(1, **arguments)
    check_devices("[1]", **arguments)
    with pytest.raises(ValueError, match=message):
        check_devices(2, **arguments)

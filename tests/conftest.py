"""Fixtures shared by the whole test suite: tiny model settings, a tiny synthetic MVTec dataset, engine helpers.

Everything runs offline on CPU: backbones are built with ``pre_trained=False`` and the dataset is rendered on the fly
by :mod:`anomalib_moleflow.data.synthetic`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import seed_everything

from anomalib_moleflow.data.synthetic import OBJECT_CATEGORIES, TEXTURE_CATEGORIES, SyntheticConfig, generate_dataset

torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

#: Smallest useful MoLE-Flow: random ResNet-18, 64 px input (16 x 16 patch grid), D = 32.
TINY_MODEL_KWARGS: dict[str, Any] = {
    "backbone": "resnet18",
    "layers": ("layer1", "layer2"),
    "pre_trained": False,
    "image_size": 64,
    "embed_dim": 32,
    "lora_rank": 4,
    "num_coupling_layers": 2,
    "dia_blocks": 1,
    "max_epochs": 1,
    "visualizer": False,
}

#: Three visually distinct categories: two textures and one object (routing must separate them).
TINY_CATEGORIES: tuple[str, ...] = (TEXTURE_CATEGORIES[0], TEXTURE_CATEGORIES[2], OBJECT_CATEGORIES[0])

#: Size of the tiny synthetic dataset (``n_test_defect`` is per defect type: 4 types).
TINY_DATA_CONFIG = SyntheticConfig(image_size=64, n_train=8, n_test_good=4, n_test_defect=2, seed=0)


@pytest.fixture
def tiny_model_kwargs() -> dict[str, Any]:
    """A fresh copy of :data:`TINY_MODEL_KWARGS` (safe to modify)."""
    return dict(TINY_MODEL_KWARGS)


@pytest.fixture(scope="session")
def session_tiny_model_kwargs() -> dict[str, Any]:
    """:data:`TINY_MODEL_KWARGS` for module- or session-scoped fixtures (do not modify: copy first)."""
    return dict(TINY_MODEL_KWARGS)


@pytest.fixture(scope="session")
def tiny_categories() -> tuple[str, ...]:
    """The categories of :func:`tiny_mvtec_root`, in task order."""
    return TINY_CATEGORIES


@pytest.fixture(scope="session")
def tiny_mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny MVTec-layout dataset (64 px, 8 train / 4 good / 8 defective test images per category)."""
    root = tmp_path_factory.mktemp("tiny_mvtec")
    return generate_dataset(root, TINY_CATEGORIES, TINY_DATA_CONFIG)


def make_datamodule(root: Path | str, category: str, train_batch_size: int = 4, eval_batch_size: int = 8) -> Any:
    """anomalib ``MVTecAD`` datamodule on ``root/category`` with small batches and no worker process."""
    from anomalib.data import MVTecAD

    return MVTecAD(
        root=root,
        category=category,
        train_batch_size=train_batch_size,
        eval_batch_size=eval_batch_size,
        num_workers=0,
    )


def make_engine(tmp_path: Path | str, **kwargs: Any) -> Any:
    """A quiet single-CPU anomalib ``Engine`` writing under ``tmp_path``."""
    from anomalib.engine import Engine

    options: dict[str, Any] = {
        "default_root_dir": str(tmp_path),
        "logger": False,
        "enable_progress_bar": False,
        "accelerator": "cpu",
        "devices": 1,
    }
    options.update(kwargs)
    return Engine(**options)


@pytest.fixture(name="make_datamodule", scope="session")
def make_datamodule_fixture() -> Any:
    """Fixture form of :func:`make_datamodule`."""
    return make_datamodule


@pytest.fixture(name="make_engine", scope="session")
def make_engine_fixture() -> Any:
    """Fixture form of :func:`make_engine`."""
    return make_engine


@pytest.fixture
def seeded() -> int:
    """Seed Python, NumPy and torch (lightning's ``seed_everything``) with 0; returns the seed."""
    return seed_everything(0, workers=True, verbose=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run that collected no test is a failure, never a silent pass (pytest's exit code 5)."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

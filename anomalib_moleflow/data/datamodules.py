"""Datamodules: the generated MVTec-layout demo data and groups of categories learned as one task."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from anomalib import TaskType
from anomalib.data import AnomalibDataModule, MVTecAD

from .synthetic import DEMO_CATEGORIES, SyntheticConfig, generate_category


class SyntheticMVTecAD(MVTecAD):
    """anomalib's ``MVTecAD`` datamodule over the package's generated demo data.

    ``prepare_data`` generates the category (idempotent, atomic) instead of downloading MVTec AD, so it runs with
    no network. Every other behaviour is anomalib's.

    Args:
        root: Where the data is generated.
        category: One of :data:`~anomalib_moleflow.data.synthetic.DEMO_CATEGORIES`.
        image_size: Side of the generated images.
        n_train: Normal training images.
        n_test_good: Normal test images.
        n_test_defect: Test images per defect type.
        data_seed: Seed of the generator.
        **kwargs: Passed to ``MVTecAD`` (batch sizes, workers, splits...).
    """

    generates_data = True

    def __init__(
        self,
        root: Path | str = "./datasets/moleflow_demo",
        category: str = DEMO_CATEGORIES[0],
        image_size: int = 128,
        n_train: int = 40,
        n_test_good: int = 10,
        n_test_defect: int = 6,
        data_seed: int = 0,
        **kwargs: object,
    ) -> None:
        super().__init__(root=root, category=category, **kwargs)  # type: ignore[arg-type]
        self.synthetic_config = SyntheticConfig(
            image_size=image_size,
            n_train=n_train,
            n_test_good=n_test_good,
            n_test_defect=n_test_defect,
            seed=data_seed,
        )

    def prepare_data(self) -> None:
        """Generate the category if it is not there yet (never downloads)."""
        generate_category(self.root, self.category, self.synthetic_config)


def _concat(datasets: Sequence[Any], task: TaskType) -> Any:
    """One anomalib dataset holding the samples of ``datasets``, which may be of different dataset classes.

    anomalib's ``dataset + dataset`` only accepts one class, so the samples tables are concatenated directly.
    """
    joint = copy.deepcopy(datasets[0])
    joint.samples = pd.concat([dataset.samples for dataset in datasets], ignore_index=True)
    joint.samples.attrs["task"] = task.value
    return joint


class TaskGroup(AnomalibDataModule):
    """Several datamodules learned and tested as one task (e.g. two MVTec AD categories, or ELPV and MVTec AD).

    The members' train and test sets are concatenated; validation uses the test set, like MVTecAD. When some
    members have no masks, the group is evaluated at image level.

    Args:
        name: The task's name.
        datamodules: Members; the first one's batch sizes and workers are used.
    """

    def __init__(self, name: str, datamodules: Sequence[AnomalibDataModule]) -> None:
        if not datamodules:
            msg = f"Task group '{name}' has no datamodule."
            raise ValueError(msg)
        first = datamodules[0]
        super().__init__(
            train_batch_size=first.train_batch_size,
            eval_batch_size=first.eval_batch_size,
            num_workers=first.num_workers,
            # The members already read their own train/test folders: keep their test sets whole (normal images
            # included), and validate on the test set like MVTecAD.
            test_split_mode="from_dir",
            val_split_mode="same_as_test",
        )
        self.members = list(datamodules)
        self.category = name

    @property
    def name(self) -> str:
        """Name of the member datamodule type."""
        return type(self.members[0]).__name__

    def prepare_data(self) -> None:
        """Prepare every member."""
        for datamodule in self.members:
            datamodule.prepare_data()

    def _setup(self, _stage: str | None = None) -> None:
        for datamodule in self.members:
            datamodule.setup()
        tasks = {datamodule.test_data.task for datamodule in self.members}
        task = tasks.pop() if len(tasks) == 1 else TaskType.CLASSIFICATION
        self.train_data = _concat([datamodule.train_data for datamodule in self.members], task)
        self.test_data = _concat([datamodule.test_data for datamodule in self.members], task)

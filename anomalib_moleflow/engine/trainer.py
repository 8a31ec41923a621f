"""A fresh anomalib ``Engine`` for every fit and test of a continual run (a second ``fit`` on one does nothing)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalib.callbacks import ModelCheckpoint
from anomalib.data import AnomalibDataModule
from anomalib.engine import Engine
from anomalib.models.components import AnomalibModule
from lightning.pytorch import Callback


@dataclass
class TaskTrainer:
    """Builds one anomalib ``Engine`` per call, under a given folder, with the run's device settings.

    ``save_top_k=0`` replaces anomalib's default ModelCheckpoint: the continual engine saves the model itself,
    atomically, after each task.

    Attributes:
        accelerator: Lightning accelerator.
        devices: Lightning devices.
        progress_bar: Lightning's progress bars.
        precision: Lightning precision (e.g. ``"bf16-mixed"``, ``"16-mixed"`` on a GPU); ``None``: full float32.
        strategy: Lightning strategy (``"ddp"``: one process per device, see :mod:`anomalib_moleflow.distributed`).
        last_engine: The Engine of the latest call (its trainer can save a Lightning checkpoint of the module).
    """

    accelerator: str = "auto"
    devices: int | str = 1
    progress_bar: bool = True
    precision: str | None = None
    strategy: str = "auto"
    last_engine: Engine | None = None

    def engine(self, root_dir: Path, **trainer_kwargs: Any) -> Engine:
        """A fresh Engine writing under ``root_dir`` (``callbacks`` among the keyword arguments are added)."""
        if self.precision is not None:
            trainer_kwargs.setdefault("precision", self.precision)
        callbacks = [ModelCheckpoint(save_top_k=0), *trainer_kwargs.pop("callbacks", [])]
        self.last_engine = Engine(
            default_root_dir=root_dir,
            logger=False,
            accelerator=self.accelerator,
            devices=self.devices,
            strategy=self.strategy,
            enable_progress_bar=self.progress_bar,
            enable_model_summary=False,
            callbacks=callbacks,
            **trainer_kwargs,
        )
        return self.last_engine

    def fit(self, model: AnomalibModule, datamodule: AnomalibDataModule, root_dir: Path) -> None:
        """Train ``model`` on ``datamodule`` with a fresh Engine."""
        self.engine(root_dir).fit(model, datamodule=datamodule)

    def validate(
        self, model: AnomalibModule, datamodule: AnomalibDataModule, root_dir: Path, callbacks: Sequence[Callback] = ()
    ) -> None:
        """Validate ``model`` with a fresh Engine (and ``callbacks``): re-fits its post-processing statistics."""
        self.engine(root_dir, callbacks=list(callbacks)).validate(model, datamodule=datamodule, verbose=False)

    def test(
        self,
        model: AnomalibModule,
        datamodule: AnomalibDataModule,
        root_dir: Path,
        calibrate: bool = False,
        callbacks: Sequence[Callback] = (),
    ) -> dict[str, float]:
        """Test ``model`` with a fresh Engine (and ``callbacks``); with ``calibrate``, validate first (re-fits
        post-processing).

        Returns:
            The test metrics of the first (only) dataloader.
        """
        engine = self.engine(root_dir, callbacks=list(callbacks))
        if calibrate:
            engine.validate(model, datamodule=datamodule, verbose=False)
        output = engine.test(model, datamodule=datamodule, verbose=False)
        return dict(output[0]) if output else {}

"""``moleflow predict``: score a folder that mixes products with one trained model, on anomalib's predict path.

anomalib's ``Engine.predict`` runs the model over anomalib's ``PredictDataset``; a Lightning ``BasePredictionWriter``
(:class:`PredictionWriter`) writes each batch's CSV rows and overlays as soon as the batch is scored, so memory stays
flat on large folders and the progress bar covers both. Every image is routed to its product's expert (or flagged as
an unknown product), scored and normalised with that product's statistics.

What is not scored is said, never lost: files under anomalib's mask folders (``ground_truth``) are skipped and
counted; an unreadable image, or one whose score is not finite (a damaged model), gets a row with its ``error`` and
makes the command fail at the end, after every other image was scored.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from anomalib.data import ImageBatch, PredictDataset
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import Resize

from anomalib_moleflow.deploy.inferencer import COLUMNS, MASK_FOLDERS, overlay_path, scoreable_files
from anomalib_moleflow.errors import PredictionError
from anomalib_moleflow.io import claim_output_dir
from anomalib_moleflow.models import MoleFlow
from anomalib_moleflow.models.moleflow.components.router import RoutingLog
from anomalib_moleflow.reports.plots import save_scored_overlay

from .options import CSV_FILE, PREDICT_OUTPUTS
from .trainer import TaskTrainer

logger = logging.getLogger(__name__)


@dataclass
class PredictSummary:
    """What ``moleflow predict`` did.

    Attributes:
        csv: The CSV's path.
        scored: Images scored.
        skipped_masks: Files skipped because they lie in a mask folder (``ground_truth``).
        errors: ``{image: reason}`` of the images that could not be scored.
    """

    csv: Path
    scored: int = 0
    skipped_masks: int = 0
    errors: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        """One line for the user."""
        parts = [f"{self.scored} image(s) scored into '{self.csv}'"]
        if self.skipped_masks:
            parts.append(f"{self.skipped_masks} mask file(s) under {'/'.join(sorted(MASK_FOLDERS))} skipped")
        if self.errors:
            parts.append(f"{len(self.errors)} could not be scored (see the 'error' column)")
        return "; ".join(parts) + "."


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be decoded (fully, so that truncated files are caught), or ``None``."""
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"unreadable image ({error})"
    return None


class _Files(PredictDataset):
    """anomalib's ``PredictDataset`` over a given list of files (mask folders already left out)."""

    def __init__(self, files: Sequence[Path], size: tuple[int, int]) -> None:
        super().__init__(files[0], transform=Resize(list(size), antialias=True), image_size=size)
        self.image_filenames = list(files)


class PredictionWriter(BasePredictionWriter):
    """Write each predicted batch's CSV rows (and overlays) as soon as it is scored.

    Args:
        summary: Where the counts and errors go; its ``csv`` is the file written.
        source: The ``--input`` folder (overlays mirror the images' paths below it) or file.
        task_names: The model's tasks.
        routing: The routing log open during the prediction (its latest entry is the batch's routing).
        overlays: Save an overlay per image.
    """

    def __init__(
        self, summary: PredictSummary, source: Path, task_names: list[str], routing: RoutingLog, overlays: bool
    ) -> None:
        super().__init__(write_interval="batch")
        self.summary = summary
        self.source = source
        self.task_names = task_names
        self.routing = routing
        self.overlays = overlays
        self._handle: Any = None
        self._writer: Any = None

    def open(self) -> None:
        """Create the CSV with its header."""
        self._handle = self.summary.csv.open("w", newline="")
        self._writer = csv.writer(self._handle)
        self._writer.writerow(COLUMNS)

    def close(self) -> None:
        """Close the CSV."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def error_row(self, path: str, reason: str) -> None:
        """A row for an image that could not be scored."""
        self.summary.errors[path] = reason
        self._writer.writerow([path, *[""] * (len(COLUMNS) - 2), reason])
        self._handle.flush()

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Rows (and overlays) of one scored batch."""
        del trainer, pl_module, batch_indices, batch_idx, dataloader_idx
        routed = self.routing.latest()
        for index, file in enumerate(prediction.image_path):
            raw = float(prediction.raw_score[index])  # set by MoleFlow.predict_step
            score = float(prediction.pred_score[index])
            if not (math.isfinite(raw) and math.isfinite(score)):
                reason = "non-finite score: the model is damaged or diverged (check the checkpoint)"
                logger.error("'%s': %s.", file, reason)
                self.error_row(str(file), reason)
                continue
            unknown = bool(routed.unknown[index])
            nearest = self.task_names[int(routed.task[index])]
            label = "" if prediction.pred_label is None else ("anomalous" if prediction.pred_label[index] else "normal")
            self._writer.writerow([
                str(file),
                nearest,
                f"{float(routed.distance[index]):.6g}",
                int(unknown),
                f"{raw:.6g}",
                f"{score:.6g}",
                label,
                "",
            ])  # fmt: skip
            self.summary.scored += 1
            if self.overlays:
                task = "unknown product" if unknown else nearest
                title = f"{Path(file).name}: {task}, {label or 'no threshold'}, score {score:.3f}"
                path = overlay_path(self.summary.csv.parent / "overlays", Path(file), self.source)
                save_scored_overlay(prediction.image[index], prediction.anomaly_map[index], title, path)
        self._handle.flush()


def predict_folder(
    model: MoleFlow,
    source: Path | str,
    output: Path | str,
    batch_size: int = 16,
    overlays: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    trainer: TaskTrainer | None = None,
) -> PredictSummary:
    """Score every image under ``source``; write ``OUTPUT/predictions.csv`` and, optionally, overlays.

    Args:
        model: A trained MoLE-Flow model (any number of tasks).
        source: An image file or a folder (nested folders included) that may mix products.
        output: Output folder.
        batch_size: Images per batch.
        overlays: Save an overlay per image as ``OUTPUT/overlays/RELATIVE_PATH.png`` (its path below ``source``).
        progress: Show a progress bar.
        overwrite: Replace an earlier prediction in ``output`` (without it, such a folder is refused).
        trainer: Device settings of the anomalib ``Engine`` (default: automatic).

    Returns:
        The summary (the CSV also names every image that could not be scored).

    Raises:
        FileExistsError: If ``output`` holds an earlier prediction and ``overwrite`` is not set.
        PredictionError: After every readable image was scored, if some image could not be.
    """
    source = Path(source)
    kept, skipped = scoreable_files(source)
    root = source if source.is_dir() else source.parent
    claim_output_dir(output, PREDICT_OUTPUTS, resume=False, overwrite=overwrite, resumable=False)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    summary = PredictSummary(output / CSV_FILE, skipped_masks=skipped)
    unreadable = {path: reason for path in kept if (reason := _unreadable(path)) is not None}
    readable = [path for path in kept if path not in unreadable]
    # A copy: the caller's trainer keeps its own progress setting.
    trainer = replace(trainer, progress_bar=progress) if trainer else TaskTrainer(progress_bar=progress)
    with model.record_routing() as log:
        writer = PredictionWriter(summary, root, model.task_names, log, overlays)
        writer.open()
        try:
            for path, reason in unreadable.items():
                logger.error("'%s': %s.", path, reason)
                writer.error_row(str(path), reason)
            if readable:
                loader = DataLoader(
                    _Files(readable, tuple(model.model.image_size)),
                    batch_size=batch_size,
                    collate_fn=ImageBatch.collate,
                )
                engine = trainer.engine(output, callbacks=[writer])
                with torch.no_grad():
                    engine.predict(model, dataloaders=loader, return_predictions=False)
        finally:
            writer.close()
    logger.info(summary.line())
    if summary.errors:
        listed = "; ".join(f"{path}: {reason}" for path, reason in summary.errors.items())
        msg = f"{len(summary.errors)} image(s) could not be scored ({listed}). The others are in '{summary.csv}'."
        raise PredictionError(msg)
    return summary

"""``moleflow predict``: score a folder that mixes products with one trained model, streaming, into a CSV.

Every image is routed to its product's expert (or flagged as an unknown product), scored, normalised with that
product's statistics, and written to ``predictions.csv`` as soon as its batch is done, so memory stays flat on large
folders. Each overlay shows the image beside its anomaly map on one colour scale, titled with task, label and score.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from anomalib.data.utils import read_image
from torchvision.transforms.v2.functional import resize
from tqdm import tqdm

from anomalib_moleflow.data.checks import check_image
from anomalib_moleflow.deploy.inferencer import COLUMNS, image_files, overlay_name
from anomalib_moleflow.models import MoleFlow
from anomalib_moleflow.reports.plots import save_scored_overlay

logger = logging.getLogger(__name__)


def _batches(
    files: Sequence[Path], batch_size: int, size: tuple[int, int]
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Images read (any size, grayscale or RGBA too) and resized to the model's input, ``batch_size`` at a time."""
    for begin in range(0, len(files), batch_size):
        chunk = list(files[begin : begin + batch_size])
        images = []
        for path in chunk:
            check_image(path)  # one clear message for a broken or 16-bit file
            images.append(resize(read_image(path, as_tensor=True), list(size), antialias=True))
        yield chunk, torch.stack(images)


@torch.no_grad()
def predict_folder(
    model: MoleFlow,
    source: Path | str,
    output: Path | str,
    batch_size: int = 16,
    overlays: bool = True,
    progress: bool = True,
) -> Path:
    """Score every image under ``source``; write ``OUTPUT/predictions.csv`` and, optionally, overlays.

    Args:
        model: A trained MoLE-Flow model (any number of tasks).
        source: An image file or a folder (nested folders included) that may mix products.
        output: Output folder.
        batch_size: Images per batch.
        overlays: Save an anomaly-map overlay per image as ``OUTPUT/overlays/TASK_LABEL_SCORE_NAME.png``.
        progress: Show a progress bar.

    Returns:
        The CSV's path.
    """
    files = image_files(source)
    output = Path(output)
    (output / "overlays").mkdir(parents=True, exist_ok=True)
    names = model.task_names
    size = tuple(model.model.image_size)
    model.eval()
    model.compile_modules()  # the model's compile_mode (no Lightning setup runs here)
    path = output / "predictions.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        with tqdm(total=len(files), unit="image", disable=not progress, desc="moleflow predict") as bar:
            for chunk, images in _batches(files, batch_size, size):
                raw, final, routed = model.score_images(images.to(model.device))
                for index, file in enumerate(chunk):
                    task = "unknown" if bool(routed.unknown[index]) else names[int(routed.task[index])]
                    label = "anomalous" if final.pred_label is None or bool(final.pred_label[index]) else "normal"
                    score = float(final.pred_score[index])
                    writer.writerow([
                        str(file),
                        names[int(routed.task[index])],
                        f"{float(routed.distance[index]):.6g}",
                        int(routed.unknown[index]),
                        f"{float(raw.pred_score[index]):.6g}",
                        f"{score:.6g}",
                        label,
                    ])  # fmt: skip
                    if overlays:
                        title = f"{file.name}: {task}, {label}, score {score:.3f}"
                        overlay = output / "overlays" / overlay_name(task, label, score, file)
                        save_scored_overlay(images[index], final.anomaly_map[index], title, overlay)
                handle.flush()
                bar.update(len(chunk))
    logger.info("Scored %d image(s) into '%s'.", len(files), path)
    return path

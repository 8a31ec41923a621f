"""PNG plots: task x task heatmaps, per-task final bars, anomaly-map overlays (anomalib's visualizer, and a
scored overlay with a colour bar for ``moleflow predict``)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image, ImageDraw

from anomalib_moleflow.deploy.inferencer import overlay_name
from anomalib_moleflow.metrics import METRICS


def plot_matrix_heatmaps(results: dict[str, Any], output_dir: Path) -> list[Path]:
    """One heatmap per metric of ``matrix[metric][i][j]`` (row: after task i, column: tested on task j).

    Each metric has one fixed colour scale, the same in every run: 50-100 for AUROC (50 is chance), 0-100 otherwise.
    """
    tasks = results["tasks"]
    paths = []
    for metric, rows in results["matrix"].items():
        values = np.array([[np.nan if v is None else 100 * v for v in row] for row in rows], dtype=float)
        if np.all(np.isnan(values)):
            continue
        size = max(4.0, 0.6 * len(tasks) + 2)
        fig, ax = plt.subplots(figsize=(size, size * 0.85))
        low = 50.0 if "AUROC" in metric else 0.0
        image = ax.imshow(values, vmin=low, vmax=100, cmap="viridis")
        ax.set_xticks(range(len(tasks)), tasks, rotation=60, ha="right")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("evaluated task")
        ax.set_ylabel("after training task")
        ax.set_title(f"{METRICS.get(metric, metric)} (%)")
        if len(tasks) <= 16:
            for (i, j), value in np.ndenumerate(values):
                if not np.isnan(value):
                    bright = (value - low) / max(100 - low, 1e-9) > 0.6  # viridis turns yellow: dark text there
                    ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="k" if bright else "w", fontsize=7)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = output_dir / f"heatmap_{metric}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_final_bars(results: dict[str, Any], output_dir: Path) -> Path:
    """Grouped bars of each task's final value for every metric that has values."""
    tasks = results["tasks"]
    metrics = [m for m in METRICS if results["final"].get(m) is not None]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(tasks) * max(1, len(metrics)) / 2), 4))
    width = 0.8 / max(1, len(metrics))
    for k, metric in enumerate(metrics):
        heights = [100 * (results["per_task_final"][t][metric] or 0.0) for t in tasks]
        ax.bar(np.arange(len(tasks)) + k * width, heights, width, label=METRICS[metric])
    ax.set_xticks(np.arange(len(tasks)) + width * (len(metrics) - 1) / 2, tasks, rotation=45, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title("Final value per task")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the bars
    fig.tight_layout()
    path = output_dir / "final_per_task.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_overlays(
    model: torch.nn.Module, datamodule: Any, task_name: str, output_dir: Path, count: int, task: int | None = None
) -> list[Path]:
    """Save scored overlays of the first ``count`` test images (defective first) as ``overlays/TASK/*.png``.

    The model scores the images with routing (or with ``task``, oracle mode) and per-task post-processing, as at test
    time. Each file is named
    ``TASK_LABEL_SCORE_NAME.png`` like ``moleflow predict``'s (TASK: the routed task or ``unknown``; NAME: the defect
    type and file name) and shows the image and its map on one 0-1 scale with
    a colour bar, the ground-truth defect outlined in white.
    """
    if count <= 0:
        return []
    datamodule.setup("test")
    dataset = datamodule.test_data
    labels = dataset.samples["label_index"].to_numpy()
    order = [*np.flatnonzero(labels == 1)[: max(1, count - 1)], *np.flatnonzero(labels == 0)][:count]
    folder = output_dir / "overlays" / task_name
    folder.mkdir(parents=True, exist_ok=True)
    batch = dataset.collate_fn([dataset[int(i)] for i in order])
    model.eval()
    with torch.no_grad():
        _, final, routed = model.score_images(batch.image, task)
    names = model.task_names
    paths = []
    for index in range(len(order)):
        score = float(final.pred_score[index])
        label = "anomalous" if final.pred_label is None or bool(final.pred_label[index]) else "normal"
        routed_to = "unknown" if bool(routed.unknown[index]) else names[int(routed.task[index])]
        truth = "defect" if int(batch.gt_label[index]) else "good"
        file = Path(str(batch.image_path[index]))
        title = f"{file.parent.name}/{file.name} ({truth}): routed to {routed_to}, {label}, score {score:.3f}"
        mask = None if batch.gt_mask is None else batch.gt_mask[index]
        path = folder / overlay_name(routed_to, label, score, f"{file.parent.name}_{file.name}")
        paths.append(save_scored_overlay(batch.image[index], final.anomaly_map[index], title, path, mask))
    return paths


#: Smallest panel side of an overlay: small inputs are enlarged (nearest) so that the title and colour bar fit.
_MIN_PANEL = 256
_JET = (mpl.colormaps["jet"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (the mask minus its 4-neighbour erosion)."""
    padded = np.pad(mask, 1, mode="edge")
    eroded = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~eroded


def save_scored_overlay(
    image: torch.Tensor, anomaly_map: torch.Tensor, title: str, path: Path, mask: torch.Tensor | None = None
) -> Path:
    """The image beside its normalised anomaly map (one 0-1 colour scale with a colour bar), titled with ``title``.

    Drawn with numpy and Pillow, not a matplotlib figure (about a hundred times faster, which matters for ``moleflow
    predict`` on large folders); anomalib's item visualizer has no colour bar or score.

    Args:
        image: ``(3, h, w)`` image in [0, 1], at any size: it is resized to the map's.
        anomaly_map: ``(H, W)`` or ``(1, H, W)`` normalised anomaly map (0.5 is the task's threshold).
        title: Title line, e.g. the routed task, the label and the score (wrapped when long).
        path: PNG to write.
        mask: Optional ground-truth mask, at any size, outlined in white on both panels.
    """
    heat = anomaly_map.detach().float().cpu().reshape(anomaly_map.shape[-2:])
    size = tuple(heat.shape)
    picture = image.detach().float().cpu().clamp(0, 1)
    if tuple(picture.shape[-2:]) != size:
        picture = F.interpolate(picture[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    rgb = (picture.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    colours = _JET[(heat.clamp(0, 1).numpy() * 255).astype(np.int64)]
    blend = (0.55 * rgb + 0.45 * colours).astype(np.uint8)
    if mask is not None and bool(mask.any()):
        outline_mask = mask.detach().float().cpu().reshape(1, 1, *mask.shape[-2:])
        edge = _outline(F.interpolate(outline_mask, size=size, mode="nearest")[0, 0].numpy() > 0.5)
        rgb, blend = rgb.copy(), blend.copy()
        rgb[edge] = 255
        blend[edge] = 255
    scale = max(1, -(-_MIN_PANEL // max(size)))
    panels = [
        Image.fromarray(a).resize((size[1] * scale, size[0] * scale), Image.Resampling.NEAREST) for a in (rgb, blend)
    ]
    height, width = panels[0].height, panels[0].width
    gap, bar, lines = 8, 14, textwrap.wrap(title, max(20, (2 * width + 60) // 7))
    top = 6 + 12 * len(lines) + 6 + 14  # title lines, then the panel captions
    canvas = Image.new("RGB", (2 * width + 3 * gap + bar + 30, top + height + gap), "white")
    draw = ImageDraw.Draw(canvas)
    for row, line in enumerate(lines):
        draw.text((gap, 6 + 12 * row), line, fill="black")
    draw.text((gap, top - 14), "image", fill="black")
    draw.text((2 * gap + width, top - 14), "anomaly map (0.5 = threshold)", fill="black")
    canvas.paste(panels[0], (gap, top))
    canvas.paste(panels[1], (2 * gap + width, top))
    ramp = _JET[np.linspace(255, 0, height).astype(np.int64)][:, None, :].repeat(bar, axis=1)
    left = 3 * gap + 2 * width
    canvas.paste(Image.fromarray(np.ascontiguousarray(ramp)), (left, top))
    for value in (0.0, 0.5, 1.0):
        y = top + round((1 - value) * (height - 1))
        draw.line([(left + bar, y), (left + bar + 3, y)], fill="black")
        draw.text((left + bar + 5, min(max(top, y - 5), top + height - 10)), f"{value:g}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path

"""anomalib ``PostProcessor`` that keeps thresholds and min/max statistics for every task.

anomalib's PostProcessor holds one set of statistics, overwritten at each validation. A continual model needs one
set per task: each image is normalised with the statistics of the task it was routed to. The task ids travel as
arguments: :class:`~anomalib_moleflow.models.MoleFlow` passes them from its validation/test/predict steps and its
``forward``; the callback hooks that anomalib's PostProcessor uses for the same work are therefore no-ops here.

Statistics hold only for the scoring settings they were fitted with (a map blurred otherwise, another map value, ...):
each task's row records them (``fitted_with``), so that a model loaded with other scoring settings can tell which
tasks must be validated again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from anomalib.data import Batch, InferenceBatch
from anomalib.metrics import F1AdaptiveThreshold, MinMax
from anomalib.models.components.base import DynamicBufferMixin
from anomalib.post_processing import PostProcessor
from lightning import LightningModule, Trainer
from torch import nn

from anomalib_moleflow.compat import apply_threshold, extra_state_key, normalize, set_single_statistics

#: Columns of ``task_stats``.
STAT_COLUMNS = ("image_threshold", "pixel_threshold", "image_min", "image_max", "pixel_min", "pixel_max")
#: Key of a task's ``fitted_with`` record: its thresholds came from held-out good images (validation cannot refit them).
GOOD_IMAGES = "from_good_images"
_FIELDS = ("pred_score", "gt_label", "anomaly_map", "gt_mask")
#: Largest input of ``torch.quantile``.
_QUANTILE_LIMIT = 16_000_000


class TaskPostProcessor(DynamicBufferMixin, PostProcessor):
    """Per-task thresholds and normalisation.

    ``task_stats[t]`` holds, for task ``t``, the columns of :data:`STAT_COLUMNS` (NaN until validated). The table
    grows with the tasks; anomalib's ``DynamicBufferMixin`` resizes it when a checkpoint with more tasks is loaded.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("task_stats", torch.full((0, len(STAT_COLUMNS)), float("nan")))
        self.task_stats: torch.Tensor
        #: Per task, the scoring settings its row was fitted with (``None``: not recorded, e.g. not yet validated).
        self.fitted_with: list[dict[str, Any] | None] = []
        self._task_metrics: dict[int, dict[str, Any]] = {}
        self.register_load_state_dict_pre_hook(_unrecorded_when_missing)

    def ensure_tasks(self, num_tasks: int) -> None:
        """Grow the statistics table to ``num_tasks`` rows (new rows are NaN: not yet validated)."""
        missing = num_tasks - self.task_stats.shape[0]
        if missing > 0:
            pad = self.task_stats.new_full((missing, len(STAT_COLUMNS)), float("nan"))
            self.task_stats = torch.cat([self.task_stats, pad])
        self.fitted_with.extend([None] * (num_tasks - len(self.fitted_with)))

    def get_extra_state(self) -> dict[str, Any]:
        """The scoring settings each task's statistics were fitted with."""
        return {"fitted_with": [None if entry is None else dict(entry) for entry in self.fitted_with]}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`get_extra_state`."""
        self.fitted_with = [None if entry is None else dict(entry) for entry in state.get("fitted_with", [])]

    def stale_tasks(self, scoring: Sequence[Mapping[str, Any]]) -> dict[int, list[tuple[str, Any]]]:
        """Tasks whose statistics were fitted with other scoring settings than ``scoring[task]`` (each task's now),
        each with the settings (name, value fitted with) that differ. A task without a record, or a setting its
        record lacks, is taken as unchanged."""
        stale = {}
        for task, (fitted, now) in enumerate(zip(self.fitted_with, scoring, strict=False)):
            fitted = fitted or {}
            differing = [(name, fitted[name]) for name in now if name in fitted and fitted[name] != now[name]]
            if differing:
                stale[task] = differing
        return stale

    def stats_of(self, task: int) -> dict[str, float]:
        """Statistics of one task as a dictionary."""
        return dict(zip(STAT_COLUMNS, self.task_stats[task].tolist(), strict=True))

    # -------------------------------------------------------------- validation
    def _metrics(self, task: int) -> dict[str, Any]:
        if task not in self._task_metrics:
            self._task_metrics[task] = {
                "image_threshold": F1AdaptiveThreshold(fields=["pred_score", "gt_label"], strict=False),
                "pixel_threshold": F1AdaptiveThreshold(fields=["anomaly_map", "gt_mask"], strict=False),
                "image_minmax": MinMax(fields=["pred_score"], strict=False),
                "pixel_minmax": MinMax(fields=["anomaly_map"], strict=False),
            }
        return self._task_metrics[task]

    def update_statistics(self, batch: Batch, task_ids: torch.Tensor) -> None:
        """Accumulate validation statistics of each image under its task ``task_ids[i]``."""
        for task in task_ids.unique().tolist():
            selected = (task_ids == task).to(batch.pred_score.device)
            view = SimpleNamespace(
                **{
                    field: None if getattr(batch, field, None) is None else getattr(batch, field)[selected]
                    for field in _FIELDS
                }
            )
            metrics = self._metrics(task)
            if self.enable_thresholding:
                metrics["image_threshold"].update(view)
                metrics["pixel_threshold"].update(view)
            if self.enable_normalization:
                metrics["image_minmax"].update(view)
                metrics["pixel_minmax"].update(view)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: the model calls :meth:`update_statistics` with the batch's task ids."""

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write each validated task's statistics to its row (and the last one to anomalib's single set), with the
        scoring settings they were fitted with (``pl_module.scoring_settings(task)`` of a
        :class:`~anomalib_moleflow.models.MoleFlow`)."""
        del trainer
        scoring = getattr(pl_module, "scoring_settings", None)  # another module: nothing to record
        for task, metrics in sorted(self._task_metrics.items()):
            self.ensure_tasks(task + 1)
            self.fitted_with[task] = None if scoring is None else dict(scoring(task))
            row = self.task_stats[task]
            for column, key in ((0, "image_threshold"), (1, "pixel_threshold")):
                if metrics[key].update_called:
                    row[column] = metrics[key].compute()
            for column, key in ((2, "image_minmax"), (4, "pixel_minmax")):
                if metrics[key].update_called:
                    low, high = metrics[key].compute()
                    row[column], row[column + 1] = low, high
            # anomalib's single set (read by plain tools and export) holds the latest validated task.
            set_single_statistics(self, row)
            for metric in metrics.values():
                metric.reset()
        self._task_metrics.clear()

    def set_good_statistics(
        self,
        task: int,
        image_scores: torch.Tensor,
        anomaly_maps: torch.Tensor,
        target_fpr: float,
        scoring: Mapping[str, Any] | None = None,
    ) -> None:
        """Set task ``task``'s thresholds and normalisation from raw scores of good images only.

        The image threshold is the score that ``target_fpr`` of good images exceed: their empirical quantile when
        there are at least ``1 / target_fpr`` of them, else the Gaussian tail of their mean and standard deviation
        (a quantile of a few samples cannot reach 1 %). The pixel threshold is the empirical quantile of the maps'
        pixels (there are always enough). Minimum and maximum are the good images' own, so 0.5 stays the threshold.

        Args:
            task: The task's index.
            image_scores: Raw image scores ``(n,)`` of held-out good images.
            anomaly_maps: Their raw anomaly maps ``(n, 1, H, W)``.
            target_fpr: Share of good images (and pixels) allowed above threshold.
            scoring: The scoring settings the scores were made with (recorded for the task; ``None``: not recorded).
        """
        scores = image_scores.detach().double().flatten().cpu()
        if scores.numel() >= round(1 / target_fpr):
            image_threshold = torch.quantile(scores, 1 - target_fpr)
        else:
            z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - target_fpr, dtype=torch.float64))
            image_threshold = scores.mean() + z * scores.std(unbiased=True)
        pixels = anomaly_maps.detach().double().flatten().cpu()
        if pixels.numel() > _QUANTILE_LIMIT:  # torch.quantile's input limit: an even subsample
            pixels = pixels[:: -(-pixels.numel() // _QUANTILE_LIMIT)]
        pixel_threshold = torch.quantile(pixels, 1 - target_fpr)
        row = torch.stack([
            image_threshold,
            pixel_threshold,
            scores.min(),
            torch.maximum(scores.max(), image_threshold),
            pixels.min(),
            torch.maximum(pixels.max(), pixel_threshold),
        ]).to(self.task_stats)  # fmt: skip
        self.ensure_tasks(task + 1)
        self.task_stats[task] = row
        self.fitted_with[task] = None if scoring is None else {**scoring, GOOD_IMAGES: True}
        set_single_statistics(self, row)

    # ------------------------------------------------------------ test/predict
    def _per_image(self, task_ids: torch.Tensor, column: str) -> torch.Tensor:
        return self.task_stats[task_ids.to(self.task_stats.device), STAT_COLUMNS.index(column)]

    def _thresholds(self, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, pixel = self._per_image(task_ids, "image_threshold"), self._per_image(task_ids, "pixel_threshold")
        if self.enable_threshold_matching:
            image, pixel = torch.where(image.isnan(), pixel, image), torch.where(pixel.isnan(), image, pixel)
        return image, pixel

    def normalize_per_task(
        self,
        pred_score: torch.Tensor | None,
        anomaly_map: torch.Tensor | None,
        task_ids: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Normalise each image's score and map with the statistics of its task."""
        if not torch.compiler.is_exporting():  # the model grows the table with its tasks; this guards direct use
            self.ensure_tasks(int(task_ids.max()) + 1)
        image_threshold, pixel_threshold = self._thresholds(task_ids)
        if pred_score is not None:
            pred_score = normalize(
                pred_score,
                self._per_image(task_ids, "image_min").to(pred_score),
                self._per_image(task_ids, "image_max").to(pred_score),
                image_threshold.to(pred_score),
            )
        if anomaly_map is not None:
            shape = (-1,) + (1,) * (anomaly_map.dim() - 1)
            anomaly_map = normalize(
                anomaly_map,
                self._per_image(task_ids, "pixel_min").to(anomaly_map).view(shape),
                self._per_image(task_ids, "pixel_max").to(anomaly_map).view(shape),
                pixel_threshold.to(anomaly_map).view(shape),
            )
        return pred_score, anomaly_map

    def mark_unknown(
        self, pred_score: torch.Tensor, pred_label: torch.Tensor | None, unknown: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images of an unknown product ``(b,)`` scored anomalous: normalised score 1, label anomalous.

        Only normalised scores are overridden (a raw score of 1 would mean nothing); ``unknown=None``: no override.
        """
        if unknown is None or not self.enable_normalization:
            return pred_score, pred_label
        unknown = unknown.to(pred_score.device)
        pred_score = torch.where(unknown, torch.ones_like(pred_score), pred_score)
        if pred_label is not None:
            pred_label = pred_label | unknown.to(pred_label.device)
        return pred_score, pred_label

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: the model post-processes each batch with its task ids (:meth:`forward`)."""

    def on_predict_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: the model post-processes each batch with its task ids (:meth:`forward`)."""

    def forward(
        self, predictions: InferenceBatch, task_ids: torch.Tensor | None = None, unknown: torch.Tensor | None = None
    ) -> InferenceBatch:
        """Post-process raw predictions; with ``task_ids``, per task (the model's ``forward`` passes them), with the
        ``unknown`` products ``(b,)`` marked anomalous."""
        if task_ids is None or not self.enable_normalization:
            return super().forward(predictions)
        pred_score, anomaly_map = self.normalize_per_task(predictions.pred_score, predictions.anomaly_map, task_ids)
        normalized = InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
        if self.enable_thresholding:
            normalized = normalized._replace(
                pred_label=apply_threshold(pred_score, self.normalized_image_threshold),
                pred_mask=apply_threshold(anomaly_map, self.normalized_pixel_threshold),
            )
        pred_score, pred_label = self.mark_unknown(normalized.pred_score, normalized.pred_label, unknown)
        return normalized._replace(pred_score=pred_score, pred_label=pred_label)


def _unrecorded_when_missing(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """A state dict of an earlier version has no record of the scoring settings: its tasks are unrecorded."""
    del module, args
    state_dict.setdefault(extra_state_key(prefix), {"fitted_with": []})

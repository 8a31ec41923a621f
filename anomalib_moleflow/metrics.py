"""The metrics every model in this package is scored with, and their report names.

Image AUROC/AUPR and pixel AUROC/AUPR ("pixel AP")/AUPRO, computed by anomalib's own metrics. Pixel metrics are
``strict=False``: on datasets without masks (e.g. ELPV) they are skipped and reported as ``None``.
"""

from __future__ import annotations

import torch
from anomalib.metrics import AUPR, AUPRO, AUROC, Evaluator
from anomalib.metrics.base import AnomalibMetric
from torchmetrics.classification import BinarySpecificity

#: anomalib metric name -> column name of the study's tables.
METRICS: dict[str, str] = {
    "image_AUROC": "Img AUROC",
    "image_AUPR": "Img AP",
    "pixel_AUROC": "Pix AUROC",
    "pixel_AUPR": "Pix AP",
    "pixel_AUPRO": "Pix AUPRO",
}

#: The share of good test images labelled anomalous (a false-positive rate): not a ranking metric like the others,
#: it depends on the thresholds (``MoleFlow(threshold=...)``); reported beside the table, never averaged into it.
GOOD_FLAGGED = "image_FPR"


class FPR(AnomalibMetric, BinarySpecificity):
    """False-positive rate of the predicted labels: the share of good images labelled anomalous (1 - specificity)."""

    def compute(self) -> torch.Tensor | None:
        """``1 - specificity`` (``None`` when no batch had labels to compare, as anomalib's non-strict metrics)."""
        specificity = super().compute()
        return None if specificity is None else 1.0 - specificity


def default_evaluator() -> Evaluator:
    """An anomalib ``Evaluator`` with the test metrics of :data:`METRICS` and :data:`GOOD_FLAGGED`."""
    test_metrics = [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        AUPR(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPR(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        FPR(fields=["pred_label", "gt_label"], prefix="image_", strict=False),  # skipped when nothing is thresholded
    ]
    return Evaluator(test_metrics=test_metrics)

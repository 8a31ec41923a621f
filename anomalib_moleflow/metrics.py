"""The metrics every model in this package is scored with, and their report names.

Image AUROC/AUPR and pixel AUROC/AUPR ("pixel AP")/AUPRO, computed by anomalib's own metrics. Pixel metrics are
``strict=False``: on datasets without masks (e.g. ELPV) they are skipped and reported as ``None``.
"""

from __future__ import annotations

from anomalib.metrics import AUPR, AUPRO, AUROC, Evaluator

#: anomalib metric name -> column name of the study's tables.
METRICS: dict[str, str] = {
    "image_AUROC": "Img AUROC",
    "image_AUPR": "Img AP",
    "pixel_AUROC": "Pix AUROC",
    "pixel_AUPR": "Pix AP",
    "pixel_AUPRO": "Pix AUPRO",
}


def default_evaluator() -> Evaluator:
    """An anomalib ``Evaluator`` with the test metrics of :data:`METRICS`."""
    test_metrics = [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        AUPR(fields=["pred_score", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPR(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
    ]
    return Evaluator(test_metrics=test_metrics)

"""The graph that ``moleflow export`` writes: MoLE-Flow's routed inference with the routing as extra outputs.

anomalib's own export (``engine.export``) traces :meth:`MoleFlow.forward`, whose four outputs are the ones anomalib's
inferencers expect. A line that mixes products also needs to know which product each image was taken for and
whether it is one the model never learned: :class:`RoutedGraph` returns those too. Both graphs hold the router and
every task's expert in one static graph (no data-dependent branch: each image's expert weights are gathered, see
:meth:`MoleFlowModel.encode`), so one artefact serves every product at the cost of one expert per image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .lightning_model import MoleFlow

#: Outputs of :class:`RoutedGraph`, in order.
ROUTED_OUTPUTS: tuple[str, ...] = (
    "pred_score",
    "pred_label",
    "anomaly_map",
    "pred_mask",
    "raw_score",
    "routed_task",
    "router_distance",
    "unknown_product",
)


class RoutedGraph(nn.Module):
    """``images -> ROUTED_OUTPUTS``: pre-processing, routing, scoring and per-task post-processing of a model.

    Args:
        model: A trained MoLE-Flow model with per-task thresholding and normalisation (its default).
    """

    def __init__(self, model: MoleFlow) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Score ``(b, 3, H, W)`` images in [0, 1]; returns the tensors named by :data:`ROUTED_OUTPUTS`."""
        raw, final, routed = self.model.score_images(images)
        if final.pred_label is None or final.pred_mask is None:
            msg = "Export needs the model's thresholds: keep the default post-processor (TaskPostProcessor)."
            raise ValueError(msg)
        return (
            final.pred_score,
            final.pred_label,
            final.anomaly_map,
            final.pred_mask,
            raw.pred_score,
            routed.task,
            routed.distance,
            routed.unknown,
        )

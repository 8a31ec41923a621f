"""anomalib's Fastflow on any timm CNN backbone (by subclassing, reusing anomalib's flow, loss and training).

anomalib's ``FastflowModel`` builds its backbone in its constructor and accepts only ``resnet18``,
``wide_resnet50_2``, ``cait_m48_448`` and ``deit_base_distilled_patch16_384``. :class:`TimmFastflowModel` replaces only
that constructor: the backbone comes from :func:`build_feature_extractor` (MoLE-Flow's, so offline ImageNet weights
work the same way), on the stages the benchmark uses; the FastFlow blocks (``create_fast_flow_block``), the forward
pass, the anomaly map, the loss, the optimizer and the training/validation steps are anomalib's, inherited.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from anomalib.metrics import Evaluator
from anomalib.models import Fastflow
from anomalib.models.components import AnomalibModule
from anomalib.models.image.fastflow.anomaly_map import AnomalyMapGenerator
from anomalib.models.image.fastflow.loss import FastflowLoss
from anomalib.models.image.fastflow.torch_model import FastflowModel, create_fast_flow_block
from anomalib.visualization import Visualizer
from torch import nn

from anomalib_moleflow.models.moleflow.components.backbone import build_feature_extractor

from .common import BenchmarkBaseline


class TimmFastflowModel(FastflowModel):
    """anomalib's ``FastflowModel`` over the stages ``layers`` of any timm CNN.

    Like anomalib's CNN path: one trainable ``LayerNorm`` over ``(C, H, W)`` and one FastFlow block per stage.

    Args:
        input_size: Model input size.
        backbone: timm model name.
        layers: Backbone stages to model (one flow per stage).
        pre_trained: ImageNet weights (offline ones for ``tf_efficientnet_lite*``).
        flow_steps: Flow steps per stage.
        conv3x3_only: Use only 3x3 convolutions in the subnets.
        hidden_ratio: Hidden channels of the subnets, as a ratio of the input channels.
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        backbone: str,
        layers: Sequence[str],
        pre_trained: bool = True,
        flow_steps: int = 8,
        conv3x3_only: bool = False,
        hidden_ratio: float = 1.0,
    ) -> None:
        # FastflowModel.__init__ would build (and reject) the backbone itself; everything it sets is set here.
        nn.Module.__init__(self)
        self.input_size = tuple(input_size)
        self.feature_extractor = build_feature_extractor(backbone, layers, pre_trained)
        with torch.no_grad():
            probe = self.feature_extractor(torch.zeros(1, 3, *self.input_size))
        shapes = [list(feature.shape[1:]) for feature in probe.values()]
        # anomalib's CNN path iterates over the extractor's output as a list (timm's), ours returns a dict by stage.
        self.feature_extractor.register_forward_hook(_stage_list)
        self.norms = nn.ModuleList(nn.LayerNorm(shape, elementwise_affine=True) for shape in shapes)
        self.fast_flow_blocks = nn.ModuleList(
            create_fast_flow_block(
                input_dimensions=shape,
                conv3x3_only=conv3x3_only,
                hidden_ratio=hidden_ratio,
                flow_steps=flow_steps,
            )
            for shape in shapes
        )
        self.anomaly_map_generator = AnomalyMapGenerator(input_size=self.input_size)


def _stage_list(module: nn.Module, args: Any, output: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Forward hook: the extractor's stage features as a list, finest first."""
    del module, args
    return list(output.values())


class TimmFastflow(BenchmarkBaseline, Fastflow):
    """anomalib's ``Fastflow`` Lightning module with :class:`TimmFastflowModel` inside.

    Training (loss, Adam with anomalib's learning rate, validation) is anomalib's; only the backbone choice, the input
    size and the number of epochs (anomalib's Fastflow leaves it to the trainer) are added.

    Args:
        backbone: timm model name.
        layers: Backbone stages to model.
        pre_trained: ImageNet weights (offline ones for ``tf_efficientnet_lite*``).
        image_size: Input side length; the pre-processor resizes to it.
        flow_steps: Flow steps per stage.
        conv3x3_only: Use only 3x3 convolutions in the subnets.
        hidden_ratio: Hidden channels ratio of the subnets.
        max_epochs: Training epochs (per ``fit``).
        pre_processor: Pre-processor, or ``True`` for resize to ``image_size`` + ImageNet normalisation.
        post_processor: Post-processor, or ``True`` for anomalib's default.
        evaluator: Evaluator, or ``True`` for :func:`~anomalib_moleflow.metrics.default_evaluator`.
        visualizer: Visualizer, or ``True`` for anomalib's default.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[str] = ("layer1", "layer2", "layer3"),
        pre_trained: bool = True,
        image_size: int = 256,
        flow_steps: int = 8,
        conv3x3_only: bool = False,
        hidden_ratio: float = 1.0,
        max_epochs: int = 100,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        if max_epochs < 1:
            msg = f"max_epochs must be >= 1, got {max_epochs}."
            raise ValueError(msg)
        if pre_processor is True:
            pre_processor = self.configure_pre_processor((image_size, image_size))
        # Fastflow.__init__ would build anomalib's FastflowModel (which rejects other backbones): set the same
        # attributes with the extended model instead.
        AnomalibModule.__init__(
            self,
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        self.backbone = backbone
        self.layers = tuple(layers)
        self.pre_trained = pre_trained
        self.flow_steps = flow_steps
        self.conv3x3_only = conv3x3_only
        self.hidden_ratio = hidden_ratio
        self.max_epochs = max_epochs
        self.model = TimmFastflowModel(
            input_size=(image_size, image_size),
            backbone=backbone,
            layers=self.layers,
            pre_trained=pre_trained,
            flow_steps=flow_steps,
            conv3x3_only=conv3x3_only,
            hidden_ratio=hidden_ratio,
        )
        self.loss = FastflowLoss()

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """anomalib's Fastflow arguments plus ``max_epochs``."""
        return {**super().trainer_arguments, "max_epochs": self.max_epochs}

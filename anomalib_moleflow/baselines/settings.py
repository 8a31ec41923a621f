"""The benchmark's options for anomalib's baselines, without importing them (the command line loads in milliseconds).

Each dataclass lists the arguments a baseline adds to the settings every row shares (backbone, stages, pre-training,
image size); ``tests/test_settings.py`` fails when one drifts from the baseline's signature.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FastflowSettings:
    """anomalib's Fastflow (:class:`~anomalib_moleflow.baselines.TimmFastflow`).

    Attributes:
        flow_steps: Flow steps per stage.
        conv3x3_only: Use only 3x3 convolutions in the subnets.
        hidden_ratio: Hidden channels ratio of the subnets.
        max_epochs: Training epochs (per fit).
    """

    flow_steps: int = 8
    conv3x3_only: bool = False
    hidden_ratio: float = 1.0
    max_epochs: int = 100


@dataclass
class PatchcoreSettings:
    """anomalib's Patchcore (:class:`~anomalib_moleflow.baselines.TimmPatchcore`).

    Attributes:
        coreset_sampling_ratio: Share of the training patches kept in the memory bank.
        num_neighbors: Nearest neighbours used for the image score.
        precision: Precision of the memory bank (float32 or float16).
    """

    coreset_sampling_ratio: float = 0.1
    num_neighbors: int = 9
    precision: str = "float32"


@dataclass
class PadimSettings:
    """anomalib's Padim (:class:`~anomalib_moleflow.baselines.TimmPadim`).

    Attributes:
        n_features: Channels kept by Padim's random selection; None: anomalib's default for the backbone (at most the
            stages' channels), or every channel for backbones anomalib has no default for.
    """

    n_features: int | None = None

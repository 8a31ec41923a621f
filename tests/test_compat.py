"""Pins every assumption :mod:`anomalib_moleflow.compat` makes about anomalib's private attributes."""

from __future__ import annotations

import torch
from anomalib.models import Patchcore
from anomalib.post_processing import PostProcessor

from anomalib_moleflow.compat import (
    POST_PROCESSOR_BUFFERS,
    apply_threshold,
    normalize,
    reset_memory_bank,
    set_single_statistics,
)


def test_post_processor_single_set_buffers() -> None:
    post = PostProcessor()
    values = torch.tensor([0.4, 0.6, 0.1, 0.9, 0.2, 0.8])
    set_single_statistics(post, values)
    buffers = dict(post.named_buffers())
    assert torch.equal(torch.stack([buffers[name] for name in POST_PROCESSOR_BUFFERS]), values)
    # anomalib's public properties read these very buffers
    assert post.image_threshold == 0.4
    assert post.pixel_threshold == 0.6


def test_normalize_maps_threshold_to_half_and_clips() -> None:
    values = torch.tensor([0.0, 1.0, 2.0, 5.0, 9.0])
    out = normalize(values, torch.tensor(1.0), torch.tensor(5.0), torch.tensor(2.0))
    assert out[2] == 0.5
    assert out.min() >= 0.0
    assert out.max() <= 1.0
    assert torch.all(out[1:] >= out[:-1])


def test_apply_threshold_is_strictly_greater() -> None:
    assert apply_threshold(torch.tensor([0.4, 0.5, 0.6]), torch.tensor(0.5)).tolist() == [False, False, True]


def test_reset_memory_bank_lets_patchcore_refit() -> None:
    model = Patchcore(backbone="resnet18", layers=("layer2",), pre_trained=False)
    model.model.embedding_store.append(torch.zeros(2, 3))
    model._is_fitted = torch.tensor([True])
    reset_memory_bank(model)
    assert model.model.embedding_store == []
    assert not bool(model._is_fitted)


def test_padim_default_features_are_anomalibs() -> None:
    from anomalib.models.image.padim.torch_model import PadimModel

    from anomalib_moleflow.compat import padim_default_features

    assert padim_default_features("resnet18") == PadimModel("resnet18", pre_trained=False).n_features == 100
    assert padim_default_features("tf_efficientnet_lite0") is None

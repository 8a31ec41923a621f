"""Any block of a timm ViT as a backbone stage: patch tokens on the patch grid, prefix tokens dropped.

Everything runs offline on CPU with timm's tiny random ViTs (``pre_trained=False``): ``test_vit`` (6 blocks,
64 channels, one class token) and ``deit_tiny_distilled_patch16_224`` (a ``VisionTransformer`` whose name lacks
"vit", with two prefix tokens: class and distillation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from anomalib.models.components import TimmFeatureExtractor

from anomalib_moleflow.models import MoleFlow
from anomalib_moleflow.models.moleflow.components import backbone as backbone_module
from anomalib_moleflow.models.moleflow.components.backbone import BackboneWeightsError, build_feature_extractor

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = "test_vit"
DINOV2_CONFIG = REPO / "configs" / "continual" / "mvtec_dinov2.yaml"


@pytest.fixture(scope="module")
def tiny_vit() -> TimmFeatureExtractor:
    """``test_vit`` with an early, a middle and the last block, asked for out of depth order."""
    return build_feature_extractor(TINY_VIT, ("blocks.4", "blocks.0", "blocks.5"), pre_trained=False)


def block_patch_maps(extractor: TimmFeatureExtractor, images: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
    """Reference stage outputs: each block's tokens (caught by a hook), final norm, prefix dropped, on the grid."""
    vit = extractor.feature_extractor
    caught: dict[int, torch.Tensor] = {}
    handles = [
        vit.blocks[index].register_forward_hook(lambda _m, _i, out, index=index: caught.__setitem__(index, out))
        for index in blocks
    ]
    try:
        with torch.no_grad():
            vit(images)
    finally:
        for handle in handles:
            handle.remove()
    height, width = (side // vit.patch_embed.patch_size[0] for side in images.shape[-2:])
    maps = []
    for index in blocks:
        tokens = vit.norm(caught[index])
        assert tokens.shape[1] == vit.num_prefix_tokens + height * width
        patches = tokens[:, vit.num_prefix_tokens :]
        maps.append(patches.transpose(1, 2).reshape(images.shape[0], -1, height, width))
    return maps


def test_every_vit_block_is_a_stage() -> None:
    """Out-of-range, non-block and repeated names are refused; the error lists every block, not only the last three."""
    valid = ", ".join(f"'blocks.{index}'" for index in range(6))
    for layers in (("blocks.6",), ("blocks.0", "layer1"), ("blocks.x",), ("blocks.1", "blocks.1")):
        with pytest.raises(ValueError, match=r"Invalid layers .* for backbone 'test_vit'") as error:
            build_feature_extractor(TINY_VIT, layers, pre_trained=False)
        assert f"Valid stage names: [{valid}]." in str(error.value)


def test_early_blocks_give_patch_tokens_on_the_grid(tiny_vit: TimmFeatureExtractor) -> None:
    """Each chosen block is a (b, c, h, w) map on the 16 px patch grid, in depth order, at any input size."""
    assert tiny_vit.out_dims == [64, 64, 64]
    for size, grid in (((64, 64), (4, 4)), ((48, 80), (3, 5))):
        features = tiny_vit(torch.rand(2, 3, *size))
        assert list(features) == ["blocks.0", "blocks.4", "blocks.5"]
        assert all(tuple(feature.shape) == (2, 64, *grid) for feature in features.values())


def test_stage_is_the_blocks_patch_tokens(tiny_vit: TimmFeatureExtractor) -> None:
    """A stage equals its block's tokens after the final norm, class token dropped, reshaped to the grid."""
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    features = tiny_vit(images)
    expected = block_patch_maps(tiny_vit, images, [0, 4, 5])
    for feature, reference in zip(features.values(), expected, strict=True):
        torch.testing.assert_close(feature, reference)
    # the blocks differ, so the equality above checks which block each stage comes from
    assert (features["blocks.0"] - features["blocks.5"]).abs().max() > 1e-2


def test_vit_without_vit_in_its_name_drops_both_prefix_tokens() -> None:
    """DeiT-distilled (two prefix tokens) gets the same ViT path: an early block, on the grid of a small input."""
    extractor = build_feature_extractor("deit_tiny_distilled_patch16_224", ("blocks.1",), pre_trained=False)
    assert extractor.feature_extractor.num_prefix_tokens == 2
    images = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    feature = extractor(images)["blocks.1"]
    assert feature.shape == (1, 192, 2, 3)
    torch.testing.assert_close(feature, block_patch_maps(extractor, images, [1])[0])


def test_moleflow_runs_on_an_early_vit_block(tiny_model_kwargs: dict[str, Any]) -> None:
    """MoLE-Flow builds on a ViT's second block and scores images routed to a task."""
    torch.manual_seed(0)
    model = MoleFlow(**{**tiny_model_kwargs, "backbone": TINY_VIT, "layers": ("blocks.1",)})
    assert model.model.grid == (4, 4)  # 64 px / 16 px patches
    model.add_task("t0")
    model.eval()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    predictions = model.score_images(images, 0).final
    assert predictions.pred_score.shape == (3,)
    assert predictions.anomaly_map.shape[0] == 3
    assert predictions.anomaly_map.shape[-2:] == (64, 64)
    assert torch.isfinite(predictions.pred_score).all()
    assert torch.isfinite(predictions.anomaly_map).all()


def test_offline_pretrained_vit_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline without cached weights, a pretrained (tagged) DINOv2 stops at once with one message saying what to do."""
    backbone = "vit_base_patch14_dinov2.lvd142m"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(backbone_module, "_weights_cached", lambda name: False)

    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("no model may be built before the weights check")

    monkeypatch.setattr(backbone_module.timm, "create_model", no_model)
    with pytest.raises(BackboneWeightsError) as error:
        build_feature_extractor(backbone, ("blocks.5", "blocks.8"), pre_trained=True)
    message = str(error.value)
    assert f"Cannot download pretrained (lvd142m) weights for backbone '{backbone}'" in message
    assert "Hugging Face Hub is unreachable" in message
    assert f"timm.create_model('{backbone}', pretrained=True)" in message  # how to fill the cache elsewhere
    assert "pre_trained=False" in message


def test_dinov2_config_names_valid_blocks() -> None:
    """The DINOv2 study config resolves, and its blocks are intermediate blocks of a 12-block ViT on a 37 x 37 grid."""
    from anomalib_moleflow.engine.runner import resolve

    config = resolve(yaml.safe_load(DINOV2_CONFIG.read_text()))
    names, vit = backbone_module._stage_names(config.model.backbone)
    assert vit
    assert names == [f"blocks.{index}" for index in range(12)]
    assert set(config.model.layers) <= set(names)
    assert "blocks.0" not in config.model.layers
    cfg = backbone_module.timm.models.get_pretrained_cfg(config.model.backbone)
    assert cfg.hf_hub_id == "timm/vit_base_patch14_dinov2.lvd142m"
    assert config.model.image_size == cfg.input_size[-1] == 37 * 14
    assert config.model.pre_trained is True

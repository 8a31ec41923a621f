"""Why does MoLE-Flow's patch score localise worse than Padim/Patchcore on the same features? (issue 12, step 2)

A research script, not a test: the backbone pass runs once per image (features cached in memory), then every variant
trains only the flow part on the cached patch embeddings and is scored with scikit-learn on the raw scores. Beside
them, Padim-style (per-position Gaussian) and Patchcore-style (nearest neighbour in the full memory bank) scores on
the very same patch embeddings give the bar that the features allow.

    python scripts/experiments/patch_score.py --data demo --variants study,study+no_ln,exact --epochs 20 --seeds 0,1,2
    python scripts/experiments/patch_score.py --data demo --variants exact+pool1,exact+pool1+no_ctx  # modifiers chain
    python scripts/experiments/patch_score.py --data demo --variants exact+pool1 --epochs 24 --schedule cosine

Prints one markdown table (mean ± spread over seeds) per dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from einops import rearrange
from sklearn.metrics import average_precision_score, roc_auc_score

from anomalib_moleflow.models.moleflow.anomaly_map import AnomalyMapGenerator
from anomalib_moleflow.models.moleflow.components import coupling
from anomalib_moleflow.models.moleflow.components.adapters import whiten
from anomalib_moleflow.models.moleflow.components.embedding import PatchEmbedding
from anomalib_moleflow.models.moleflow.loss import MoleFlowLoss
from anomalib_moleflow.models.moleflow.torch_model import MoleFlowModel
from anomalib_moleflow.runtime import pick_threads

if TYPE_CHECKING:
    from anomalib_moleflow.models.moleflow.lightning_model import MoleFlow

# ---------------------------------------------------------------- data


def load_split(datamodule: object, image_size: int) -> dict[str, torch.Tensor]:
    """Pre-processed train images, test images, labels and masks (masks at ``image_size``, nearest)."""
    from anomalib_moleflow.models.moleflow.lightning_model import MoleFlow

    pre = MoleFlow.configure_pre_processor((image_size, image_size)).transform
    datamodule.prepare_data()
    datamodule.setup()
    out: dict[str, list[torch.Tensor]] = {"train": [], "test": [], "label": [], "mask": []}
    for batch in datamodule.train_dataloader():
        out["train"].append(pre(batch.image))
    for batch in datamodule.test_dataloader():
        out["test"].append(pre(batch.image))
        out["label"].append(batch.gt_label.long())
        if batch.gt_mask is not None:
            mask = F.interpolate(batch.gt_mask.float().reshape(-1, 1, *batch.gt_mask.shape[-2:]), image_size)
            out["mask"].append(mask[:, 0] > 0.5)
    return {key: torch.cat(value) for key, value in out.items() if value}


def datasets(name: str, root: Path) -> dict[str, object]:
    """Named datamodules of one benchmark family."""
    if name == "demo":
        from anomalib_moleflow.data import SyntheticMVTecAD

        return {
            c: SyntheticMVTecAD(
                root=root / "demo_big", category=c, n_train=60, n_test_good=20, n_test_defect=8, num_workers=0
            )
            for c in ("woven", "wood", "pill", "screw")
        }
    if name == "elpv":
        from anomalib_moleflow.data.elpv import ELPV

        return {
            c: ELPV(root=root / "elpv_q", category=c, n_train=200, n_test_good=100, n_test_defect=100, num_workers=0)
            for c in ("mono", "poly")
        }
    if name.startswith("elpv_all"):  # ``elpv_allS``: 150 training cells per type as the benchmark, every other
        # cell a test cell (split seed S): the largest routing test the data allow
        from anomalib_moleflow.data.elpv import ELPV

        seed = int(name.removeprefix("elpv_all") or 0)
        return {
            f"{c}_all{seed}": ELPV(
                root=root / f"elpv_all{seed}", category=c, n_train=150, split_seed=seed, num_workers=0
            )
            for c in ("mono", "poly")
        }
    if name == "elpv_bench":  # the split of configs/benchmark/quality.yaml
        from anomalib_moleflow.data.elpv import ELPV

        return {
            f"elpv_{c}": ELPV(
                root=root / "elpv_quality", category=c, n_train=150, n_test_good=60, n_test_defect=60, num_workers=0
            )
            for c in ("mono", "poly")
        }
    if name == "real":  # the real products with pixel masks (../shared/datasets, MVTec layout)
        from anomalib.data import MVTecAD

        return {
            category: MVTecAD(root=SHARED / folder, category=category, num_workers=0, eval_batch_size=32)
            for folder, category in REAL_PRODUCTS
        }
    raise ValueError(name)


def checkpoint_parser(description: str, data: str) -> argparse.ArgumentParser:
    """The arguments of a script that scores a trained checkpoint on families of :func:`datasets`: ``--checkpoint``,
    ``--data`` (default ``data``), ``--root`` and ``--image_size``; the script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", default=data, help="families of datasets(), comma-separated")
    parser.add_argument("--root", type=Path, default=Path("./datasets"))
    parser.add_argument("--image_size", type=int, default=224)
    return parser


def load_checkpoint(path: Path) -> MoleFlow:
    """A trained continual MoLE-Flow on the CPU, in eval mode, with the torch threads the machine has free."""
    from anomalib_moleflow.models.moleflow.lightning_model import MoleFlow

    torch.set_num_threads(pick_threads())
    return MoleFlow.load_from_checkpoint(path, map_location="cpu").eval()


#: Real products with pixel masks: (folder under ``SHARED``, category).
REAL_PRODUCTS = (("bsdata", "ball_screw_drive"), ("mpdd", "metal_plate"))
SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"


# ------------------------------------------------------------ variants


def _replace_norm(model: MoleFlowModel, normalise: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Every whitening adapter: ``normalise`` instead of its LayerNorm, then its own ``* gamma + beta``."""
    for adapter in model.whitening:
        adapter.forward = lambda x, a=adapter: normalise(x) * a.gamma + a.beta


def _whitening_input(model: MoleFlowModel, patches: torch.Tensor) -> torch.Tensor:
    """What the whitening adapters see: the patches plus the positional code."""
    return patches if model.pos_embedding is None else patches + model.pos_embedding


def _no_ln(model: MoleFlowModel) -> None:
    _replace_norm(model, lambda x: x)


def _subnet_conv(model: MoleFlowModel, kernel: int = 3) -> None:
    """Fastflow-like context inside every coupling subnet: a full k x k convolution of the conditioning half over the
    patch grid, added to the subnet's hidden layer (shared base, zero at start, so the flow starts as before)."""
    from anomalib_moleflow.models.moleflow.components.coupling import MoLESubnet

    subnets = [m for flow in model.flows for m in flow.modules() if isinstance(m, MoLESubnet)]
    for subnet in subnets:
        conv = torch.nn.Conv2d(subnet.fc1.base.in_features, subnet.fc1.base.out_features, kernel, padding=kernel // 2)
        torch.nn.init.zeros_(conv.weight)
        torch.nn.init.zeros_(conv.bias)
        subnet.add_module("context_conv", conv)

        def forward(inputs: torch.Tensor, m: MoLESubnet = subnet) -> torch.Tensor:
            height, width = m.grid
            x, tasks = inputs[:, :-1], inputs[:, -1]
            tasks = rearrange(tasks, "(b n) -> b n", n=height * width)[:, 0].round().long()
            grid = rearrange(x, "(b h w) c -> b c h w", h=height, w=width)
            hidden = m.fc1(x, tasks) + rearrange(m.context_conv(grid), "b c h w -> (b h w) c")
            out = m.fc2(m.act(hidden), tasks)
            if m.scale_conv is None:
                return out
            half = rearrange(x[:, : m.half], "(b h w) c -> b c h w", h=height, w=width)
            context = rearrange(m.scale_conv(half), "b c h w -> (b h w) c") * (0.2 * torch.sigmoid(m.scale_theta))
            return torch.cat([out[:, : m.scale_channels] + context, out[:, m.scale_channels :]], dim=1)

        subnet.forward = forward


def _robust_image_ln(model: MoleFlowModel) -> None:
    """Per-image normalisation with robust statistics: the median over the image's patches of each patch's channel
    mean and of its mean square deviation from that centre, so a defect on under half of the image cannot move them."""

    def median(v: torch.Tensor) -> torch.Tensor:  # over the patches of each image; TopK exports to ONNX
        flat = rearrange(v, "b h w -> b (h w)")
        return flat.topk(flat.shape[1] // 2 + 1, dim=1).values[:, -1, None, None, None]

    def normalise(x: torch.Tensor) -> torch.Tensor:
        centre = median(x.mean(dim=-1))
        return (x - centre) / median((x - centre).pow(2).mean(dim=-1)).add(1e-5).sqrt()

    _replace_norm(model, normalise)


#: Channels of the fine stage at the front of the patch vector (tf_efficientnet_lite0's blocks.2 of D = 152).
FINE_CHANNELS = 40
#: Every model the harness builds is one flow on one embedding (its multi-stage variants combine such models) and it
#: maps its own score kinds: the settings that made the model's default of both so when the harness's tables were run.
ONE_FLOW = {"flow_layout": "joint", "anomaly_map_value": "score"}


def _stage_ln(model: MoleFlowModel, split: int = FINE_CHANNELS) -> None:
    """Per-patch LayerNorm of each stage's channels on their own (lite0: blocks.2 = the first 40 of D = 152), so the
    fine stage's norm is not swamped by the coarse stage's (``--embed_dim`` must equal the channel count)."""
    _replace_norm(
        model,
        lambda x: torch.cat([F.layer_norm(part, part.shape[-1:]) for part in (x[..., :split], x[..., split:])], -1),
    )


def _channel_standardize(model: MoleFlowModel, train_patches: torch.Tensor) -> None:
    """Per-channel standardisation with the task's training statistics instead of per-patch LayerNorm."""
    x = _whitening_input(model, train_patches)
    mean, std = x.mean(dim=(0, 1, 2)), x.std(dim=(0, 1, 2)) + 1e-6
    _replace_norm(model, lambda v: (v - mean) / std)


def _image_ln(v: torch.Tensor) -> torch.Tensor:
    """The model's default normalisation (per image, over ``(h, w, d)``) without the adapter's affine."""
    return whiten(v, torch.ones(()), torch.zeros(()), "image")


def _image_chan_std(model: MoleFlowModel, train_patches: torch.Tensor) -> None:
    """Per-image normalisation (the default), then each channel standardised with the task's training statistics of
    the normalised features: the image's exposure is removed and every channel reaches the flow at unit scale."""
    x = _image_ln(_whitening_input(model, train_patches))
    mean, std = x.mean(dim=(0, 1, 2)), x.std(dim=(0, 1, 2)) + 1e-6
    _replace_norm(model, lambda v: (_image_ln(v) - mean) / std)


def _stage_weight(model: MoleFlowModel, weight: float, split: int = FINE_CHANNELS) -> None:
    """Per-image normalisation, then the fine stage's channels (lite0: blocks.2 = the first 40 of D = 152) scaled by
    ``weight`` relative to the coarse stage's."""
    scale = torch.ones(model.embed_dim)
    scale[:split] = weight
    _replace_norm(model, lambda v: _image_ln(v) * scale)


def _position_stats(model: MoleFlowModel, train_patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position, per-channel mean and standard deviation ``(h, w, d)`` of the task's training patches."""
    x = _whitening_input(model, train_patches)
    return x.mean(dim=0), x.std(dim=0) + 1e-6


def _pos_std(model: MoleFlowModel, train_patches: torch.Tensor) -> None:
    """Each position standardised with the task's training statistics at that position (a diagonal Padim) instead
    of the LayerNorm: aligned products get a per-position reference, unaligned ones about a global one."""
    mean, std = _position_stats(model, train_patches)
    _replace_norm(model, lambda v: (v - mean) / std)


def _pos_center(model: MoleFlowModel, train_patches: torch.Tensor) -> None:
    """The task's per-position training mean subtracted, then the adapter's own LayerNorm."""
    mean, _ = _position_stats(model, train_patches)
    norm = model.whitening[0].norm
    _replace_norm(model, lambda v: F.layer_norm(v - mean, v.shape[-3:] if norm == "image" else v.shape[-1:]))


def _mean_patch_variance(x: torch.Tensor) -> torch.Tensor:
    """The mean over ``(b, h, w, d)`` patches of each patch's variance over its channels."""
    return x.var(dim=-1, unbiased=False).mean()


def _soft_ln(model: MoleFlowModel, train_patches: torch.Tensor, c: float = 1.0) -> None:
    """Per-patch LayerNorm whose variance floor is ``c`` times the task's mean patch variance: patches far below the
    typical variance (flat background) are not blown up to unit scale, typical and larger ones are normalised."""
    floor = c * _mean_patch_variance(_whitening_input(model, train_patches))

    def normalise(v: torch.Tensor) -> torch.Tensor:
        centred = v - v.mean(dim=-1, keepdim=True)
        return centred / (centred.pow(2).mean(dim=-1, keepdim=True) + floor).sqrt()

    _replace_norm(model, normalise)


def _polar(model: MoleFlowModel, train_patches: torch.Tensor, floor: float = 0.0) -> None:
    """Each patch as its pattern and its level: the per-patch LayerNorm (direction, what marks rust's colour) with the
    patch's channel mean and log standard deviation (brightness and contrast, what marks a dark pit) given back as
    the last two channels, relative to the image's own and at unit scale over the task's training patches.

    The LayerNorm's output obeys two constraints (zero mean, fixed norm), so the two channels it gives up are the
    ones its constraints determine: the patch is recoverable, nothing is lost, only the coordinates change.
    ``floor`` > 0 divides the pattern by ``sqrt(variance + floor * the task's mean patch variance)`` instead (as
    ``soft_ln``), so a flat patch's pattern is not its noise blown up to unit scale.
    """
    train = _whitening_input(model, train_patches)
    variance_floor = floor * _mean_patch_variance(train)

    def parts(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = v.mean(dim=-1, keepdim=True)
        variance = (v - mean).pow(2).mean(dim=-1, keepdim=True)
        log_std = variance.add(1e-5).log() / 2
        pattern = (v - mean) / (variance + variance_floor + 1e-5).sqrt()
        # the image's exposure removed, as the per-image normalisation does: b h w 1 relative to the image's mean
        level = torch.cat([mean, log_std], dim=-1)
        return pattern, level - level.mean(dim=(1, 2), keepdim=True)

    _, train_level = parts(train)
    scale = train_level.flatten(0, 2).std(dim=0) + 1e-6

    def normalise(v: torch.Tensor) -> torch.Tensor:
        pattern, level = parts(v)
        return torch.cat([pattern[..., :-2], level / scale], dim=-1)

    _replace_norm(model, normalise)


def _pos_after(model: MoleFlowModel, scale: float = 1.0) -> None:
    """Positional code added after whitening (and scaled), instead of before it."""
    pos = model.pos_embedding * scale
    model.paths[0].pos_embedding = None
    for adapter in model.whitening:
        original = adapter.forward
        adapter.forward = lambda v, o=original: o(v) + pos


@contextlib.contextmanager
def _subnet_width(factor: float) -> Iterator[None]:
    """Build the coupling subnets with ``factor`` times their hidden width D while the block is open."""
    original = coupling.MoLESubnet

    class Wider(original):  # type: ignore[misc, valid-type]
        def __init__(self, c_in: int, c_out: int, hidden: int, *args: object) -> None:
            super().__init__(c_in, c_out, int(hidden * factor), *args)

    coupling.MoLESubnet = Wider
    try:
        yield
    finally:
        coupling.MoLESubnet = original


#: Modifiers of a run ``BASE[+MODIFIER...]`` (chained, see :func:`resolve`): BASE is ``study`` (exact_likelihood=False,
#: per-patch LayerNorm) or ``exact`` (the defaults). Sections 1-8c of docs/quality.md ran before per-image
#: normalisation became the default: add ``+patch_ln`` to their ``exact`` variants to run them as they ran.
VARIANTS: dict[str, dict] = {
    "": {},
    "no_pos": {"settings": {"use_pos_embedding": False}},
    "no_whiten": {"settings": {"use_whitening_adapter": False}},
    "no_ln": {"patch": _no_ln},
    "chan_std": {"fit": _channel_standardize},
    "pos_after": {"patch": _pos_after},
    "pos_after_0.1": {"patch": lambda m: _pos_after(m, 0.1)},
    "chan_std_pos_after_0.1": {"fit": _channel_standardize, "patch_after": lambda m: _pos_after(m, 0.1)},
    "no_ctx": {"settings": {"spatial_context_kernel": 0, "scale_context_kernel": 0}},
    "no_spatial": {"settings": {"spatial_context_kernel": 0}},
    "no_scale": {"settings": {"scale_context_kernel": 0}},
    "spatial_fixed": {"frozen": "spatial_context"},
    "whiten_logdet": {"whiten_logdet": True},
    "whiten_fixed": {"frozen": "whitening"},
    "spatial_fixed_whiten_logdet": {"frozen": "spatial_context", "whiten_logdet": True},
    "dim_full": {"embed_dim": "full"},
    "pool1": {"patch_size": 1},
    "scale3": {"settings": {"scale_context_kernel": 3}},
    "scale9": {"settings": {"scale_context_kernel": 9}},
    "spatial5": {"settings": {"spatial_context_kernel": 5}},
    "subnet_conv3": {"patch": _subnet_conv},
    "multiscale": {"multiscale": True},
    # the same flows, each on its stage's channels of the joint embedding (coarse stages upsampled to the finest grid)
    "multiscale_fine": {"multiscale": True, "fine_grid": True},
    "image_ln": {"settings": {"whitening_norm": "image"}},
    "patch_ln": {"settings": {"whitening_norm": "patch"}},
    "robust_image_ln": {"patch": _robust_image_ln},
    "stage_ln": {"patch": _stage_ln},
    "soft_ln": {"fit": _soft_ln},
    "image_chan_std": {"fit": _image_chan_std},
    "polar": {"fit": _polar},
    "soft_polar": {"fit": lambda m, p: _polar(m, p, floor=1.0)},
    # "fit", not "patch": with --continual the base flow is trained with the weighting too
    "stage_w2": {"fit": lambda m, _: _stage_weight(m, 2.0)},
    "stage_w0.5": {"fit": lambda m, _: _stage_weight(m, 0.5)},
    "pos_std": {"fit": _pos_std},
    "pos_center": {"fit": _pos_center},
    "position": {"settings": {"whitening_norm": "position"}},
    "pos_cond16": {"settings": {"position_condition": 16}},
    "pos_cond32": {"settings": {"position_condition": 32}},
    "pos_cond64": {"settings": {"position_condition": 64}},
    "patch3": {"patch_size": 3},
    "soft_ln_0.1": {"fit": lambda m, p: _soft_ln(m, p, 0.1)},
    "nearest": {"upsample": "nearest"},
    "tail_off": {"tail_weight": 0.0},
    "tail_k0.005": {"tail_ratio": 0.005},
    "tail_k0.1": {"tail_ratio": 0.1},
    "tail_only": {"tail_weight": 1.0},
    "lr3e-4": {"lr": 3e-4},
    "lr3e-3": {"lr": 3e-3},
    # the flow's capacity: depth of the shared stack, width of its subnets, depth of each task's DIA
    "blocks12": {"settings": {"num_coupling_layers": 12}},
    "hidden2": {"subnet_width": 2.0},
    "hidden4": {"subnet_width": 4.0},
    "dia4": {"settings": {"dia_blocks": 4}},
    # the weights the run ends with: the average of the iterates over the last half / quarter of the steps
    "swa0.5": {"average_from": 0.5},
    "swa0.75": {"average_from": 0.75},
}


def resolve(modifiers: str) -> dict:
    """The spec of ``MOD1+MOD2+...`` (settings merged; later modifiers win)."""
    spec: dict = {}
    for name in filter(None, modifiers.split("+")):
        extra = VARIANTS[name]
        spec = {**spec, **extra, "settings": {**spec.get("settings", {}), **extra.get("settings", {})}}
    return spec


def _fit_whitening(model: MoleFlowModel, task: int, patches: torch.Tensor) -> None:
    """The model's own statistics pass (``whitening_norm="position"``) on the task's training patches."""
    if model.whitening_needs_fit(task):
        model.accumulate_whitening(task, patches)
        model.finalize_whitening(task)


def _count_whitening_log_det(model: MoleFlowModel) -> None:
    """Add the whitening affine's ``sum(log gamma)`` to the log-det (one half of ``exact_likelihood``)."""
    encode = model.encode

    def encode_counted(x: torch.Tensor, task: int, path: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det = encode(x, task, path)
        return z, log_det + model.whitening[task].log_abs_det()

    model.encode = encode_counted


# --------------------------------------------------------------- scoring


def auroc_ap(labels: torch.Tensor, scores: torch.Tensor) -> tuple[float, float]:
    """ROC AUC and average precision (scikit-learn's definitions, ties included), by one torch sort: scikit-learn
    takes seconds per call on the ~10^7 pixels of a test set."""
    scores, order = scores.flatten().float().sort(descending=True)
    labels = labels.flatten()[order].double()
    last = torch.ones_like(scores, dtype=torch.bool)  # last element of each run of tied scores
    last[:-1] = scores[1:] != scores[:-1]
    tp = labels.cumsum(0)[last]
    fp = (1 - labels).cumsum(0)[last]
    positives, negatives = tp[-1], fp[-1]
    tpr = torch.cat([tp.new_zeros(1), tp / positives])
    fpr = torch.cat([fp.new_zeros(1), fp / negatives])
    auroc = torch.trapezoid(tpr, fpr)
    precision = tp / (tp + fp)
    ap = ((tpr[1:] - tpr[:-1]) * precision).sum()
    return float(auroc), float(ap)


def metrics(scores_map: torch.Tensor, image_scores: torch.Tensor, split: dict[str, torch.Tensor]) -> dict[str, float]:
    """Image AUROC/AP and pixel AUROC/AP (pixels where masks exist)."""
    labels = split["label"].numpy()
    result = {
        "img_auroc": 100 * roc_auc_score(labels, image_scores.numpy()),
        "img_ap": 100 * average_precision_score(labels, image_scores.numpy()),
    }
    if split.get("mask") is not None:
        auroc, ap = auroc_ap(split["mask"], scores_map)
        result["pix_auroc"], result["pix_ap"] = 100 * auroc, 100 * ap
    return result


def to_map(model: MoleFlowModel, patch_scores: torch.Tensor, size: int, sigma: float | None = None) -> torch.Tensor:
    """Patch scores ``(b, h, w)`` to the model's blurred image-size map ``(b, H, W)`` (or blurred by ``sigma``)."""
    generator = model.anomaly_map_generator if sigma is None else AnomalyMapGenerator(sigma)
    return generator(patch_scores, (size, size))[:, 0]


def top_k(patch_scores: torch.Tensor, k: int = 3) -> torch.Tensor:
    return patch_scores.flatten(1).topk(k, dim=1).values.mean(1)


def padim_scores(train: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance to a per-position Gaussian (Padim's score) ``(b, h, w)``."""
    mean = train.mean(0)  # (h, w, d)
    centred = train - mean
    n, _, _, d = train.shape
    cov = torch.einsum("nhwi,nhwj->hwij", centred, centred) / max(n - 1, 1) + 0.01 * torch.eye(d)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(cov))  # batched linalg.inv fails with >1 MKL thread here
    diff = test - mean
    return torch.einsum("bhwi,hwij,bhwj->bhw", diff, inv, diff).clamp_min(0).sqrt()


def patchcore_scores(
    train: torch.Tensor, test: torch.Tensor, bank_size: int = 20000, coreset_ratio: float = 0.0
) -> torch.Tensor:
    """Distance to the nearest training patch ``(b, h, w)``: a random bank of at most ``bank_size`` patches, or, with
    ``coreset_ratio`` > 0, anomalib's greedy coreset of that share of all training patches (as its Patchcore)."""
    bank = rearrange(train, "n h w d -> (n h w) d")
    if coreset_ratio > 0:
        from anomalib.models.components.sampling import KCenterGreedy

        bank = KCenterGreedy(bank, sampling_ratio=coreset_ratio).sample_coreset()
    elif bank.shape[0] > bank_size:
        bank = bank[torch.randperm(bank.shape[0], generator=torch.Generator().manual_seed(0))[:bank_size]]
    flat = rearrange(test, "b h w d -> (b h w) d")
    dists = torch.cat([torch.cdist(chunk, bank).min(1).values for chunk in flat.split(2048)])
    return rearrange(dists, "(b h w) -> b h w", b=test.shape[0], h=test.shape[1])


# -------------------------------------------------------------- training


def train_flow(
    model: MoleFlowModel,
    patches: torch.Tensor,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    frozen: str = "",
    schedule: str = "constant",
    on_epoch: Callable[[int], None] | None = None,
    max_steps: int | None = None,
    on_step: Callable[[int], None] | None = None,
    loss_fn: MoleFlowLoss | None = None,
    task: int = 0,
    average_from: float | None = None,
) -> list[float]:
    """Adam on task 0's parameters (base included) over cached patch embeddings; the study's loss.

    ``schedule="cosine"`` anneals the learning rate to 0 over the run, one step per batch. ``max_steps``: train for
    that many optimizer steps instead of ``epochs`` epochs (``on_step`` is called after each). ``average_from``:
    end with the equal-weight average of the iterates from that fraction of the steps on (SWA, no BN to update).
    """
    loss_fn = loss_fn or MoleFlowLoss()
    if max_steps is not None:
        epochs = -(-max_steps // -(-patches.shape[0] // batch))
    params = model.set_trainable(task, train_shared=task == 0)
    if frozen:
        excluded = {id(p) for name, p in model.named_parameters() if frozen in name}
        params = [p for p in params if id(p) not in excluded]
    optimizer = torch.optim.Adam(params, lr=lr)
    steps = max_steps or max(1, epochs * -(-patches.shape[0] // batch))
    step = 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        (lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))) if schedule == "cosine" else (lambda _: 1.0),
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    averaged: list[torch.Tensor] = []
    averaged_count = 0
    for _ in range(epochs):
        order = torch.randperm(patches.shape[0], generator=generator)
        total = 0.0
        for idx in order.split(batch):
            x = patches[idx]
            z, log_det = model.encode(x, task)
            nll = rearrange(model.patch_nll(z, log_det), "(b n) -> b n", b=x.shape[0])
            loss = loss_fn(nll, rearrange(log_det, "(b n) -> b n", b=x.shape[0]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * x.shape[0]
            step += 1
            if average_from is not None and step > average_from * steps:
                averaged_count += 1
                if not averaged:
                    averaged = [p.detach().clone() for p in params]
                else:
                    for mean, p in zip(averaged, params, strict=True):
                        mean.lerp_(p.detach(), 1 / averaged_count)
                if step == steps:  # the last step: the run ends (and is scored) with the average
                    with torch.no_grad():
                        for p, mean in zip(params, averaged, strict=True):
                            p.copy_(mean)
            if on_step is not None:
                model.eval()
                on_step(step)
                model.train()
            if step == max_steps:
                break
        losses.append(total / patches.shape[0])
        if on_epoch is not None:
            model.eval()
            on_epoch(len(losses))
            model.train()
    model.eval()
    return losses


@torch.no_grad()
def flow_scores(model: MoleFlowModel, patches: torch.Tensor, task: int = 0) -> dict[str, torch.Tensor]:
    """Patch scores ``(b, h, w)``: full NLL, the ``0.5||z||^2`` part alone, and both as Fastflow's ``-exp(-s / D)``."""
    nll, quad = [], []
    for x in patches.split(32):
        z, log_det = model.encode(x, task)
        shape = {"b": x.shape[0], "h": x.shape[1], "w": x.shape[2]}
        nll.append(rearrange(model.patch_nll(z, log_det), "(b h w) -> b h w", **shape))
        quad.append(rearrange(0.5 * z.pow(2).sum(-1), "(b h w) -> b h w", **shape))
    dim = patches.shape[-1]
    # Fastflow's map value, -exp(-0.5 * mean(z^2)): a saturating transform before the map's upsampling and blur
    nll_t, quad_t = torch.cat(nll), torch.cat(quad)
    return {"nll": nll_t, "quad": quad_t, "prob": -torch.exp(-quad_t / dim), "nll_prob": -torch.exp(-nll_t / dim)}


def position_calibrated(test: dict[str, torch.Tensor], train: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``KIND_pos`` for every kind: each grid position standardised by the training images' scores there (the
    model's ``score_calibration: position``, ``(s - mean) / std`` over the training images, per position)."""
    calibrated = {}
    for kind, scores in test.items():
        mean, std = train[kind].mean(0), train[kind].std(0).clamp_min(1e-6)
        calibrated[f"{kind}_pos"] = (scores - mean) / std
    return calibrated


def multiscale_scores(
    args: argparse.Namespace,
    layers: list[str],
    stage_feats: dict,
    settings: dict,
    seed: int,
    average_from: float | None = None,
    fine_grid: bool = False,
    base_feats: dict | None = None,
) -> tuple[dict[str, torch.Tensor], MoleFlowModel, list[float]]:
    """Fastflow's layout with MoLE-Flow's flow: one flow per backbone stage, on that stage's own grid and channels.

    Each stage's patch scores are standardised by its training patches' scores, upsampled to the finest grid and
    averaged (Fastflow averages its stages' maps too). Returns the scores, the finest stage's model (for the map)
    and the first stage's losses. ``fine_grid``: every stage's flow on the finest grid, its channels taken from the
    joint embedding (coarse stages upsampled bilinearly, as the joint flow sees them). ``base_feats``: each stage's
    shared base is trained on these (another product's) features first and frozen, as ``--continual`` does.
    """
    combined: dict[str, torch.Tensor] = {}
    finest: MoleFlowModel | None = None
    first_losses: list[float] = []
    for index, layer in enumerate(layers):
        channels = stage_feats["train"][0][index].shape[1]
        torch.manual_seed(seed)
        np.random.seed(seed)  # FrEIA draws each coupling block's channel permutation from numpy
        model = MoleFlowModel(
            backbone=args.backbone,
            layers=[layers[0] if fine_grid else layer],
            image_size=args.image_size,
            patch_size=1,
            embed_dim=channels - channels % 4,
            lora_rank=16,
            **{**ONE_FLOW, **settings},
        )
        model.anomaly_map_generator = type(model.anomaly_map_generator)(sigma=args.sigma)
        start = sum(stage.shape[1] for stage in stage_feats["train"][0][:index])

        def embedded(
            cached: list, model: MoleFlowModel = model, start: int = start, index: int = index, channels: int = channels
        ) -> torch.Tensor:
            with torch.no_grad():
                return torch.cat(
                    [
                        PatchEmbedding(start + channels)(stages[: index + 1])[..., start : start + model.embed_dim]
                        if fine_grid
                        else model.patch_embedding([stages[index]])
                        for stages in cached
                    ]
                )

        task = 0
        if base_feats is not None:
            model.add_task("base")
            base_p = embedded(base_feats["train"])
            _fit_whitening(model, 0, base_p)
            train_flow(
                model, base_p, args.epochs, args.lr, args.batch, seed, max_steps=args.steps, average_from=average_from
            )
            task = 1
        model.add_task("t")
        train_p, test_p = embedded(stage_feats["train"]), embedded(stage_feats["test"])
        _fit_whitening(model, task, train_p)
        losses = train_flow(
            model,
            train_p,
            args.epochs,
            args.lr,
            args.batch,
            seed,
            schedule=args.schedule,
            max_steps=args.steps,
            average_from=average_from,
            task=task,
        )
        first_losses = first_losses or losses
        finest = finest or model
        train_s, test_s = flow_scores(model, train_p, task), flow_scores(model, test_p, task)
        # per position (the model's calibration) per stage, or over all positions (each stage's map on one scale)
        standardised = position_calibrated(test_s, train_s)
        for kind, test in test_s.items():
            standardised[kind] = (test - train_s[kind].mean()) / train_s[kind].std()
        standardised["nll_prob_raw"] = test_s["nll_prob"]  # each stage's likelihood per dimension, as it is
        for kind, standard in standardised.items():
            upsampled = F.interpolate(standard[:, None], size=finest.grid, mode="bilinear", align_corners=False)[:, 0]
            combined[kind] = combined.get(kind, 0) + upsampled / len(layers)
    assert finest is not None
    return combined, finest, first_losses


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="demo", help="demo, elpv, real, or several, comma-separated")
    parser.add_argument("--root", type=Path, default=Path("./datasets"))
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", default="blocks.2,blocks.4")
    parser.add_argument("--image_size", type=int, default=160)
    parser.add_argument("--embed_dim", type=int, default=128)
    parser.add_argument("--variants", default="study,exact")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--baselines", action="store_true")
    parser.add_argument("--sigma", type=float, default=4.0)
    parser.add_argument("--sigmas", default="", help="Also score with these map blurs (comma-separated; NAME~sS).")
    parser.add_argument("--coreset", type=float, default=0.0, help="With --baselines: also anomalib's greedy coreset.")
    parser.add_argument("--categories", default="", help="Only these categories of the data (comma-separated).")
    parser.add_argument("--eval_epochs", default="", help="Also score after these epochs (or steps; VARIANT@N).")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument(
        "--continual",
        action="store_true",
        help="Score each category as a second task: the base trained on the previous category (cyclic), then frozen.",
    )
    parser.add_argument("--steps", type=int, default=None, help="Train this many optimizer steps, not --epochs.")
    parser.add_argument(
        "--ensemble",
        default="",
        help="Also score the sum of these variants' NLL (comma-separated; each standardised by its training patches).",
    )
    parser.add_argument(
        "--kinds",
        default="nll,quad",
        help="Patch scores to report: nll, quad, prob, nll_prob; KIND_pos: calibrated per position.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: the cores not busy; a fixed count gives the same figures to the digit).",
    )
    args = parser.parse_args()
    eval_epochs = {int(e) for e in args.eval_epochs.split(",") if e}
    kinds = set(args.kinds.split(","))
    sigmas = [args.sigma] + [float(v) for v in args.sigmas.split(",") if v]
    torch.set_num_threads(pick_threads(args.threads))
    layers = args.layers.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: dict[str, list[dict[str, float]]] = {}
    ensemble = [v for v in args.ensemble.split(",") if v]
    standardised: dict[tuple[str, int], torch.Tensor] = {}  # (variant, seed) -> the final test NLL, standardised

    def add(name: str, values: dict[str, float]) -> None:
        rows.setdefault(name, []).append(values)

    # the datamodules' shuffled train loaders set the order of the cached training patches, and with it every batch a
    # seed draws: without this a seed's figures changed from one process to the next
    torch.manual_seed(0)
    families = {c: dm for name in args.data.split(",") for c, dm in datasets(name, args.root).items()}
    if args.categories:
        families = {c: dm for c, dm in families.items() if c in args.categories.split(",")}
    base_feats: dict[str, dict] = {}
    if args.continual:
        extractor = MoleFlowModel(
            backbone=args.backbone, layers=layers, image_size=args.image_size, embed_dim=4, **ONE_FLOW
        )
        for category, datamodule in families.items():
            train = load_split(datamodule, args.image_size)["train"]
            with torch.no_grad():
                base_feats[category] = {
                    "train": [list(extractor.feature_extractor(x).values()) for x in train.split(32)]
                }
    for category, datamodule in families.items():
        split = load_split(datamodule, args.image_size)
        extractor = MoleFlowModel(
            backbone=args.backbone, layers=layers, image_size=args.image_size, embed_dim=4, **ONE_FLOW
        )
        # features of each stage at native resolution, for the patch embedding
        with torch.no_grad():
            stage_feats = {
                key: [list(extractor.feature_extractor(x).values()) for x in split[key].split(32)]
                for key in ("train", "test")
            }
        channels = sum(f.shape[1] for f in stage_feats["train"][0])
        print(f"{category}: train {tuple(split['train'].shape)} test {tuple(split['test'].shape)} channels {channels}")

        def patches_for(
            model: MoleFlowModel, key: str, cached: dict = stage_feats, upsample: str = "bilinear"
        ) -> torch.Tensor:
            """Patch embeddings; ``upsample="nearest"`` brings coarse stages to the finest grid as Padim does."""
            with torch.no_grad():
                if upsample == "bilinear":  # the model's own embedding
                    return torch.cat([model.patch_embedding(stages) for stages in cached[key]])
                return torch.cat(
                    [
                        model.patch_embedding([F.interpolate(s, stages[0].shape[-2:], mode=upsample) for s in stages])
                        for stages in cached[key]
                    ]
                )

        if args.baselines:
            base = MoleFlowModel(
                backbone=args.backbone,
                layers=layers,
                image_size=args.image_size,
                embed_dim=args.embed_dim,
                patch_size=3,  # the harness's reference is the study's 3x3 average (``+pool1`` removes it)
                pre_trained=True,
                **ONE_FLOW,
            )
            train_p, test_p = patches_for(base, "train"), patches_for(base, "test")
            print(
                f"  patch norm: train mean {train_p.norm(dim=-1).mean():.3f}, pos-emb norm "
                f"{base.pos_embedding.norm(dim=-1).mean():.3f}"
            )
            scorers = [("padim", padim_scores), ("patchcore", patchcore_scores)]
            if args.coreset:
                scorers.append(
                    (f"patchcore_coreset{args.coreset:g}", partial(patchcore_scores, coreset_ratio=args.coreset))
                )
            for name, fn in scorers:
                s = fn(train_p, test_p)
                for sigma in sigmas:
                    tag = name if sigma == sigmas[0] else f"{name}~s{sigma:g}"
                    add(f"{category}|{tag}", metrics(to_map(base, s, args.image_size, sigma), top_k(s, 1), split))
            base.patch_embedding = PatchEmbedding(args.embed_dim, patch_size=1)
            s = padim_scores(patches_for(base, "train"), patches_for(base, "test"))
            add(f"{category}|padim_pool1", metrics(to_map(base, s, args.image_size), top_k(s, 1), split))
        for variant in args.variants.split(","):
            base, _, modifier = variant.partition("+")
            spec = resolve(modifier)
            if base not in {"study", "exact"}:
                raise ValueError(f"Unknown base {base!r}: study or exact.")
            study = {"exact_likelihood": False, "whitening_norm": "patch"}  # the study's training and normalisation
            settings = {**({} if base == "exact" else study), **spec.get("settings", {})}
            for seed in seeds:
                if spec.get("multiscale"):
                    start = time.perf_counter()
                    scores, model, losses = multiscale_scores(
                        args,
                        layers,
                        stage_feats,
                        settings,
                        seed,
                        spec.get("average_from"),
                        spec.get("fine_grid", False),
                        base_feats[list(families)[list(families).index(category) - 1]] if args.continual else None,
                    )
                    for kind, s in scores.items():
                        add(f"{category}|{variant}:{kind}", metrics(to_map(model, s, args.image_size), top_k(s), split))
                    print(
                        f"  {variant} seed {seed}: loss {losses[0]:.1f} -> {losses[-1]:.1f} "
                        f"({time.perf_counter() - start:.0f} s) {rows[f'{category}|{variant}:nll'][-1]}"
                    )
                    continue
                torch.manual_seed(seed)
                np.random.seed(seed)  # FrEIA draws each coupling block's channel permutation from numpy
                dim = channels if spec.get("embed_dim") == "full" else args.embed_dim
                dim = dim - dim % 4
                with _subnet_width(spec.get("subnet_width", 1.0)):
                    model = MoleFlowModel(
                        backbone=args.backbone,
                        layers=layers,
                        image_size=args.image_size,
                        patch_size=3,
                        embed_dim=dim,
                        **{"lora_rank": args.lora_rank, **ONE_FLOW, **settings},
                    )
                model.anomaly_map_generator = type(model.anomaly_map_generator)(sigma=args.sigma)
                if "patch_size" in spec:
                    model.patch_embedding = PatchEmbedding(dim, patch_size=spec["patch_size"])
                upsample = spec.get("upsample", "bilinear")
                task = 0
                if args.continual:  # the shared base is trained on the previous category, then frozen
                    names = list(families)
                    base_category = names[names.index(category) - 1]
                    model.add_task("base")
                    base_p = patches_for(model, "train", cached=base_feats[base_category], upsample=upsample)
                    if "fit" in spec:
                        spec["fit"](model, base_p)
                    _fit_whitening(model, 0, base_p)
                    train_flow(
                        model,
                        base_p,
                        args.epochs,
                        args.lr,
                        args.batch,
                        seed,
                        max_steps=args.steps,
                        average_from=spec.get("average_from"),
                    )
                    task = 1
                model.add_task("t")
                train_p, test_p = (
                    patches_for(model, "train", upsample=upsample),
                    patches_for(model, "test", upsample=upsample),
                )
                if "patch" in spec:
                    spec["patch"](model)
                if "fit" in spec:
                    spec["fit"](model, train_p)
                if "patch_after" in spec:
                    spec["patch_after"](model)
                _fit_whitening(model, task, train_p)
                start = time.perf_counter()
                if spec.get("whiten_logdet"):
                    _count_whitening_log_det(model)

                def evaluate(
                    epoch: int,
                    task: int = task,
                    model: MoleFlowModel = model,
                    variant: str = variant,
                    test_p: torch.Tensor = test_p,
                    train_p: torch.Tensor = train_p,
                    category: str = category,
                    split: dict = split,
                    seed: int = seed,
                ) -> None:
                    final = args.steps or args.epochs
                    if epoch != final and epoch not in eval_epochs:
                        return
                    tag = variant if epoch == final else f"{variant}@{epoch}"
                    scores = flow_scores(model, test_p, task)
                    if any(kind.endswith("_pos") for kind in kinds):
                        scores |= position_calibrated(scores, flow_scores(model, train_p, task))
                    if epoch == final and variant in ensemble:
                        train_nll = flow_scores(model, train_p, task)["nll"]
                        standardised[variant, seed] = (scores["nll"] - train_nll.mean()) / train_nll.std()
                    for kind, s in scores.items():
                        if kind not in kinds:
                            continue
                        for sigma in sigmas:
                            anomaly_map = to_map(model, s, args.image_size, sigma)
                            result = metrics(anomaly_map, top_k(s), split)
                            blur = "" if sigma == sigmas[0] else f"~s{sigma:g}"
                            add(f"{category}|{tag}:{kind}{blur}", result)
                            if blur:
                                continue
                            # Image score = the blurred map's maximum (anomalib's Padim, Fastflow), not the top-k mean
                            peak = metrics(anomaly_map, anomaly_map.flatten(1).amax(1), {**split, "mask": None})
                            add(f"{category}|{tag}:{kind}+mapmax", {**result, **peak})

                losses = train_flow(
                    model,
                    train_p,
                    args.epochs,
                    spec.get("lr", args.lr),
                    args.batch,
                    seed,
                    spec.get("frozen", ""),
                    args.schedule,
                    on_epoch=None if args.steps else evaluate,
                    max_steps=args.steps,
                    on_step=evaluate if args.steps else None,
                    loss_fn=MoleFlowLoss(
                        tail_weight=spec.get("tail_weight", 0.7), tail_top_k_ratio=spec.get("tail_ratio", 0.02)
                    ),
                    task=task,
                    average_from=spec.get("average_from"),
                )
                print(
                    f"  {variant} seed {seed}: loss {losses[0]:.1f} -> {losses[-1]:.1f} "
                    f"({time.perf_counter() - start:.0f} s) {rows[f'{category}|{variant}:nll'][-1]}"
                )
        for seed in seeds if ensemble else []:
            s = sum(standardised[variant, seed] for variant in ensemble)
            result = metrics(to_map(model, s, args.image_size), top_k(s), split)
            add(f"{category}|ensemble({' & '.join(ensemble)}):nll", result)
            print(f"  ensemble seed {seed}: {result}")

    # mean over categories per method, mean ± spread over seeds
    methods = sorted({key.split("|")[1] for key in rows})
    columns = ["img_auroc", "img_ap", "pix_auroc", "pix_ap"]
    print(f"\n| method ({args.data}) | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    categories = sorted({key.split("|")[0] for key in rows})
    for method in methods:
        cells = []
        for column in columns:
            per_seed = []
            runs = [rows[f"{c}|{method}"] for c in categories if f"{c}|{method}" in rows]
            runs = [r for r in runs if column in r[0]]  # pixel metrics: the categories with masks
            if not runs:
                cells.append("-")
                continue
            for i in range(len(runs[0])):
                per_seed.append(np.mean([r[i][column] for r in runs]))
            spread = (max(per_seed) - min(per_seed)) / 2 if len(per_seed) > 1 else 0.0
            cells.append(f"{np.mean(per_seed):.1f} ± {spread:.1f}" if not math.isnan(np.mean(per_seed)) else "-")
        print(f"| {method} | " + " | ".join(cells) + " |")
    if len(categories) > 1:
        print(f"\n| method ({args.data}), per category: img_auroc / pix_ap | " + " | ".join(categories) + " |")
        print("|---" * (len(categories) + 1) + "|")
        for method in methods:
            cells = []
            for c in categories:
                runs = rows.get(f"{c}|{method}", [])
                auroc = np.mean([r["img_auroc"] for r in runs]) if runs else math.nan
                pix = np.mean([r.get("pix_ap", math.nan) for r in runs]) if runs else math.nan
                cells.append(f"{auroc:.1f} / {pix:.1f}")
            print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

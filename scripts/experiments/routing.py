"""Which image embedding routes look-alike products apart? (issue 20, step 4)

A research script, not a test: the backbone runs once per image; every candidate embedding then fits MoLE-Flow's
router (a Gaussian per task, ridge ``eps`` relative to the mean variance, Mahalanobis distance) on the training images
of every task and routes every test image. Prints the routing accuracy per task and candidate.

    python scripts/experiments/routing.py --data elpv,real
    python scripts/experiments/routing.py --data elpv_bench,real --flow_layout stage --root ./datasets --eps 0.3 \
        --rules pooled_lw --candidates max,quadrant_max,local_max_mean3   # docs/quality.md 0d, the embedding's regions
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_score import ONE_FLOW, datasets, load_split

from anomalib_moleflow.models.moleflow.components.router import image_embedding
from anomalib_moleflow.models.moleflow.torch_model import MoleFlowModel
from anomalib_moleflow.runtime import pick_threads


def _mean(p: torch.Tensor) -> torch.Tensor:
    return p.mean(dim=(1, 2))


def _mean_std(p: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.mean(dim=(1, 2)), p.std(dim=(1, 2))], dim=1)


def _mean_std_log(p: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.mean(dim=(1, 2)), p.std(dim=(1, 2)).clamp_min(1e-6).log()], dim=1)


def _grid2(p: torch.Tensor) -> torch.Tensor:
    """Means of the four quadrants, concatenated."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(p.permute(0, 3, 1, 2), 2)
    return pooled.flatten(1)


def _grid_max(cells: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Each channel's max over each of ``cells x cells`` regions, concatenated: the max embedding with the layout
    (where in the image each response is strongest) kept, for aligned products whose look differs by place."""
    return lambda p: torch.nn.functional.adaptive_max_pool2d(p.permute(0, 3, 1, 2), cells).flatten(1)


def _local_max_mean(cells: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Each channel's max over each of ``cells x cells`` regions, averaged over the regions: D numbers like the max,
    but a region's strongest response counts only for that region."""
    return lambda p: torch.nn.functional.adaptive_max_pool2d(p.permute(0, 3, 1, 2), cells).mean(dim=(2, 3))


def _quadrant_max(p: torch.Tensor) -> torch.Tensor:
    """The model's default embedding (``_local_max_mean(2)``)."""
    return image_embedding(p, "quadrant_max")


def _max(p: torch.Tensor) -> torch.Tensor:
    return torch.cat([p.mean(dim=(1, 2)), p.flatten(1, 2).amax(dim=1)], dim=1)


def _max_only(p: torch.Tensor) -> torch.Tensor:
    return p.flatten(1, 2).amax(dim=1)


def _quantile(q: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Each channel's ``q``-quantile over the grid: like the max, but a defect covering under ``1 - q`` of the image
    cannot set it."""
    return lambda p: p.flatten(1, 2).quantile(q, dim=1)


def _mean_std_max(p: torch.Tensor) -> torch.Tensor:
    return torch.cat([_mean_std(p), p.flatten(1, 2).amax(dim=1)], dim=1)


CANDIDATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max": _max_only,
    "mean+std+max": _mean_std_max,
    "mean": _mean,
    "mean+std": _mean_std,
    "mean+logstd": _mean_std_log,
    "quadrants": _grid2,
    "quadrant_max": _quadrant_max,
    "quadrant_max_concat": _grid_max(2),  # 4 D numbers
    "grid3_max_concat": _grid_max(3),  # 9 D numbers
    **{f"local_max_mean{k}": _local_max_mean(k) for k in (3, 4, 7)},
    # regional maxima at several scales averaged per scale, then over the scales (R-MAC's regions, Tolias et al. 2016)
    "regions12": lambda p: (_max_only(p) + _quadrant_max(p)) / 2,
    "regions123": lambda p: (_max_only(p) + _quadrant_max(p) + _local_max_mean(3)(p)) / 3,
    "regions23": lambda p: (_quadrant_max(p) + _local_max_mean(3)(p)) / 2,
    "mean+max": _max,
    "q0.9": _quantile(0.9),
    "q0.75": _quantile(0.75),
    "median": _quantile(0.5),
}


def patch_gaussian_routing(
    train: list[torch.Tensor], test: list[torch.Tensor], eps: float, reduce: str, pooled: bool = False
) -> list[float]:
    """Route by a Gaussian over each task's training *patches*: an image goes to the task whose patches' squared
    Mahalanobis distances have the smallest mean (or median, which defects on under half the image cannot move), or
    (``vote``) to the task nearest to most of its patches. ``pooled``: one covariance shared by the tasks (LDA)."""
    means, covariances = [], []
    for patches in train:
        x = patches.flatten(0, 2).double()
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / (len(x) - 1)
        cov += eps * cov.diagonal().mean() * torch.eye(len(mean), dtype=cov.dtype)
        means.append(mean)
        covariances.append(cov)
    if pooled:
        precisions = [torch.linalg.inv(sum(covariances) / len(covariances))] * len(covariances)
    else:
        precisions = [torch.linalg.inv(cov) for cov in covariances]
    accuracy = []
    for task, patches in enumerate(test):
        x = patches.flatten(1, 2).double()  # (b, n, d)
        distances = torch.stack(
            [torch.einsum("bnd,de,bne->bn", x - m, p, x - m) for m, p in zip(means, precisions, strict=True)], dim=2
        )  # (b, n, tasks)
        if reduce == "vote":
            votes = torch.nn.functional.one_hot(distances.argmin(2), len(means)).sum(1)
            routed = votes.argmax(1)
        else:
            routed = (distances.mean(1) if reduce == "mean" else distances.median(1).values).argmin(1)
        accuracy.append(float((routed == task).float().mean()))
    return accuracy


def gaussian_rules(
    train: list[torch.Tensor], test: list[torch.Tensor], labels: list[torch.Tensor], eps: float, rule: str
) -> tuple[list[float], list[float]]:
    """Routing accuracy (all test images; defective ones) of a Gaussian per task under a decision rule.

    ``distance``: nearest Mahalanobis distance (the router today); ``relative``: distance over the task's median
    held-out training distance; ``gaussian``: the full Gaussian log-likelihood (distance + log det of the
    covariance); ``pooled``: one covariance shared by all tasks (LDA), each task's own mean.
    """
    from anomalib_moleflow.models.moleflow.components.router import held_out_distances, ledoit_wolf

    stats = []
    for x in train:
        x = x.double()
        mean = x.mean(0)
        # Ledoit-Wolf: the shrinkage to a scaled identity chosen from the data.
        cov = ledoit_wolf(x) if rule.endswith("_lw") else (x - mean).T @ (x - mean) / (len(x) - 1)
        stats.append((mean, cov, x))
    pooled = sum(cov for _, cov, _ in stats) / len(stats)

    def ridge(cov: torch.Tensor) -> torch.Tensor:
        if rule.endswith("_lw"):
            return cov
        return cov + eps * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)

    if rule.startswith("knn"):
        # ``knnK_lw``: mean squared distance to the K nearest training images of each task, in the pooled metric.
        neighbours = int(rule[3:].split("_")[0])
        whiten = torch.linalg.cholesky(torch.linalg.inv(pooled))
        banks = [x @ whiten for _, _, x in stats]

        def score(x: torch.Tensor) -> torch.Tensor:
            nearest = [torch.cdist(x @ whiten, bank).square().topk(neighbours, largest=False) for bank in banks]
            return torch.stack([n.values.mean(1) for n in nearest], dim=1)

    else:
        scorers = []
        for mean, cov, x in stats:
            cov = ridge(pooled if rule.startswith("pooled") else cov)
            precision = torch.linalg.inv(cov)
            offset = torch.linalg.slogdet(cov)[1] if rule == "gaussian" else torch.tensor(0.0, dtype=torch.float64)
            scale = (
                held_out_distances(x, eps).median() if rule == "relative" else torch.tensor(1.0, dtype=torch.float64)
            )
            scorers.append((mean, precision, offset, scale))

        def score(x: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.einsum("nd,de,ne->n", x - m, p, x - m) / s + o for m, p, o, s in scorers], 1)

    accuracy, defects = [], []
    for task, (x, label) in enumerate(zip(test, labels, strict=True)):
        scores = score(x.double())
        right = scores.argmin(1) == task
        accuracy.append(float(right.float().mean()))
        defects.append(float(right[label == 1].float().mean()) if (label == 1).any() else float("nan"))
    return accuracy, defects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="elpv,real")
    parser.add_argument("--root", type=Path, default=Path("./datasets"))
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", default="blocks.2,blocks.4")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--embed_dim", type=int, default=152, help="D of the patch embedding the router sees.")
    parser.add_argument("--eps", default="0.01,0.1")
    parser.add_argument("--rules", default="distance,relative,gaussian,pooled")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument(
        "--flow_layout",
        default="joint",
        help="joint: stages blended bilinearly; stage: the model's "
        "default, each stage pooled to its own channels and upsampled by nearest neighbour.",
    )
    parser.add_argument("--patch_gauss", action="store_true", help="Also route by a Gaussian of each task's patches.")
    args = parser.parse_args()
    torch.set_num_threads(pick_threads())
    layers = args.layers.split(",")
    model = MoleFlowModel(  # only its feature extractor and patch embedding: the routers are the harness's own
        backbone=args.backbone,
        layers=layers,
        image_size=args.image_size,
        embed_dim=args.embed_dim,
        **{**ONE_FLOW, "flow_layout": args.flow_layout},
    )
    embedding = model.patch_embedding
    names, train, test, labels = [], [], [], []
    for name in args.data.split(","):
        for category, datamodule in datasets(name, args.root).items():
            split = load_split(datamodule, args.image_size)
            with torch.no_grad():
                patches = {
                    key: torch.cat([embedding(list(model.feature_extractor(x).values())) for x in split[key].split(32)])
                    for key in ("train", "test")
                }
            names.append(category)
            train.append(patches["train"])
            test.append(patches["test"])
            labels.append(split["label"])
            print(f"{category}: {len(patches['train'])} train, {len(patches['test'])} test", flush=True)
    print(f"\n| embedding, eps, rule | {' | '.join(names)} | mean | defective: {' | '.join(names)} |")
    for eps in (float(e) for e in args.eps.split(",")):
        for label, embed in ((k, v) for k, v in CANDIDATES.items() if k in args.candidates.split(",")):
            for rule in args.rules.split(","):
                accuracy, defect_accuracy = gaussian_rules(
                    [embed(p) for p in train], [embed(p) for p in test], labels, eps, rule
                )
                cells = " | ".join(f"{100 * a:.1f}" for a in accuracy)
                defects = " | ".join(f"{100 * a:.1f}" for a in defect_accuracy)
                mean = 100 * sum(accuracy) / len(accuracy)
                print(f"| {label}, {eps:g}, {rule} | {cells} | {mean:.2f} | {defects} |", flush=True)
    for eps in (float(e) for e in args.eps.split(",") if args.patch_gauss):
        for pooled in (False, True):
            for reduce in ("mean", "median", "vote"):
                accuracy = patch_gaussian_routing(train, test, eps, reduce, pooled)
                label = f"patch-gauss {reduce}{', pooled' if pooled else ''}"
                cells = " | ".join(f"{100 * a:.1f}" for a in accuracy)
                print(f"| {label}, {eps:g} | {cells} | {100 * sum(accuracy) / len(accuracy):.2f} |", flush=True)
    print("|---" * (len(names) + 2) + "|")


if __name__ == "__main__":
    main()

"""Each stage's likelihood map calibrated by the task's training images, several ways (issue 20; docs/quality.md 0l).

A research script, not a test. Section 0k's harness found each stage's likelihood standardised per position raising
BSData's pixel AP and lowering MPDD's. This loads a trained continual checkpoint with one flow per stage, scores every
product with its own expert (training and test images), and reports, per product, the image AUROC of three image
scores (top 3 of the stages' mean patch score: the calibrated NLL, the model's; the NLL standardised per position;
the smaller of its overall and per-position standard scores) and, on the products with masks, pixel AUROC / AP of
the raw blurred map of each stage's map value ``v = -exp(-NLL / D)`` made one of these ways (``mu``, ``sigma`` over
all positions of the training images; ``mu_p``, ``sigma_p`` at one position):

- ``likelihood``: ``v`` (the model's ``anomaly_map_value: likelihood``); ``global``: ``(v - mu) / sigma``;
- ``position``: ``z_p = (v - mu_p) / sigma_p``; ``position_eb``: each ``sigma_p^2`` shrunk towards their mean by the
  empirical-Bayes weight (the share of their spread that the sampling noise ``2 s^4 / (n - 1)`` explains);
  ``position_3x3``, ``position_5x5``: ``mu_p``, ``sigma_p`` over each position's neighbourhood;
- ``scale_only``: ``(v - mu) / sigma_p``; ``sum``: ``z + z_p``; ``min``: ``min(z, z_p)``;
- ``calibrated_likelihood``: ``min(v, mu + sigma * z_p)``, the model's ``anomaly_map_value: calibrated_likelihood``;
  ``calibrated_likelihood_eb``: the same with ``mu_p`` and ``sigma_p`` shrunk towards ``mu`` and ``sigma`` by their
  empirical-Bayes weights; ``calibrated_likelihood_3x3``, ``calibrated_likelihood_5x5``: with ``mu_p`` and
  ``sigma_p`` over each position's neighbourhood;
- ``score``: each stage's calibrated NLL (``anomaly_map_value: score``).

``--temperatures 0.5,2`` adds ``likelihood_tT`` and ``calibrated_likelihood_tT``: the likelihood taken as
``-exp(-NLL / (T D))`` (``T = 1`` is the model's; a smaller ``T`` caps extreme NLLs harder, a larger one is closer to
the NLL itself). ``--combine`` also takes ``views_min`` (the smaller of a stage's flows where it has several views,
then the stages' mean), ``wF`` (the first stage weighted ``F``), ``centred`` (each test image's median removed from
its map) and ``image_z`` (and divided by its spread); ``--maps`` keeps only the named map values. ``--flip`` adds
the (capped) likelihood of each test image's mirror image, mirrored back, alone and averaged with the image's own
(``+mirrored``, ``+with_mirror``: test-time augmentation; the mirror's statistics from the mirrored training
images).

Each row also gives, per stage, the empirical-Bayes weight and the split-half reliability of the ``sigma_p`` map.

    python scripts/experiments/map_calibration.py --checkpoint results/quality/seed_0/rows/moleflow/model.ckpt \
        --root ./datasets --data real,elpv_bench
    python scripts/experiments/map_calibration.py --checkpoint results/quality/seed_0/rows/moleflow/model.ckpt \
        --root ./datasets --combine mean,max,min   # the stages' maps averaged (the model's), or their max or min
    python scripts/experiments/map_calibration.py --checkpoint results/demo/model.ckpt --data demo_run \
        --root ./datasets/moleflow_demo --image_size 160     # the offline demo's four generated tasks
    python scripts/experiments/map_calibration.py --task metal_surfaces --root ./datasets \
        --checkpoint results/product_line_masked/seed_0/rows/moleflow/model.ckpt  # both through the one task
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patch_score import checkpoint_parser, datasets, load_checkpoint, load_split, metrics, to_map, top_k

from anomalib_moleflow.models.moleflow.anomaly_map import likelihood_map_value, position_capped


def stage_values(model: object, images: torch.Tensor, task: int) -> list[dict[str, torch.Tensor]]:
    """Per path: NLL, likelihood value and calibrated score ``(b, h_p, w_p)`` of ``images`` under ``task``."""
    out: list[dict[str, list[torch.Tensor]]] = [{"nll": [], "score": []} for _ in model.paths]
    with torch.no_grad():
        for batch in images.split(32):
            patches, _ = model.embed(batch)
            for index, path in enumerate(model.paths):
                z, log_det = model.encode(patches, task, index)
                nll = rearrange(model.patch_nll(z, log_det), "(b h w) -> b h w", b=batch.shape[0], h=path.grid[0])
                out[index]["nll"].append(nll)
                out[index]["score"].append(model.calibrate(nll, task, index))
    result = []
    for index, path in enumerate(model.paths):
        nll = torch.cat(out[index]["nll"])
        result.append(
            {"nll": nll, "score": torch.cat(out[index]["score"]), "likelihood": likelihood_map_value(nll, path.dim)}
        )
    return result


def shrunk_variance(values: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Each position's variance over ``values`` ``(n, h, w)``, shrunk towards the mean variance; and the weight."""
    n = values.shape[0]
    var = values.var(0)
    noise = (2 * var.pow(2) / (n - 1)).mean()  # sampling variance of a Gaussian sample variance
    spread = var.var()
    weight = float((noise / spread.clamp_min(1e-12)).clamp(0, 1))
    return (1 - weight) * var + weight * var.mean(), weight


def shrunk_statistics(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's mean and std over ``values`` ``(n, h, w)``, both shrunk towards their value over all positions
    by the empirical-Bayes weight of their own sampling noise (``s^2 / n`` for a mean, ``2 s^4 / (n - 1)`` for a
    variance) against their spread over the positions."""
    n = values.shape[0]
    mean, var = values.mean(0), values.var(0)
    mean_weight = float(((var / n).mean() / mean.var().clamp_min(1e-12)).clamp(0, 1))
    shrunk_var, _ = shrunk_variance(values)
    return (1 - mean_weight) * mean + mean_weight * values.mean(), shrunk_var.sqrt().clamp_min(1e-8)


def demo_run(root: Path) -> dict[str, object]:
    """The offline demo's four generated tasks (``configs/continual/demo.yaml``; run it with ``--image_size 160``)."""
    from anomalib_moleflow.data import SyntheticMVTecAD

    return {
        c: SyntheticMVTecAD(
            root=root, category=c, image_size=128, n_train=40, n_test_good=10, n_test_defect=6, num_workers=0
        )
        for c in ("woven", "wood", "pill", "screw")
    }


def pooled_stats(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std ``(h, w)`` over the training images and each position's ``k x k`` neighbourhood."""
    first = F.avg_pool2d(F.pad(values[:, None], [k // 2] * 4, mode="replicate"), k, stride=1)[:, 0].mean(0)
    second = F.avg_pool2d(F.pad(values[:, None].pow(2), [k // 2] * 4, mode="replicate"), k, stride=1)[:, 0].mean(0)
    return first, (second - first.pow(2)).clamp_min(1e-16).sqrt()


def split_half_reliability(values: torch.Tensor) -> float:
    """Spearman-Brown reliability of the per-position std map ``(h, w)`` of ``values`` ``(n, h, w)``: the correlation
    of two random halves' maps, stepped up to the full count."""
    order = torch.randperm(values.shape[0], generator=torch.Generator().manual_seed(0))
    half = values.shape[0] // 2
    first, second = values[order[:half]].std(0).flatten(), values[order[half:]].std(0).flatten()
    r = float(torch.corrcoef(torch.stack([first, second]))[0, 1])
    return 2 * r / (1 + r)


def capped_likelihood(fit_nll: torch.Tensor, nll: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The likelihood ``-exp(-NLL / scale)`` of ``nll`` and the same capped by its positional standard score, with
    statistics from ``fit_nll`` (``scale = D`` is the model's ``calibrated_likelihood``)."""
    fit, value = likelihood_map_value(fit_nll, scale), likelihood_map_value(nll, scale)
    return value, position_capped(value, fit.mean(0), fit.std(0).clamp_min(1e-8), fit.mean(), fit.std())


def combined(stacked: torch.Tensor, how: str, path_stages: list[int]) -> torch.Tensor:
    """The paths' maps ``(s, b, h, w)`` made one ``(b, h, w)``: ``mean`` (the model's), ``max``, ``min``;
    ``views_min`` (the smaller of each stage's flows, where a stage has several views, then the stages' mean);
    ``w0.67`` (the first stage weighted 0.67, the rest share the remainder); ``centred`` (the mean minus each image's
    median: each test image's offset removed); ``image_z`` (the same divided by each image's spread)."""
    if how in ("mean", "views_min"):  # each stage's flows' mean (or min), then the stages' mean: the model's
        stages = [[i for i, s in enumerate(path_stages) if s == stage] for stage in sorted(set(path_stages))]
        reduce = torch.mean if how == "mean" else torch.amin
        return torch.stack([reduce(stacked[paths], 0) for paths in stages]).mean(0)
    if how in ("max", "min"):
        return {"max": torch.amax, "min": torch.amin}[how](stacked, 0)
    if how.startswith("w"):  # one flow per stage
        first = float(how[1:])
        rest = (1 - first) / (stacked.shape[0] - 1)
        return first * stacked[0] + rest * stacked[1:].sum(0)
    mean = combined(stacked, "mean", path_stages)
    median = mean.flatten(1).median(1).values[:, None, None]
    if how == "centred":
        return mean - median
    if how == "image_z":
        return (mean - median) / mean.flatten(1).std(1)[:, None, None].clamp_min(1e-8)
    raise ValueError(f"--combine: unknown {how!r}; use mean, max, min, views_min, wF, centred or image_z")


def main() -> None:
    parser = checkpoint_parser(__doc__.splitlines()[0], data="real")
    parser.add_argument("--sigmas", default="4")
    parser.add_argument(
        "--task", default=None, help="score every product with this task's expert (a product line); default: its own"
    )
    parser.add_argument(
        "--combine",
        default="mean",
        help="how the stages' maps make one: mean (the model's), max, min, views_min, wF, centred, image_z; or a list",
    )
    parser.add_argument(
        "--flip", action="store_true", help="also each test image's map from its mirror image, and the two averaged"
    )
    parser.add_argument("--maps", default=None, help="only these map values (a comma list); default: every one")
    parser.add_argument(
        "--temperatures", default="", help="also the likelihood -exp(-NLL / (t D)) and its capped map for each t"
    )
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint).model
    on_grid = model._on_grid  # a stage's values on the finest grid, as the model upsamples them for its map
    temperatures = [float(t) for t in args.temperatures.split(",") if t]
    sigmas = [float(s) for s in args.sigmas.split(",")]
    print(
        "| product | map | blur sigma | img AUROC | pix AUROC | pix AP | EB weight, split-half reliability per stage |"
    )
    print("|---|---|---|---|---|---|---|")
    products = {
        name: dm
        for family in args.data.split(",")
        for name, dm in (demo_run(args.root) if family == "demo_run" else datasets(family, args.root)).items()
    }
    for name, datamodule in products.items():
        task = model.task_names.index(args.task or name)
        torch.manual_seed(0)  # anomalib's training loader shuffles: the split-half reliability's halves fixed
        split = load_split(datamodule, args.image_size)
        train, test = stage_values(model, split["train"], task), stage_values(model, split["test"], task)
        maps: dict[str, list[torch.Tensor]] = defaultdict(list)
        image_scores: dict[str, list[torch.Tensor]] = defaultdict(list)
        notes = []
        for path, tr, te in zip(model.paths, train, test, strict=True):
            nll_fit = tr["nll"]
            nll_z = (te["nll"] - nll_fit.mean()) / nll_fit.std()
            nll_zp = (te["nll"] - nll_fit.mean(0)) / nll_fit.std(0).clamp_min(1e-8)
            for key, stage_score in {
                "score": te["score"],
                "nll_zp": nll_zp,
                "min": torch.minimum(nll_z, nll_zp),
            }.items():
                image_scores[key].append(on_grid(stage_score))
            fit, value = tr["likelihood"], te["likelihood"]
            mean, std = fit.mean(0), fit.std(0).clamp_min(1e-8)
            var_eb, weight = shrunk_variance(fit)
            mean_eb, std_eb = shrunk_statistics(fit)
            neighbourhoods = {k: pooled_stats(fit, k) for k in (3, 5)}  # mu_p, sigma_p over k x k positions
            notes.append(f"{weight:.2f}, {split_half_reliability(fit):.2f}")
            global_z, position_z = (value - fit.mean()) / fit.std(), (value - mean) / std
            for key, stage_map in {
                "likelihood": value,
                "global": global_z,
                "position": position_z,
                "position_eb": (value - mean) / var_eb.sqrt().clamp_min(1e-8),
                **{f"position_{k}x{k}": (value - m) / s for k, (m, s) in neighbourhoods.items()},
                "scale_only": (value - fit.mean()) / std,
                "sum": global_z + position_z,
                "min": torch.minimum(global_z, position_z),
                # the same on the stage's own scale (the stages weigh in as in the plain likelihood): the model's
                "calibrated_likelihood": position_capped(value, mean, std, fit.mean(), fit.std()),
                "calibrated_likelihood_eb": position_capped(value, mean_eb, std_eb, fit.mean(), fit.std()),
                **{
                    f"calibrated_likelihood_{k}x{k}": position_capped(value, m, s, fit.mean(), fit.std())
                    for k, (m, s) in neighbourhoods.items()
                },
                "score": te["score"],
                **{
                    f"{kind}_t{t:g}": variant
                    for t in temperatures
                    for kind, variant in zip(
                        ("likelihood", "calibrated_likelihood"),
                        capped_likelihood(tr["nll"], te["nll"], t * path.dim),
                        strict=True,
                    )
                },
            }.items():
                maps[key].append(on_grid(stage_map))
        if args.flip:  # each image also mirrored, scored with statistics of the mirrored training images
            flipped = zip(
                model.paths,
                stage_values(model, split["train"].flip(-1), task),
                stage_values(model, split["test"].flip(-1), task),
                strict=True,
            )
            for index, (path, tr, te) in enumerate(flipped):
                for kind, value in zip(
                    ("likelihood", "calibrated_likelihood"),
                    capped_likelihood(tr["nll"], te["nll"], path.dim),
                    strict=True,
                ):
                    mirrored = on_grid(value.flip(-1))
                    maps[f"{kind}+mirrored"].append(mirrored)
                    maps[f"{kind}+with_mirror"].append((maps[kind][index] + mirrored) / 2)
        stages = list(model.path_stages)
        image_score = top_k(combined(torch.stack(image_scores["score"]), "mean", stages))
        for key, values in image_scores.items():  # the image score: top 3 of the stages' mean patch score
            result = metrics(
                torch.zeros(0), top_k(combined(torch.stack(values), "mean", stages)), {**split, "mask": None}
            )
            print(f"| {name} | image score: {key} | | {result['img_auroc']:.2f} | | | |", flush=True)
        if "mask" not in split:
            continue
        for key, values in maps.items():
            if args.maps and key.split("+")[0] not in args.maps.split(","):
                continue
            stacked = torch.stack(values)
            for combine in args.combine.split(","):
                value = combined(stacked, combine, stages)
                label = key if combine == "mean" else f"{key}, stages' {combine}"
                for sigma in sigmas:
                    result = metrics(to_map(model, value, args.image_size, sigma), image_score, split)
                    pixel = f"{result.get('pix_auroc', float('nan')):.2f} | {result.get('pix_ap', float('nan')):.2f}"
                    print(
                        f"| {name} | {label} | {sigma:g} | {result['img_auroc']:.2f} | {pixel} | {' / '.join(notes)} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()

"""``run_benchmark``: every row on the same tasks, each row's failure contained, one report at the end."""

from __future__ import annotations

import gc
import json
import logging
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.models.components import AnomalibModule
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import seed_everything

from anomalib_moleflow.baselines import TimmFastflow, TimmPadim, TimmPatchcore
from anomalib_moleflow.data import Task, build_tasks, check_datamodule
from anomalib_moleflow.engine import FinetuneStrategy, JointStrategy, SeparateStrategy, Strategy
from anomalib_moleflow.engine.options import check_devices
from anomalib_moleflow.engine.runner import moleflow_strategy, run_continual
from anomalib_moleflow.io import atomic_write_text, claim_output_dir
from anomalib_moleflow.metrics import METRICS
from anomalib_moleflow.reports import COLUMNS, seeds_markdown, summarize, summarize_seeds, write_report
from anomalib_moleflow.runtime import torch_threads

from .config import SHARED_KEYS, RowSpec, benchmark_parser, parse_rows
from .measure import PeakMemory, inference_ms_per_image, release_large_frees, resolve_device, sample_images
from .outputs import BENCHMARK_OUTPUTS

logger = logging.getLogger(__name__)


def _as_dict(value: Any) -> dict[str, Any]:
    return value.as_dict() if isinstance(value, Namespace) else dict(value or {})


def row_settings(config: Namespace, row: RowSpec) -> dict[str, Any]:
    """The row's model arguments: shared settings, its model's section, then overrides (model, row, labelled row)."""
    settings = {key: config[key] for key in SHARED_KEYS}
    settings.update(_as_dict(config[row.model]))
    for key in (row.model, row.base, row.name):
        settings.update(config.overrides.get(key, {}) if key in config.overrides else {})
    settings["layers"] = tuple(settings["layers"])
    return settings


def router_settings(config: Namespace) -> dict[str, Any]:
    """MoLE-Flow's router settings (backbone, stages, embedding, ridge), for the ``separate`` rows."""
    moleflow = row_settings(config, RowSpec.parse("moleflow"))
    return {
        "backbone": moleflow["backbone"],
        "layers": moleflow["layers"],
        "pre_trained": moleflow["pre_trained"],
        "embed_dim": moleflow["embed_dim"],
        "patch_size": moleflow["patch_size"],
        "eps": moleflow["router_eps"],
        "embedding": moleflow["router_embedding"],
        "covariance": moleflow["router_covariance"],
    }


def make_strategy(config: Namespace, row: RowSpec, tasks: list[Task], device: torch.device) -> Strategy:
    """The row's strategy: MoLE-Flow from the row's continual config (as any continual run builds it), or an anomalib
    baseline in its regime."""
    settings = row_settings(config, row)
    if row.model == "moleflow":
        return moleflow_strategy(row_config(config, row, Path(config.output) / "rows" / row.folder))
    cls = {"fastflow": TimmFastflow, "patchcore": TimmPatchcore, "padim": TimmPadim}[row.model]

    def make() -> AnomalibModule:
        return cls(**settings, visualizer=False)

    if row.regime == "finetune":
        return FinetuneStrategy(make, row.model)
    if row.regime == "separate":
        return SeparateStrategy(make, row.model, router_settings(config), device)
    return JointStrategy(make, row.model, tasks)


def row_config(config: Namespace, row: RowSpec, folder: Path) -> dict[str, Any]:
    """The row's continual config (the keys of ``moleflow continual``): its folder, the benchmark's seed and device
    settings, the torch threads already chosen for the whole benchmark, and MoLE-Flow's settings for its rows."""
    continual = {
        "output": str(folder),
        "seed": config.seed,
        "resume": config.resume,
        "accelerator": config.accelerator,
        "devices": config.devices,
        "strategy": config.strategy,
        "precision": config.precision,
        "progress_bar": config.progress_bar,
        "overlays_per_task": 0,
        "threads": torch.get_num_threads(),
        "routing": "router",
    }
    if row.model == "moleflow":
        settings = row_settings(config, row)
        continual["model"] = {**settings, "layers": list(settings["layers"])}
    return continual


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _record(row: RowSpec, results: dict[str, Any]) -> dict[str, Any]:
    """The table row (and its details) from a row's continual results.

    Raises:
        FloatingPointError: If image AUROC is undefined on a task (non-finite scores).
    """
    tasks = results["tasks"]
    summary = summarize(tasks, results["matrix"], results["routing_matrix"])
    undefined = [name for name in tasks if summary["per_task_final"][name]["image_AUROC"] is None]
    if undefined:
        msg = f"Image AUROC is undefined on {undefined}: the scores are not finite (diverged model?)."
        raise FloatingPointError(msg)
    final = summary["final"]
    per_task = results["params"]["per_task"]
    return {
        "row": row.name,
        "model": row.model,
        "regime": row.regime,
        "status": "ok",
        "reason": None,
        **{metric: final[metric] for metric in METRICS},
        "forgetting": summary["forgetting"]["image_AUROC"],
        "routing_accuracy": summary["routing_accuracy"]["overall"],
        "params_per_task": _mean([float(t["params"]) for t in per_task]),
        "bytes_per_task": _mean([float(t["bytes"]) for t in per_task]),
        "train_time_s": sum(results["timing"]["fit_s"].values()),
        "details": {
            "matrix": results["matrix"],
            "routing_matrix": results["routing_matrix"],
            "per_task_final": summary["per_task_final"],
            "forgetting": summary["forgetting"],
            "bwt": summary["bwt"],
            "routing_accuracy": summary["routing_accuracy"],
            "per_task": per_task,
            "fit_s": results["timing"]["fit_s"],
            "params": results["params"],
        },
    }


def _failed(row: RowSpec, reason: str) -> dict[str, Any]:
    record: dict[str, Any] = dict.fromkeys(COLUMNS)
    record.update({"row": row.name, "model": row.model, "regime": row.regime, "status": "failed", "reason": reason})
    return record


def run_benchmark(config: Mapping[str, Any] | Namespace) -> dict[str, Any]:
    """Run every row of ``config`` on the same tasks and write the table and the plot.

    Args:
        config: The parsed ``moleflow benchmark`` namespace, or a dictionary with the YAML keys (validated and
            completed with the defaults by the same parser).

    Returns:
        The report also written to ``OUTPUT/benchmark.json``: ``rows`` (one dictionary per row, columns as in
        :data:`~anomalib_moleflow.reports.COLUMNS` plus ``details``), ``tasks`` and the resolved config.

    Raises:
        ValueError: If the config has no tasks, names unknown rows or gives a MoLE-Flow row settings its model
            refuses (checked before any row runs).
        anomalib_moleflow.data.DatasetError: If a dataset is missing (before any row runs).
        FileExistsError: If the output folder holds an earlier benchmark and neither ``resume`` nor ``overwrite``
            is set.
    """
    parser = benchmark_parser()
    if not isinstance(config, Namespace):
        config = parser.parse_object(dict(config))
    if config.tasks is None:
        msg = "No tasks: give a `tasks:` section (see configs/benchmark/)."
        raise ValueError(msg)
    # Rank 0 alone would have to write the benchmark's tables, and its baseline rows cannot combine ranks: a benchmark
    # row is one device (several MoLE-Flow devices: `moleflow continual --strategy ddp`).
    check_devices(config.devices, config.strategy, baseline=True)
    rows = parse_rows(list(config.rows), dict(config.overrides))
    tasks: list[Task] = build_tasks(config.tasks)
    for task in tasks:
        for member in task.members:
            check_datamodule(member)
    for row in rows:  # MoLE-Flow's own refusals (e.g. a whitening_norm for other layers) before hours of other rows
        if row.model == "moleflow":
            make_strategy(config, row, tasks, torch.device("cpu"))
    # Last of the checks, so that a config or dataset error never costs an earlier benchmark's outputs.
    claim_output_dir(config.output, BENCHMARK_OUTPUTS, config.resume, config.overwrite)
    release_large_frees()
    with torch_threads(config.threads):
        if not config.seeds:
            return _run_rows(config, parser, rows, tasks)
        return _run_seeds(config, parser, rows, tasks)


def _run_seeds(config: Namespace, parser: ArgumentParser, rows: list[RowSpec], tasks: list[Task]) -> dict[str, Any]:
    """The whole table once per seed (``OUTPUT/seed_N``), then the mean ± half-range table (``OUTPUT/seeds.md``)."""
    output = Path(config.output)
    if len(set(config.seeds)) != len(config.seeds):
        msg = f"seeds must be distinct, got {config.seeds}."
        raise ValueError(msg)
    reports = {}
    for seed in config.seeds:
        single = config.clone()
        single.seed, single.seeds, single.output = seed, None, str(output / f"seed_{seed}")
        reports[seed] = _run_rows(single, parser, rows, tasks)
    summary = summarize_seeds(reports)
    tasks = reports[config.seeds[0]]["tasks"]
    report = {**summary, "tasks": tasks, "config": _config_json(parser, config)}
    atomic_write_text(output / "seeds.json", _dumps(report))
    atomic_write_text(output / "seeds.md", seeds_markdown(summary, tasks))
    return report


def _run_rows(config: Namespace, parser: ArgumentParser, rows: list[RowSpec], tasks: list[Task]) -> dict[str, Any]:
    """Run every row on the (checked) tasks, each failure contained; write the report after each row."""
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    names = [task.name for task in tasks]
    for task in tasks:
        task.datamodule.prepare_data()
        task.datamodule.setup()
    device = resolve_device(config.accelerator)
    images = sample_images([t.datamodule for t in tasks], config.image_size, config.timing_images)
    tasks_with_masks = [t.name for t in tasks if t.datamodule.test_data.task.value == "segmentation"]
    report: dict[str, Any] = {
        "tasks": names,
        "tasks_with_masks": tasks_with_masks,
        "backbone": config.backbone,
        "layers": list(config.layers),
        "image_size": config.image_size,
        "device": str(device),
        "memory_kind": PeakMemory(device).kind,
        "columns": COLUMNS,
        "rows": [],
        "config": _config_json(parser, config),
    }
    for index, row in enumerate(rows):
        folder = output / "rows" / row.folder
        (folder / "error.txt").unlink(missing_ok=True)  # from an earlier run into the same folder
        start = time.perf_counter()
        strategy: Strategy | None = None
        meter = PeakMemory(device)
        try:
            with meter:
                seed_everything(config.seed, verbose=False)  # initial weights depend on the seed, not on earlier rows
                strategy = make_strategy(config, row, tasks, device)
                row_run = row_config(config, row, folder)
                results = run_continual(
                    row_run, strategy=strategy, tasks=tasks, record={"benchmark": {"row": row.name}}
                )
                record = _record(row, results)
                batch = int(getattr(tasks[0].datamodule, "eval_batch_size", 16))
                record["inference_ms_per_image"] = inference_ms_per_image(
                    strategy.final_module(), images, batch, device
                )
            record["peak_memory_mb"] = meter.peak_mib
            record["memory_kind"] = meter.kind
        except Exception as error:
            reason = f"{type(error).__name__}: {error}".strip()
            record = _failed(row, reason.splitlines()[0][:300])
            record["peak_memory_mb"], record["memory_kind"] = meter.peak_mib, meter.kind
            atomic_write_text(folder / "error.txt", traceback.format_exc())
            logger.warning("Row %s failed: %s", row.name, reason)
        finally:
            del strategy
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        atomic_write_text(folder / "row.json", _dumps(record))
        report["rows"].append(record)
        write_report(report, output)  # partial tables survive an interruption
        status = "ok" if record["status"] == "ok" else f"FAILED ({record['reason']})"
        quality = "" if record["image_AUROC"] is None else f", img AUROC {100 * record['image_AUROC']:.2f}"
        seconds = time.perf_counter() - start
        logger.info("[row %d/%d] %s: %s in %.0fs%s", index + 1, len(rows), row.name, status, seconds, quality)
    return report


def _config_json(parser: ArgumentParser, config: Namespace) -> dict[str, Any]:
    """The resolved config as plain JSON data (recorded in every report)."""
    return json.loads(parser.dump(config, skip_none=False, format="json"))


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)

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
from jsonargparse import ArgumentParser, Namespace

from anomalib_moleflow.continual import METRICS, Task, summarize
from anomalib_moleflow.continual.results import atomic_write_text
from anomalib_moleflow.data import check_datamodule

from .config import SHARED_KEYS, RowSpec, benchmark_parser, parse_rows
from .data import build_task_list, joint_datamodule
from .measure import PeakMemory, inference_ms_per_image, release_large_frees, resolve_device, sample_images
from .report import COLUMNS, write_report
from .rows import (
    RowContext,
    RowOutcome,
    model_factory,
    run_finetune,
    run_joint,
    run_moleflow,
    run_separate,
    task_names,
)

logger = logging.getLogger(__name__)


def _members(datamodule: Any) -> list[Any]:
    return list(getattr(datamodule, "members", [datamodule]))


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
    """MoLE-Flow's router settings (backbone, stages, embedding size, ridge), for the ``separate`` rows."""
    moleflow = row_settings(config, RowSpec.parse("moleflow"))
    return {
        "backbone": moleflow["backbone"],
        "layers": moleflow["layers"],
        "pre_trained": moleflow["pre_trained"],
        "embed_dim": moleflow["embed_dim"],
        "eps": moleflow["router_eps"],
    }


def _run_row(config: Namespace, row: RowSpec, ctx: RowContext, joint: Any) -> RowOutcome:
    settings = row_settings(config, row)
    if row.model == "moleflow":
        return run_moleflow(ctx, settings)
    make = model_factory(row, settings)
    if row.regime == "finetune":
        return run_finetune(ctx, make)
    if row.regime == "separate":
        return run_separate(ctx, make, router_settings(config))
    return run_joint(ctx, make, joint)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _record(row: RowSpec, outcome: RowOutcome, tasks: list[str]) -> dict[str, Any]:
    """The table row (and its details) from a row's outcome.

    Raises:
        FloatingPointError: If image AUROC is undefined on a task (non-finite scores).
    """
    summary = summarize(tasks, outcome.matrix, outcome.routing)
    undefined = [name for name in tasks if summary["per_task_final"][name]["image_AUROC"] is None]
    if undefined:
        msg = f"Image AUROC is undefined on {undefined}: the scores are not finite (diverged model?)."
        raise FloatingPointError(msg)
    final = summary["final"]
    return {
        "row": row.name,
        "model": row.model,
        "regime": row.regime,
        "status": "ok",
        "reason": None,
        **{metric: final[metric] for metric in METRICS},
        "forgetting": summary["forgetting"]["image_AUROC"],
        "routing_accuracy": summary["routing_accuracy"]["overall"],
        "params_per_task": _mean([float(t["params"]) for t in outcome.per_task]),
        "bytes_per_task": _mean([float(t["bytes"]) for t in outcome.per_task]),
        "train_time_s": sum(outcome.fit_s.values()),
        "details": {
            "matrix": outcome.matrix,
            "routing_matrix": outcome.routing,
            "per_task_final": summary["per_task_final"],
            "forgetting": summary["forgetting"],
            "bwt": summary["bwt"],
            "routing_accuracy": summary["routing_accuracy"],
            "per_task": outcome.per_task,
            "fit_s": outcome.fit_s,
            **outcome.notes,
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
        :data:`~anomalib_moleflow.benchmark.report.COLUMNS` plus ``details``), ``tasks`` and the resolved config.

    Raises:
        ValueError: If the config has no tasks or names unknown rows.
        anomalib_moleflow.data.DatasetError: If a dataset is missing (before any row runs).
    """
    parser = benchmark_parser()
    if not isinstance(config, Namespace):
        config = parser.parse_object(dict(config))
    if config.tasks is None:
        msg = "No tasks: give a `tasks:` section (see configs/benchmark/)."
        raise ValueError(msg)
    rows = parse_rows(list(config.rows), dict(config.overrides))
    release_large_frees()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run_rows(config, parser, rows)
    finally:
        torch.set_num_threads(threads)


def _run_rows(config: Namespace, parser: ArgumentParser, rows: list[RowSpec]) -> dict[str, Any]:
    """Build the tasks, run every row (each failure contained), write the report after each row."""
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    tasks: list[Task] = build_task_list(config.tasks)
    names = task_names(tasks)
    for task in tasks:
        for member in _members(task.datamodule):
            check_datamodule(member)
    for task in tasks:
        task.datamodule.prepare_data()
        task.datamodule.setup()
    device = resolve_device(config.accelerator)
    images = sample_images([t.datamodule for t in tasks], config.image_size, config.timing_images)
    tasks_with_masks = [t.name for t in tasks if t.datamodule.test_data.task.value == "segmentation"]
    joint = joint_datamodule(tasks) if any(row.regime == "joint" for row in rows) else None
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
        "config": json.loads(parser.dump(config, skip_none=False, format="json")),
    }
    for index, row in enumerate(rows):
        folder = output / "rows" / row.folder
        ctx = RowContext(tasks, folder, config.seed, config.accelerator, config.devices, config.progress_bar, device)
        (folder / "error.txt").unlink(missing_ok=True)  # from an earlier run into the same folder
        start = time.perf_counter()
        outcome: RowOutcome | None = None
        meter = PeakMemory(device)
        try:
            with meter:
                outcome = _run_row(config, row, ctx, joint)
                record = _record(row, outcome, names)
                batch = int(getattr(tasks[0].datamodule, "eval_batch_size", 16))
                record["inference_ms_per_image"] = inference_ms_per_image(outcome.module, images, batch, device)
            record["peak_memory_mb"] = meter.peak_mib
            record["memory_kind"] = meter.kind
        except Exception as error:
            reason = f"{type(error).__name__}: {error}".strip()
            record = _failed(row, reason.splitlines()[0][:300])
            record["peak_memory_mb"], record["memory_kind"] = meter.peak_mib, meter.kind
            atomic_write_text(folder / "error.txt", traceback.format_exc())
            logger.warning("Row %s failed: %s", row.name, reason)
        finally:
            del outcome
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        atomic_write_text(folder / "row.json", _dumps(record))
        report["rows"].append(record)
        write_report(report, output)  # partial tables survive an interruption
        status = "ok" if record["status"] == "ok" else f"FAILED ({record['reason']})"
        quality = "" if record["image_AUROC"] is None else f", img AUROC {100 * record['image_AUROC']:.2f}"
        print(
            f"[row {index + 1}/{len(rows)}] {row.name}: {status} in {time.perf_counter() - start:.0f}s{quality}",
            flush=True,
        )
    return report


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)


def run_benchmark_cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``moleflow benchmark [--config FILE] [--output DIR] [options]``: run, then print the markdown table."""
    parser = benchmark_parser()
    config = parser.parse_args(list(argv) if argv is not None else None)
    if config.tasks is None:
        parser.error("No tasks: pass --config with a `tasks:` section (see configs/benchmark/).")
    report = run_benchmark(config)
    print((Path(config.output) / "benchmark.md").read_text())
    return report

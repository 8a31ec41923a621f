"""Continual-learning results: the task x task matrix and what the study reports from it."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from anomalib_moleflow.io import atomic_write_text
from anomalib_moleflow.metrics import METRICS


def clean(value: float | None) -> float | None:
    """NaN/None -> None (JSON null); floats otherwise."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summarize(
    tasks: list[str],
    matrix: dict[str, list[list[float | None]]],
    routing: list[list[float | None]],
) -> dict[str, Any]:
    """Final averages, per-task final values, forgetting, backward transfer and routing accuracy.

    Args:
        tasks: Task names in order.
        matrix: ``matrix[metric][i][j]``: value on task j after training task i (None where j > i or missing).
        routing: ``routing[i][j]``: routing accuracy on task j after training task i.

    Returns:
        ``final``, ``per_task_final``, ``forgetting``, ``bwt`` and ``routing_accuracy`` entries.
    """
    last = len(tasks) - 1
    final = {metric: _mean(rows[last]) for metric, rows in matrix.items()}
    per_task_final = {name: {metric: matrix[metric][last][j] for metric in matrix} for j, name in enumerate(tasks)}
    forgetting: dict[str, float | None] = {}
    bwt: dict[str, float | None] = {}
    for metric, rows in matrix.items():
        drops, transfers = [], []
        for j in range(last):
            earlier = [rows[i][j] for i in range(j, last) if rows[i][j] is not None]
            if earlier and rows[last][j] is not None:
                drops.append(max(earlier) - rows[last][j])
            if rows[j][j] is not None and rows[last][j] is not None:
                transfers.append(rows[last][j] - rows[j][j])
        forgetting[metric] = _mean(drops) if last > 0 else 0.0
        bwt[metric] = _mean(transfers) if last > 0 else 0.0
    final_routing = routing[last] if routing else []
    return {
        "final": final,
        "per_task_final": per_task_final,
        "forgetting": forgetting,
        "bwt": bwt,
        "routing_accuracy": {
            "overall": _mean(final_routing),
            "per_task": {name: final_routing[j] for j, name in enumerate(tasks)},
        },
    }


def _fmt(value: float | None, scale: float = 100.0) -> str:
    return "-" if value is None else f"{value * scale:.2f}"


def markdown_table(results: dict[str, Any]) -> str:
    """Per-task final values and the mean, in percent, like the study's tables."""
    metrics = [m for m in METRICS if any(v is not None for v in results["final"].values()) and m in results["final"]]
    header = "| task | " + " | ".join(METRICS[m] for m in metrics) + " | Rt Acc |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    routing = results["routing_accuracy"]
    for name in results["tasks"]:
        row = results["per_task_final"][name]
        lines.append(
            f"| {name} | " + " | ".join(_fmt(row[m]) for m in metrics) + f" | {_fmt(routing['per_task'][name])} |"
        )
    lines.append(
        "| **mean** | "
        + " | ".join(f"**{_fmt(results['final'][m])}**" for m in metrics)
        + f" | **{_fmt(routing['overall'])}** |"
    )
    forgetting = ", ".join(f"{METRICS[m]} {_fmt(results['forgetting'][m])}" for m in metrics)
    lines.append("")
    lines.append(f"Forgetting (FM, points): {forgetting}")
    unknown = {name: rate for name, rate in results.get("unknown_product_rate", {}).items() if rate}
    if unknown:
        flagged = ", ".join(f"{name} {_fmt(rate)} %" for name, rate in unknown.items())
        lines.append("")
        lines.append(f"Test images flagged as an unknown product (scored anomalous by default): {flagged}")
    good = {name: rate for name, rate in results.get("good_flagged", {}).items() if rate is not None}
    if good:
        shares = ", ".join(f"{name} {_fmt(rate)} %" for name, rate in good.items())
        lines.append("")
        lines.append(f"Good test images labelled anomalous (each task's threshold): {shares}")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], output_dir: Path) -> None:
    """Write ``results.json``, ``results.csv`` (one row per task plus the mean) and ``results.md`` atomically."""
    atomic_write_text(output_dir / "results.json", json.dumps(results, indent=2, default=str))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    rows = [["task", *METRICS, "routing_accuracy", "good_flagged"]]
    flagged = results.get("good_flagged", {})
    for name in results["tasks"]:
        values = results["per_task_final"][name]
        routing = results["routing_accuracy"]["per_task"][name]
        rows.append([name, *(values.get(m) for m in METRICS), routing, flagged.get(name)])
    good = [rate for rate in flagged.values() if rate is not None]
    mean_flagged = sum(good) / len(good) if good else None
    rows.append(
        ["mean", *(results["final"].get(m) for m in METRICS), results["routing_accuracy"]["overall"], mean_flagged]
    )
    writer.writerows([["" if value is None else value for value in row] for row in rows])
    atomic_write_text(output_dir / "results.csv", buffer.getvalue())
    atomic_write_text(output_dir / "results.md", markdown_table(results))


def write_routing_csv(path: Path, image_paths: list[str], routing: dict[str, list[Any]], tasks: list[str]) -> None:
    """One row per test image: path, routed task, router distance, unknown-product flag.

    Args:
        path: CSV file to write.
        image_paths: The images, in the order they were scored.
        routing: ``task`` (index), ``distance`` and ``unknown`` lists, one entry per image.
        tasks: Task names by index.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image_path", "routed_task", "router_distance", "unknown_product"])
    for image, task, distance, unknown in zip(
        image_paths, routing["task"], routing["distance"], routing["unknown"], strict=True
    ):
        writer.writerow([image, tasks[task], "" if math.isnan(distance) else f"{distance:.6g}", int(unknown)])
    atomic_write_text(path, buffer.getvalue())


def read_csv(path: Path) -> list[dict[str, str]]:
    """Read a results CSV back (for tests and reports)."""
    with path.open() as handle:
        return list(csv.DictReader(handle))

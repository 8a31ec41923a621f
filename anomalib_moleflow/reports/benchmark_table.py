"""The benchmark table (JSON, CSV, markdown) and its bar plot."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from anomalib_moleflow.io import atomic_write_text

#: Columns of every row, with their meaning (also written into ``results.json``).
COLUMNS: dict[str, str] = {
    "row": "row name (moleflow, MODEL/REGIME[#label])",
    "model": "MoLE-Flow, or anomalib's Fastflow / Patchcore / Padim",
    "regime": "continual (MoLE-Flow, frozen base) | finetune | separate (+ router) | joint (all data, upper bound)",
    "status": "ok | failed",
    "reason": "why the row failed",
    "image_AUROC": "final image AUROC, mean over tasks (0-1)",
    "image_AUPR": "final image AP, mean over tasks (0-1)",
    "pixel_AUROC": "final pixel AUROC, mean over tasks with masks (0-1)",
    "pixel_AUPR": "final pixel AP, mean over tasks with masks (0-1)",
    "pixel_AUPRO": "final pixel AUPRO, mean over tasks with masks (0-1)",
    "forgetting": "forgetting (FM) of image AUROC: mean over earlier tasks of best minus final value (0-1)",
    "routing_accuracy": "share of final test images sent to their own task's model (rows that route)",
    "params_per_task": "parameters (Patchcore: memory-bank values) added per task, mean over tasks",
    "bytes_per_task": "bytes added per task (parameters, buffers, memory bank, router prototype), mean",
    "train_time_s": "total training time over all tasks, seconds (anomalib fit incl. validation, router fitting)",
    "inference_ms_per_image": "ms per image of the final model (pre-process, route, score, post-process)",
    "peak_memory_mb": "peak memory of the row in MiB (see memory_kind)",
    "memory_kind": "cuda_max_allocated, or rss_growth (process RSS above its level at the row's start)",
}
_QUALITY = ("image_AUROC", "pixel_AUROC", "pixel_AUPR", "pixel_AUPRO")
_LABELS = {"image_AUROC": "Img AUROC", "pixel_AUROC": "Pix AUROC", "pixel_AUPR": "Pix AP", "pixel_AUPRO": "Pix AUPRO"}
_MODEL_NAMES = {"moleflow": "MoLE-Flow", "fastflow": "Fastflow", "patchcore": "Patchcore", "padim": "Padim"}
#: Columns of the seed summary: mean ± half-range over seeds.
SEED_COLUMNS: tuple[str, ...] = (
    "image_AUROC",
    "image_AUPR",
    "pixel_AUROC",
    "pixel_AUPR",
    "pixel_AUPRO",
    "routing_accuracy",
)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def _number(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The table in markdown, quality in percent, with footnotes on what each cost means."""
    header = (
        "| method | regime | Img AUROC | Pix AUROC | Pix AP | Pix AUPRO | FM (img AUROC) | routing | params/task | "
        "bytes/task | train (s) | ms/img | peak MiB |"
    )
    lines = [header, "|" + "---|" * 13]
    failures = []
    for row in report["rows"]:
        name = _MODEL_NAMES[row["model"]] + (f" #{row['row'].partition('#')[2]}" if "#" in row["row"] else "")
        if row["status"] != "ok":
            lines.append(f"| {name} | {row['regime']} | **failed** |" + " - |" * 10)
            failures.append(f"- {row['row']}: {row['reason']}")
            continue
        cells = [
            name,
            row["regime"],
            *(_percent(row[m]) for m in _QUALITY),
            _percent(row["forgetting"]),
            _percent(row["routing_accuracy"]),
            _count(row["params_per_task"]),
            _bytes(row["bytes_per_task"]),
            _number(row["train_time_s"]),
            _number(row["inference_ms_per_image"]),
            _number(row["peak_memory_mb"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    tasks = report["tasks"]
    masked = report.get("tasks_with_masks", tasks)
    notes = [
        "",
        f"Tasks ({len(tasks)}, in order): {', '.join(tasks)}. Backbone {report['backbone']} "
        f"{'/'.join(report['layers'])}, {report['image_size']} px, {report['device']}.",
        "Quality: final values (after the last task), mean over tasks, in %; pixel metrics over the tasks with masks"
        + (
            "."
            if len(masked) == len(tasks)
            else f" ({', '.join(masked) or 'none'}; the others have image labels only)."
        ),
        "FM: forgetting of image AUROC in points (joint trains once: no forgetting to measure). Routing: share of "
        "test images sent to their own task's model (MoLE-Flow's Mahalanobis router; finetune/joint do not route).",
        "params/bytes per task: MoLE-Flow's expert, adapters and router prototype; separate: the task's whole model "
        "without the frozen backbone (Patchcore: its memory bank) plus its router prototype; finetune: 0 (one "
        "model, overwritten); joint: Fastflow 0, Patchcore its memory bank / number of tasks.",
        f"Peak memory: {report['memory_kind']} during the row. Train time: anomalib fit (with validation) summed "
        "over tasks. ms/img: the final model's full inference path.",
    ]
    if failures:
        notes += ["", "Failed rows:", *failures]
    return "\n".join(lines + notes) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV (empty cells for null)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["" if row.get(column) is None else row[column] for column in COLUMNS])
    return buffer.getvalue()


def plot_bars(report: dict[str, Any], path: Path) -> Path:
    """Grouped bars of the quality metrics per row (left) and bytes added per task (right, log scale)."""
    rows = report["rows"]
    labels = [row["row"] for row in rows]
    x = np.arange(len(rows))
    fig, (ax, cost) = plt.subplots(1, 2, figsize=(max(9.0, 1.6 * len(rows) + 4), 4.5), width_ratios=[3, 1.3])
    width = 0.8 / len(_QUALITY)
    for k, metric in enumerate(_QUALITY):
        heights = [100 * row[metric] if row["status"] == "ok" and row[metric] is not None else 0.0 for row in rows]
        ax.bar(x + (k - (len(_QUALITY) - 1) / 2) * width, heights, width, label=_LABELS[metric])
    for i, row in enumerate(rows):
        if row["status"] != "ok":
            ax.text(i, 3, "failed", ha="center", va="bottom", rotation=90, color="red")
    ax.set_xticks(x, labels, rotation=35, ha="right")
    ax.set_ylim(0, 115)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("%")
    ax.set_title("Final quality (mean over tasks)")
    ax.legend(fontsize=8, loc="upper center", ncol=len(_QUALITY))
    sizes = [row["bytes_per_task"] if row["status"] == "ok" else None for row in rows]
    cost.barh(x, [(size or 0) / 2**10 for size in sizes], color="gray")
    positive = [size / 2**10 for size in sizes if size]
    if positive:  # a log axis needs a positive value (a table of finetune rows adds nothing per task)
        cost.set_xscale("log")
    cost.set_xlim(min(positive, default=1.0) / 3, max(positive, default=1.0) * 30)
    for i, size in enumerate(sizes):
        text = "failed" if rows[i]["status"] != "ok" else _bytes(size)
        cost.text(max((size or 0) / 2**10, cost.get_xlim()[0]), i, f" {text}", va="center", fontsize=7)
    cost.set_yticks(x, labels, fontsize=8)
    cost.invert_yaxis()
    cost.set_xlabel("KiB added per task (log)")
    cost.set_title("Memory added per task")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summarize_seeds(reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and half-range (spread) over seeds of each row's quality columns; a row failed in any seed is marked.

    Args:
        reports: One benchmark report per seed.

    Returns:
        ``{"seeds": [...], "rows": [{"row", "status", COLUMN: {"mean", "spread", "values"}}, ...]}``.
    """
    seeds = sorted(reports)
    names = [row["row"] for row in reports[seeds[0]]["rows"]]
    rows = []
    for name in names:
        records = [next(r for r in reports[seed]["rows"] if r["row"] == name) for seed in seeds]
        failed = [seed for seed, r in zip(seeds, records, strict=True) if r["status"] != "ok"]
        summary: dict[str, Any] = {"row": name, "status": "ok" if not failed else f"failed in seeds {failed}"}
        for column in SEED_COLUMNS:
            values = [r[column] for r in records if r["status"] == "ok" and r.get(column) is not None]
            summary[column] = (
                {"mean": float(np.mean(values)), "spread": (max(values) - min(values)) / 2, "values": values}
                if values
                else None
            )
        rows.append(summary)
    return {"seeds": seeds, "rows": rows}


def seeds_markdown(summary: dict[str, Any], tasks: list[str]) -> str:
    """The seed summary as a markdown table (percent, mean ± half-range)."""
    labels = {**_LABELS, "image_AUPR": "Img AP", "routing_accuracy": "Rt Acc"}  # _LABELS has pixel_AUPRO
    lines = [
        f"Mean ± half-range over seeds {summary['seeds']}; tasks: {', '.join(tasks)}.",
        "",
        "| row | " + " | ".join(labels[c] for c in SEED_COLUMNS) + " | status |",
        "|---" * (len(SEED_COLUMNS) + 2) + "|",
    ]
    for row in summary["rows"]:
        cells = [
            "-" if row[c] is None else f"{100 * row[c]['mean']:.2f} ± {100 * row[c]['spread']:.2f}"
            for c in SEED_COLUMNS
        ]
        lines.append(f"| {row['row']} | " + " | ".join(cells) + f" | {row['status']} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], output: Path) -> dict[str, Path]:
    """Write ``benchmark.json``, ``benchmark.csv``, ``benchmark.md`` (atomically) and ``benchmark.png``."""
    paths = {
        "json": output / "benchmark.json",
        "csv": output / "benchmark.csv",
        "markdown": output / "benchmark.md",
        "plot": output / "benchmark.png",
    }
    atomic_write_text(paths["json"], json.dumps(report, indent=2, default=str))
    atomic_write_text(paths["csv"], csv_text(report["rows"]))
    atomic_write_text(paths["markdown"], markdown_table(report))
    plot_bars(report, paths["plot"])
    return paths

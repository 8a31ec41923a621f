"""Ablation tables in the study's format, sweep plots, and the summary over finished suites."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from anomalib_moleflow.io import atomic_write, atomic_write_text

#: (column, metric key) of the suite tables; values in percent.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("Img AUROC", "image_AUROC"),
    ("Pix AUROC", "pixel_AUROC"),
    ("Img AP", "image_AUPR"),
    ("Pix AP", "pixel_AUPR"),
)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _fmt(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def suite_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: metrics in percent, Δ Img AUROC and Δ Pix AP against MAIN (the first run)."""
    main = records[0].get("metrics", {}) if records else {}
    rows = []
    for record in records:
        metrics = record.get("metrics", {})
        row: dict[str, Any] = {"run": record["name"], "value": record.get("value"), "status": record["status"]}
        for column, key in COLUMNS:
            row[column] = _pct(metrics.get(key))
        row["Rt Acc"] = _pct(record.get("routing"))
        for column, key in (("Δ Img AUROC", "image_AUROC"), ("Δ Pix AP", "pixel_AUPR")):
            ours, reference = metrics.get(key), main.get(key)
            row[column] = None if ours is None or reference is None else 100 * (ours - reference)
        study = record.get("reference", {})
        row["study Img AUROC"], row["study Pix AP"] = study.get("image_AUROC"), study.get("pixel_AUPR")
        row["reason"] = record.get("reason", "")
        row["depth"] = record.get("depth", {})
        rows.append(row)
    return rows


def suite_markdown(name: str, rows: list[dict[str, Any]]) -> str:
    """The study's table format, with the study's value beside ours where it has one."""
    header = [
        "run",
        *(c for c, _ in COLUMNS),
        "Rt Acc",
        "Δ Img AUROC",
        "Δ Pix AP",
        "study Img AUROC",
        "study Pix AP",
        "status",
    ]
    lines = [f"## {name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        status = row["status"] if row["status"] == "ok" else f"❌ {row['status']}: {row['reason']}"
        cells = [row["run"], *(_fmt(row[c]) for c, _ in COLUMNS), _fmt(row["Rt Acc"])]
        cells += [_fmt(row["Δ Img AUROC"], sign=True), _fmt(row["Δ Pix AP"], sign=True)]
        cells += [_fmt(row["study Img AUROC"]), _fmt(row["study Pix AP"]), status]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Δ against {rows[0]['run']} (the first row), in points. Study values in percent (MVTec AD, WRN50)."]
    return "\n".join(lines) + "\n"


def _plot_sweep(name: str, sweep_key: str, rows: list[dict[str, Any]], path: Path) -> None:
    done = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: float(r["value"]))
    figure, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.2), constrained_layout=True)
    for axis, (column, _) in zip(axes, COLUMNS, strict=True):
        axis.plot([float(r["value"]) for r in done], [r[column] for r in done], marker="o")
        axis.set_xlabel(sweep_key.split(".")[-1])
        axis.set_title(column)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{name}: each metric against the swept value (%)")
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    plt.close(figure)


def write_suite_report(name: str, sweep_key: str | None, records: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    """Write ``suite.md``, ``suite.csv`` (and ``suite.png`` for a sweep), then ``suite.json`` into ``folder``.

    ``suite.json`` comes last: once it exists, so do the others (a reader polling a running suite never finds the
    JSON without its table).
    """
    rows = suite_rows(records)
    report = {"name": name, "sweep_key": sweep_key, "rows": rows, "records": records}
    atomic_write_text(folder / "suite.md", suite_markdown(name, rows))
    buffer = io.StringIO()
    fields = [key for key in rows[0] if key != "depth"] if rows else []
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "suite.csv", buffer.getvalue())
    if sweep_key and sum(r["status"] == "ok" for r in rows) >= 2:
        _plot_sweep(name, sweep_key, rows, folder / "suite.png")
    atomic_write_text(folder / "suite.json", json.dumps(report, indent=2, default=str))
    return report


def summary_markdown(reports: list[dict[str, Any]]) -> str:
    """Component ranking by Δ Pix AP, depth stability, and one sensitivity row per swept hyperparameter."""
    lines = ["# Ablation summary", ""]
    for report in reports:
        rows = report["rows"]
        if report["name"] == "core":
            ranked = sorted((r for r in rows[1:] if r["Δ Pix AP"] is not None), key=lambda r: r["Δ Pix AP"])
            lines += ["## Component ranking (by what removing it costs in Pix AP)", ""]
            lines += ["| rank | removed | Δ Pix AP | Δ Img AUROC | study Δ Pix AP |", "|---|---|---|---|---|"]
            main_study = rows[0]["study Pix AP"]
            for rank, row in enumerate(ranked, 1):
                study = row["study Pix AP"]
                delta = None if study is None or main_study is None else study - main_study
                lines.append(
                    f"| {rank} | {row['run']} | {_fmt(row['Δ Pix AP'], True)} | {_fmt(row['Δ Img AUROC'], True)} | "
                    f"{_fmt(delta, True)} |"
                )
            lines.append("")
        if any(r["depth"] for r in rows):
            lines += [
                "## Depth stability",
                "",
                "| family | depths | stable range | first that degrades | first that fails |",
            ]
            lines.append("|---|---|---|---|---|")
            families: dict[str, list[dict[str, Any]]] = {}
            for row in rows:
                if row["depth"]:
                    families.setdefault(row["depth"]["family"], []).append(row)
            for family, members in families.items():
                members.sort(key=lambda r: r["depth"]["blocks"])
                best = max((r["Img AUROC"] or 0.0) for r in members)
                failed = [r for r in members if r["status"] != "ok"]
                degraded = [r for r in members if r["status"] == "ok" and (r["Img AUROC"] or 0.0) < best - 1.0]
                stable = [r["depth"]["blocks"] for r in members if r not in failed and r not in degraded]
                span = f"{min(stable)} to {max(stable)}" if stable else "-"
                first_degraded = degraded[0]["depth"]["blocks"] if degraded else "none"
                first_failed = failed[0]["depth"]["blocks"] if failed else "none"
                depths = ", ".join(str(r["depth"]["blocks"]) for r in members)
                lines.append(f"| {family} | {depths} | {span} | {first_degraded} | {first_failed} |")
            lines.append("")
    sweeps = [r for r in reports if r.get("sweep_key")]
    if sweeps:
        lines += ["## Sensitivity", "", "| hyperparameter | best value (Pix AP) | values | Pix AP spread |"]
        lines.append("|---|---|---|---|")
        for report in sweeps:
            done = [r for r in report["rows"] if r["status"] == "ok" and r["Pix AP"] is not None]
            if not done:
                continue
            best = max(done, key=lambda r: r["Pix AP"])
            values = [r["value"] for r in report["rows"]]
            spread = max(r["Pix AP"] for r in done) - min(r["Pix AP"] for r in done)
            lines.append(
                f"| {report['sweep_key'].split('.')[-1]} | {best['value']} | {min(values)} to {max(values)} | "
                f"{spread:.2f} |"
            )
    return "\n".join(lines) + "\n"


def write_summary(output: Path | str) -> Path:
    """Merge every finished suite under ``output`` (``*/suite.json``) into ``output/summary.md``.

    Raises:
        FileNotFoundError: If no suite has been run there.
    """
    output = Path(output)
    reports = [json.loads(p.read_text()) for p in sorted(output.glob("*/suite.json"))]
    if not reports:
        msg = f"No finished suite under '{output}' (expected SUITE/suite.json): run `moleflow ablate --suite NAME`."
        raise FileNotFoundError(msg)
    return atomic_write_text(output / "summary.md", summary_markdown(reports))

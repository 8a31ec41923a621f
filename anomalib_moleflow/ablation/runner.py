"""``run_suite``: every run of a suite through the continual engine; finished runs skipped, failures kept."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from anomalib_moleflow.engine.options import STATE_FILE
from anomalib_moleflow.engine.runner import run_continual
from anomalib_moleflow.io import atomic_write_text
from anomalib_moleflow.reports.ablation_table import write_suite_report

from .suite import Scale, Suite, config_key, validate

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
#: Held by the process running a run, so that several processes (one per GPU, or on machines sharing the output
#: folder) each take different runs of the same suite.
LOCK_FILE = ".running"


def _claim(run_dir: Path) -> bool:
    """Take the run for this process; ``False`` when another live process holds it.

    A lock left by a process of this machine that is no longer alive is taken over (an interrupted run resumes).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    owner = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, _, pid = lock.read_text().partition(" ")
            if host != socket.gethostname() or _alive(int(pid or 0)):
                return False
            lock.unlink(missing_ok=True)  # its process died: take the run over
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(owner)
        return True
    return False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: A run whose final image AUROC is below this trained to nothing (the study's "training failed" rows are ~0.6).
CHANCE = 0.65


def _run_one(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """One continual run of a resolved config into ``folder`` (continuing an interrupted one), by the one runner."""
    run = {**config, "output": str(folder), "resume": (folder / STATE_FILE).exists(), "overwrite": False}
    return run_continual(run)


def run_suite(suite: Suite, output: Path | str, scale: Scale = "full") -> dict[str, Any]:
    """Run every run of ``suite`` into ``OUTPUT/SUITE/runs/``, then write the suite's table, CSV, JSON (and plot).

    A run whose folder already holds a finished ``run.json`` for the same resolved config is skipped; an
    interrupted one continues after its last finished task. A run that another live process holds (its lock file)
    is left to it, so one process per GPU (``CUDA_VISIBLE_DEVICES=i moleflow ablate ...``), or per machine on a
    shared folder, each take different runs; rerun (or ``--summary``) once all have finished. A run that raises
    (e.g. NaN in training) or, at full scale, ends near chance is recorded as failed, and the suite goes on.

    Returns:
        The suite report (also ``OUTPUT/SUITE/suite.json``).
    """
    folder = Path(output) / suite.name
    records = []
    configs = validate(suite, scale, Path(output) / "data")  # every run checked before the first one starts
    for run, config in zip(suite.runs, configs, strict=True):
        key = config_key(config)
        run_dir = folder / "runs" / f"{run.slug}-{key}"
        done = run_dir / RUN_FILE
        if done.exists():
            logger.info("[%s] %s: finished earlier, skipped.", suite.name, run.name)
            records.append(json.loads(done.read_text()))
            continue
        record: dict[str, Any] = {"name": run.name, "key": key, "value": run.value, "settings": run.settings}
        record |= {"reference": run.reference, "depth": run.depth}
        if not _claim(run_dir):
            logger.info("[%s] %s: another process is running it, skipped.", suite.name, run.name)
            holder = (run_dir / LOCK_FILE).read_text()
            records.append(record | {"metrics": {}, "routing": None, "status": "running elsewhere", "reason": holder})
            continue
        try:
            results = _run_one(config, run_dir)
            final = results["final"]
            record |= {"metrics": final, "routing": results["routing_accuracy"]["overall"], "status": "ok"}
            if scale == "full" and (final.get("image_AUROC") or 0.0) < CHANCE:  # smoke runs are near chance
                record |= {"status": "failed", "reason": f"image AUROC {100 * final['image_AUROC']:.1f} (chance)"}
        except Exception as error:  # a diverged run is a result of the suite, not the end of it
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            record |= {"metrics": {}, "routing": None, "status": "failed", "reason": reason}
            logger.warning("[%s] %s failed: %s", suite.name, run.name, reason)
        atomic_write_text(done, json.dumps(record, indent=2, default=str))
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        records.append(record)
        write_suite_report(suite.name, suite.sweep_key, records, folder)  # partial tables survive an interruption
    return write_suite_report(suite.name, suite.sweep_key, records, folder)

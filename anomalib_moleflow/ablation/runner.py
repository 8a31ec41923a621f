"""``run_suite``: every run of a suite through the continual engine, by an executor; finished runs skipped.

A run is computed in a folder of its own attempt (``runs/SLUG-KEY/attempts/ID``, one ID per driver); finished, the
link ``runs/SLUG-KEY/output`` is made to it and its record written to ``runs/SLUG-KEY/run.json``, the cache the next
driver skips the run by. Only the driver writes the suite's tables, each time a run finishes, from every ``run.json``
on disk (atomic writes). So two drivers on one output folder never corrupt each other's files: a run both of them
start is computed twice, in two folders (the results are the same; the first to finish is kept, the other removed),
and the tables either writes hold every finished run.

Executors: ``serial`` runs one run after the other in this process; ``ray`` makes each run one Ray task (one GPU
each on a cluster with GPUs, else one CPU), retried on another worker when its worker dies, continuing after the
run's last finished task.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from anomalib_moleflow.engine.options import STATE_FILE
from anomalib_moleflow.engine.runner import run_continual
from anomalib_moleflow.io import atomic_write_text
from anomalib_moleflow.reports.ablation_table import write_suite_report

from .suite import INSTALL_RAY, Run, Scale, Suite, config_key, validate

if TYPE_CHECKING:
    from types import ModuleType

logger = logging.getLogger(__name__)

Executor = Literal["serial", "ray"]
RUN_FILE = "run.json"
#: Link (in a run's folder) to the attempt folder that finished the run: its results, checkpoint and plots.
OUTPUT_FOLDER = "output"
#: A run's attempts, one folder per driver: the finished one, and those in progress (or left by an interrupted
#: driver: those are safe to delete while no driver runs).
ATTEMPTS_FOLDER = "attempts"
#: Written into an attempt's folder when its run starts: the host and process computing it (for ``ps``, ``kill``).
WORKER_FILE = "worker.json"
#: A run whose final image AUROC is below this trained to nothing (the study's "training failed" rows are ~0.6).
CHANCE = 0.65
#: Ray retries of a run whose worker died (killed, out of memory, node lost).
MAX_RETRIES = 3
#: CPUs of a Ray run, and its torch threads unless ``threads`` is given or its config pins them.
CPUS_PER_RUN = 1


@dataclass(frozen=True)
class PlannedRun:
    """A run of a suite, resolved: its config, its folder and the fields of its record known before it runs."""

    run: Run
    config: dict[str, Any]
    folder: Path

    @property
    def done(self) -> Path:
        """The finished run's record (its presence means finished)."""
        return self.folder / RUN_FILE

    def header(self) -> dict[str, Any]:
        """The record's fields that do not depend on the result."""
        run = self.run
        return {
            "name": run.name,
            "key": config_key(self.config),
            "value": run.value,
            "settings": run.settings,
            "reference": run.reference,
            "depth": run.depth,
        }


def without_result(header: dict[str, Any], status: str, reason: str) -> dict[str, Any]:
    """The record of a run that has no metrics: failed, or not finished yet."""
    return header | {"metrics": {}, "routing": None, "status": status, "reason": reason}


def import_ray() -> ModuleType:
    """Ray, imported now (only ``--executor ray`` needs it).

    Raises:
        ModuleNotFoundError: Saying which extra installs it.
    """
    try:
        import ray
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(INSTALL_RAY) from error
    return ray


def execute_run(
    config: dict[str, Any],
    folder: str,
    attempt: str,
    header: dict[str, Any],
    scale: Scale,
    threads: int | None = None,
    cwd: str | None = None,
) -> dict[str, Any]:
    """Compute one run by the one runner (:func:`run_continual`) and record it; the body of a Ray task.

    The run goes into ``FOLDER/attempts/ATTEMPT``, continuing it after its last finished task if an earlier try of
    the same attempt (a Ray retry) left one; finished, the link ``FOLDER/output`` is made to it, unless another
    driver's attempt made it first (then this one is removed), and the record is written to ``FOLDER/run.json``. A
    run that raises (e.g. NaN in training) or, at full scale, ends near chance is recorded as failed.

    Args:
        config: The run's resolved continual config.
        folder: The run's folder.
        attempt: This driver's attempt id (the same for every Ray retry).
        header: The record's fields known before the run (:meth:`PlannedRun.header`).
        scale: The suite's scale (smoke runs are near chance, never failed for it).
        threads: torch CPU threads (``None``: the runner's automatic choice).
        cwd: The driver's working directory, which the config's relative paths refer to (used where it exists).

    Returns:
        The run's record (also ``FOLDER/run.json``).
    """
    if cwd and Path(cwd).is_dir() and Path.cwd() != Path(cwd):
        os.chdir(cwd)
    run_dir = Path(folder)
    work = run_dir / ATTEMPTS_FOLDER / attempt
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / WORKER_FILE, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    resume = (work / STATE_FILE).exists()  # a retry continues; else its folder is ours alone, so start clean
    run = {**config, "output": str(work), "resume": resume, "overwrite": not resume}
    if threads is not None:
        run["threads"] = threads
    record = dict(header)
    try:
        results = run_continual(run)
        final = results["final"]
        record |= {"metrics": final, "routing": results["routing_accuracy"]["overall"], "status": "ok"}
        if scale == "full" and (final.get("image_AUROC") or 0.0) < CHANCE:  # smoke runs are near chance
            record |= {"status": "failed", "reason": f"image AUROC {100 * final['image_AUROC']:.1f} (chance)"}
    except Exception as error:  # a diverged run is a result of the suite, not the end of it
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        record = without_result(header, "failed", reason)
        logger.warning("%s failed: %s", header["name"], reason)
    try:  # atomic: fails when another driver's attempt of the run finished first
        (run_dir / OUTPUT_FOLDER).symlink_to(Path(ATTEMPTS_FOLDER) / attempt, target_is_directory=True)
        first = True
    except FileExistsError:
        shutil.rmtree(work, ignore_errors=True)  # the same run, computed twice: keep the first
        first = False
    done = run_dir / RUN_FILE
    if first or not done.exists():
        atomic_write_text(done, json.dumps(record, indent=2, default=str))
    return record


def _ray_task(*args: Any) -> dict[str, Any]:
    """:func:`execute_run` in a Ray worker, logging as the ``moleflow`` command does (our INFO lines only)."""
    from anomalib_moleflow.runtime import quiet_libraries

    logging.getLogger("anomalib_moleflow").setLevel(logging.INFO)
    quiet_libraries()
    return execute_run(*args)


def write_tables(
    suite: Suite, folder: Path, plans: list[PlannedRun], lost: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """The suite's tables (into ``folder``) from every finished ``run.json`` on disk, in the suite's order.

    Args:
        suite: The suite.
        folder: ``OUTPUT/SUITE``.
        plans: Its runs.
        lost: Records of runs that ended without a ``run.json`` (their Ray task failed), by index.

    Returns:
        The suite report (also ``suite.json``); a run not finished yet is a ``pending`` row.
    """
    records = []
    for index, planned in enumerate(plans):
        if planned.done.exists():
            records.append(json.loads(planned.done.read_text()))
        else:
            records.append(lost.get(index) or without_result(planned.header(), "pending", "not finished yet"))
    return write_suite_report(suite.name, suite.sweep_key, records, folder)


def run_suite(
    suite: Suite,
    output: Path | str,
    scale: Scale = "full",
    executor: Executor = "serial",
    address: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run every run of ``suite`` into ``OUTPUT/SUITE/runs/``, then write the suite's table, CSV, JSON (and plot).

    A run whose folder already holds a ``run.json`` (finished, by the same resolved config) is skipped before
    anything is submitted. The tables are written again each time a run finishes (partial tables survive an
    interruption: unfinished runs are ``pending`` rows). A run that raises (e.g. NaN in training) or, at full scale,
    ends near chance is recorded as failed, and the suite goes on.

    Args:
        suite: The suite.
        output: Suites go to ``OUTPUT/SUITE/``; smoke-scale data to ``OUTPUT/data``.
        scale: ``full`` (the suite's configs) or ``smoke`` (tiny, CPU).
        executor: ``serial`` (this process) or ``ray`` (one Ray task per run).
        address: With ``ray``: the cluster to connect to; ``None``: the one ``ray.init()`` finds or starts.
        threads: torch CPU threads per run; ``None``: the config's ``threads``, else automatic (serial) or one
            per run (ray).

    Returns:
        The suite report (also ``OUTPUT/SUITE/suite.json``).

    Raises:
        ModuleNotFoundError: With ``ray`` when Ray is not installed.
    """
    if executor == "serial" and address is not None:
        msg = "--address is the Ray cluster of --executor ray; the serial executor runs in this process."
        raise ValueError(msg)
    if executor == "ray":
        import_ray()  # before any run is resolved: the one line saying how to install it
    output = Path(output).resolve()  # Ray workers may run in another working directory
    folder = output / suite.name
    configs = validate(suite, scale, output / "data")  # every run checked before the first one starts
    plans = [
        PlannedRun(run, config, folder / "runs" / f"{run.slug}-{config_key(config)}")
        for run, config in zip(suite.runs, configs, strict=True)
    ]
    todo = []
    for index, planned in enumerate(plans):
        if planned.done.exists():
            logger.info("[%s] %s: finished earlier, skipped.", suite.name, planned.run.name)
        else:
            todo.append(index)
    logger.info("[%s] %d of %d run(s) to compute (%s).", suite.name, len(todo), len(plans), executor)
    if not todo:
        return write_tables(suite, folder, plans, {})
    attempt = uuid.uuid4().hex[:12]
    if executor == "ray":
        return _run_ray(suite, folder, plans, todo, attempt, scale, address, threads)
    report: dict[str, Any] = {}
    for index in todo:
        planned = plans[index]
        execute_run(planned.config, str(planned.folder), attempt, planned.header(), scale, threads)
        report = write_tables(suite, folder, plans, {})
    return report


def _run_ray(
    suite: Suite,
    folder: Path,
    plans: list[PlannedRun],
    todo: list[int],
    attempt: str,
    scale: Scale,
    address: str | None,
    threads: int | None,
) -> dict[str, Any]:
    """Each run of ``todo`` as one Ray task; the tables written as each one's result arrives."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        resources: dict[str, Any] = {"num_cpus": CPUS_PER_RUN, "max_retries": MAX_RETRIES}
        if gpus:
            resources["num_gpus"] = 1
        task = ray.remote(_ray_task).options(**resources)
        cwd = str(Path.cwd())
        refs = {}
        for index in todo:
            planned = plans[index]
            per_run = threads or (None if planned.config.get("threads") else CPUS_PER_RUN)  # a config's own pin stays
            ref = task.remote(planned.config, str(planned.folder), attempt, planned.header(), scale, per_run, cwd)
            refs[ref] = index
        unit = "1 GPU" if gpus else f"{CPUS_PER_RUN} CPU"
        logger.info("[%s] %d run(s) submitted to Ray (%s per run).", suite.name, len(refs), unit)
        lost: dict[int, dict[str, Any]] = {}
        report: dict[str, Any] = {}
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                index = refs.pop(ref)
                _collect(ray, ref, plans[index], lost, index, suite.name)
            report = write_tables(suite, folder, plans, lost)
        return report
    finally:
        if started:
            ray.shutdown()


def _collect(
    ray: ModuleType, ref: Any, planned: PlannedRun, lost: dict[int, dict[str, Any]], index: int, name: str
) -> None:
    """Log a finished Ray task; one that failed (its worker died ``MAX_RETRIES + 1`` times) is a failed row."""
    try:
        record = ray.get(ref)
        logger.info("[%s] %s: %s.", name, planned.run.name, record["status"])
    except ray.exceptions.RayError as error:  # not cached in run.json: a rerun tries it again
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        lost[index] = without_result(planned.header(), "failed", reason)
        logger.warning("[%s] %s: its Ray task failed: %s", name, planned.run.name, reason)

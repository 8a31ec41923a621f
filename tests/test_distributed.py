"""``moleflow ablate --executor ray`` on a real local Ray cluster (2 CPUs), at smoke scale: the same rows as the serial
executor to the digit, a killed worker's run retried, a rerun submitting nothing, two drivers on one folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install '.[distributed]')")

from anomalib_moleflow.ablation import load_suite, run_suite  # noqa: E402
from anomalib_moleflow.ablation.runner import ATTEMPTS_FOLDER, OUTPUT_FOLDER, RUN_FILE, WORKER_FILE  # noqa: E402
from anomalib_moleflow.ablation.suite import config_key, suite_path, validate  # noqa: E402
from anomalib_moleflow.cli.main import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def core() -> Any:
    return load_suite(suite_path("core"))


def rows(output: Path) -> list[dict[str, Any]]:
    return json.loads((output / "core" / "suite.json").read_text())["rows"]


def run_records(output: Path) -> dict[str, dict[str, Any]]:
    """Every finished run's record by run name (the key hashes the output folder's path, so it is left out)."""
    records = {}
    for path in (output / "core" / "runs").glob(f"*/{RUN_FILE}"):
        record = json.loads(path.read_text())
        records[record.pop("name")] = record | {"key": None}
    return records


def seed_from(reference: Path, output: Path, missing: set[str]) -> None:
    """``output`` as a core suite interrupted with the runs ``missing`` unfinished (the others copied from
    ``reference``, under the run folders this output's configs name)."""
    suite = core()
    done = {json.loads(p.read_text())["name"]: p.parent for p in (reference / "core" / "runs").glob(f"*/{RUN_FILE}")}
    shutil.copytree(reference / "data", output / "data")
    for run, config in zip(suite.runs, validate(suite, "smoke", output / "data"), strict=True):
        if run.name in missing:
            continue
        key = config_key(config)
        folder = output / "core" / "runs" / f"{run.slug}-{key}"
        shutil.copytree(done[run.name], folder, symlinks=True)
        record = json.loads((folder / RUN_FILE).read_text())
        (folder / RUN_FILE).write_text(json.dumps(record | {"key": key}, indent=2))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The core suite at smoke scale by the serial executor, one torch thread per run (as each Ray run has)."""
    output = tmp_path_factory.mktemp("serial")
    run_suite(core(), output, "smoke", threads=1)
    return output


@pytest.fixture(scope="module")
def cluster(reference: Path) -> Iterator[str]:
    """A local Ray cluster of 2 CPUs (started once the serial reference is done); yields its address."""
    del reference
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_core(cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    del cluster
    output = tmp_path_factory.mktemp("ray")
    run_suite(core(), output, "smoke", executor="ray")
    return output


def test_ray_gives_the_serial_rows_to_the_digit(ray_core: Path, reference: Path) -> None:
    assert len(rows(ray_core)) == 9
    assert all(row["status"] == "ok" for row in rows(ray_core))
    assert rows(ray_core) == rows(reference)  # every metric, every Δ: exact floats
    assert run_records(ray_core) == run_records(reference)
    assert (ray_core / "core" / "suite.md").read_text() == (reference / "core" / "suite.md").read_text()
    for run_dir in (ray_core / "core" / "runs").iterdir():  # finished: one attempt, linked as the run's output
        assert (run_dir / OUTPUT_FOLDER / "results.json").is_file()
        assert len(list((run_dir / ATTEMPTS_FOLDER).iterdir())) == 1


def test_rerun_submits_nothing(ray_core: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = {path: path.stat().st_mtime_ns for path in (ray_core / "core" / "runs").rglob("*") if path.is_file()}
    with caplog.at_level("INFO", logger="anomalib_moleflow"):
        run_suite(core(), ray_core, "smoke", executor="ray")
    assert caplog.text.count("finished earlier, skipped") == 9
    assert "0 of 9 run(s) to compute" in caplog.text
    assert "submitted to Ray" not in caplog.text
    after = {path: path.stat().st_mtime_ns for path in (ray_core / "core" / "runs").rglob("*") if path.is_file()}
    assert after == before  # no run touched, no attempt folder made


def test_a_killed_worker_is_retried_and_the_suite_completes(cluster: str, reference: Path, tmp_path: Path) -> None:
    del cluster
    output = tmp_path / "out"
    seed_from(reference, output, missing={"MAIN", "w/o LoRA"})
    assert len(list((output / "core" / "runs").glob(f"*/{RUN_FILE}"))) == 7
    killed: dict[str, Any] = {}

    def kill_after_its_first_task() -> None:  # the worker of a run that finished its first task, mid-run
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            for worker in (output / "core" / "runs").glob(f"*/{ATTEMPTS_FOLDER}/*/{WORKER_FILE}"):
                unfinished = not (worker.parents[2] / RUN_FILE).exists()  # not one of the copied runs
                if unfinished and (worker.parent / "state.json").exists():
                    pid = json.loads(worker.read_text())["pid"]
                    os.kill(pid, signal.SIGKILL)
                    killed.update(pid=pid, run=worker.parents[2])
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_after_its_first_task)
    killer.start()
    run_suite(core(), output, "smoke", executor="ray")
    killer.join()
    assert killed, "no worker was killed"
    retried = json.loads((killed["run"] / OUTPUT_FOLDER / WORKER_FILE).read_text())["pid"]
    assert retried != killed["pid"]  # finished by another worker, continuing after the first task
    assert all(row["status"] == "ok" for row in rows(output))
    assert rows(output) == rows(reference)
    assert run_records(output) == run_records(reference)


def test_two_drivers_on_one_folder_write_whole_tables(cluster: str, reference: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    seed_from(reference, output, missing={"MAIN", "w/o Tail Aware Loss", "w/o DIA"})
    command = [sys.executable, "-m", "anomalib_moleflow.cli.main", "ablate", "--suite", "core", "--output"]
    command += [str(output), "--scale", "smoke", "--executor", "ray", "--address", cluster]
    drivers = [
        subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    tables = output / "core" / "suite.json"
    reads = 0
    while any(driver.poll() is None for driver in drivers):  # whatever is on disk is always a whole table
        if tables.exists():
            assert len(json.loads(tables.read_text())["rows"]) == 9
            assert (output / "core" / "suite.md").read_text().endswith("in percent (MVTec AD, WRN50).\n")
            reads += 1
        time.sleep(0.05)
    logs = [driver.communicate(timeout=60)[0] for driver in drivers]
    assert [driver.returncode for driver in drivers] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert reads > 0
    assert all("3 of 9 run(s) to compute" in log for log in logs)  # both computed the 3 runs: each run twice
    assert rows(output) == rows(reference)
    assert (output / "core" / "suite.md").read_text() == (reference / "core" / "suite.md").read_text()
    assert (output / "core" / "suite.csv").read_text().count("\n") == 10
    assert run_records(output) == run_records(reference)
    for run_dir in (output / "core" / "runs").iterdir():  # the slower of a run computed twice removed its attempt
        assert len(list((run_dir / ATTEMPTS_FOLDER).iterdir())) == 1
        assert (run_dir / OUTPUT_FOLDER / "results.json").is_file()


def test_ray_missing_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    with pytest.raises(SystemExit):
        main(["ablate", "--suite", "core", "--output", str(tmp_path), "--scale", "smoke", "--executor", "ray"])
    assert capsys.readouterr().err == (
        "moleflow ablate: error: --executor ray needs Ray: pip install '.[distributed]' (in the clone of "
        "anomalib-moleflow).\n"
    )
    with pytest.raises(SystemExit):
        main(["ablate", "--suite", "core", "--output", str(tmp_path), "--address", "head:6379"])
    assert "--address is the Ray cluster of --executor ray" in capsys.readouterr().err

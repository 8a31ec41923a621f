"""A suite is data: a base continual config, a scale, and runs that each set a few keys (or one swept key).

Suite YAML (``configs/ablations/*.yaml``)::

    name: core
    base: ../continual/mvtec_1x1.yaml        # relative to the suite file
    runs:
      - name: MAIN
        reference: {image_AUROC: 98.05, pixel_AUROC: 97.81, pixel_AUPR: 55.80, routing: 100.0}
      - name: w/o Tail Aware Loss
        set: {model.tail_weight: 0}
        reference: {image_AUROC: 94.97, pixel_AUROC: 97.21, pixel_AUPR: 48.61}

or, for a sweep, ``sweep: {key: model.lora_rank, values: [16, 32, 64, 128], main: 64, reference: {16: {...}}}``.
The first run (or the sweep's ``main`` value) is MAIN, the row every Δ is taken against. ``reference`` values are
the study's numbers in percent, printed beside ours.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

#: What to do when ``--executor ray`` finds no Ray.
INSTALL_RAY = "--executor ray needs Ray: pip install '.[distributed]' (in the clone of anomalib-moleflow)."

Scale = Literal["full", "smoke"]
#: Keys of a run in a suite YAML.
RUN_KEYS = frozenset({"name", "set", "reference", "depth"})

#: ``--scale smoke``: any suite on a 2-core CPU in minutes (two generated tasks, a tiny random backbone, one epoch).
SMOKE: dict[str, Any] = {
    "model": {
        "backbone": "resnet18",
        "layers": ["layer1", "layer2"],
        "pre_trained": False,
        "image_size": 64,
        "embed_dim": 32,
        "max_epochs": 1,
    },
    "tasks": {
        "dataset": {
            "class_path": "anomalib_moleflow.data.SyntheticMVTecAD",
            "init_args": {
                "image_size": 64,
                "n_train": 12,
                "n_test_good": 4,
                "n_test_defect": 1,
                "train_batch_size": 4,
                "eval_batch_size": 8,
                "num_workers": 0,
            },
        },
        "categories": ["woven", "pill"],
    },
    "overlays_per_task": 0,
    "progress_bar": False,
}


@dataclass
class Run:
    """One run of a suite: a name, the keys it sets, the study's reference values, and its swept value."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, float] = field(default_factory=dict)
    value: Any = None
    depth: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """Folder-safe name."""
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", self.name).strip("_")


@dataclass
class Suite:
    """A base config and its runs (the first is MAIN)."""

    name: str
    base: dict[str, Any]
    runs: list[Run]
    sweep_key: str | None = None

    def resolved(self, run: Run, scale: Scale, data_root: Path) -> dict[str, Any]:
        """The run's whole continual config: base, then the scale, then the run's keys."""
        config = copy.deepcopy(self.base)
        if scale == "smoke":
            smoke = copy.deepcopy(SMOKE)
            smoke["tasks"]["dataset"]["init_args"]["root"] = str(data_root)
            config = {**config, **{k: v for k, v in smoke.items() if k != "model"}}
            config["model"] = {**config.get("model", {}), **smoke["model"]}
        for key, value in run.settings.items():
            target = config
            *parents, leaf = key.split(".")
            for part in parents:
                target = target.setdefault(part, {})
            target[leaf] = value
        return config


def validate(suite: Suite, scale: Scale, data_root: Path) -> list[dict[str, Any]]:
    """Every run's resolved config, each checked by the continual runner's parser before any run starts.

    Raises:
        ValueError: Naming the run and its first unknown key or invalid value (e.g. ``model.tail_wieght``).
    """
    from anomalib_moleflow.engine.runner import resolve

    configs = []
    for run in suite.runs:
        config = suite.resolved(run, scale, data_root)
        try:
            resolve(config)
        except ValueError as error:
            msg = f"Suite '{suite.name}', run '{run.name}': {error}"
            raise ValueError(msg) from error
        configs.append(config)
    return configs


def config_key(config: dict[str, Any]) -> str:
    """Short hash of a resolved config: finished runs are found again by it."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def suite_path(name: str) -> Path:
    """``configs/ablations/NAME.yaml`` in the working directory, else in the repository the package runs from."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = root / "configs" / "ablations" / f"{name}.yaml"
        if path.is_file():
            return path
    msg = f"No suite '{name}': expected configs/ablations/{name}.yaml (or pass --config FILE)."
    raise FileNotFoundError(msg)


def load_suite(path: Path | str, base: Path | str | None = None) -> Suite:
    """Read a suite YAML (see the module docstring); ``base`` replaces the suite's base config (other data).

    Raises:
        ValueError: On a suite without runs or sweep, or with unknown keys.
    """
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    unknown = sorted(set(data) - {"name", "base", "runs", "sweep"}) if isinstance(data, dict) else ["(not a mapping)"]
    if unknown:
        msg = f"Unknown key(s) {unknown} in suite '{path}'; its keys are name, base, runs, sweep."
        raise ValueError(msg)
    base_path = Path(base) if base is not None else (path.parent / data["base"] if data.get("base") else None)
    config = yaml.safe_load(base_path.read_text()) if base_path is not None else {}
    name = data.get("name", path.stem)
    if "sweep" in data:
        sweep = data["sweep"]
        unknown = sorted(set(sweep) - {"key", "values", "main", "reference"})
        if unknown or "key" not in sweep or "values" not in sweep:
            msg = f"Sweep of suite '{path}': unknown key(s) {unknown}; its keys are key, values, main, reference."
            raise ValueError(msg)
        values = list(sweep["values"])
        main = sweep.get("main", values[0])
        ordered = [main, *(v for v in values if v != main)]
        leaf = sweep["key"].split(".")[-1]
        references = {str(k): v for k, v in (sweep.get("reference") or {}).items()}
        runs = [Run(f"{leaf}={v}", {sweep["key"]: v}, dict(references.get(str(v), {})), value=v) for v in ordered]
        return Suite(name, config, runs, sweep_key=sweep["key"])
    for index, row in enumerate(data.get("runs") or []):
        unknown = sorted(set(row) - RUN_KEYS) if isinstance(row, dict) else ["(not a mapping)"]
        if unknown or "name" not in row:
            msg = (
                f"Run {index + 1} of suite '{path}' has unknown key(s) {unknown} or no name; a run's keys are "
                f"{sorted(RUN_KEYS)} (name required)."
            )
            raise ValueError(msg)
    runs = [
        Run(r["name"], dict(r.get("set", {})), dict(r.get("reference", {})), depth=dict(r.get("depth", {})))
        for r in data.get("runs", [])
    ]
    if not runs:
        msg = f"Suite '{path}' has no runs and no sweep."
        raise ValueError(msg)
    return Suite(name, config, runs)

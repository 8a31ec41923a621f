"""The settings dataclasses and the constructors they describe must list the same arguments with the same defaults
and types.

The ``--model.*`` options and a config's ``model:`` come from the dataclasses (no torch needed to build them), while
anomalib's CLI and Python users call the constructors: a setting added to one and not the other, or a default changed
in one place, would be silently ignored or silently different.
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any

import pytest

from anomalib_moleflow import MoleFlow, MoleFlowModel
from anomalib_moleflow.baselines import TimmFastflow, TimmPadim, TimmPatchcore
from anomalib_moleflow.baselines.settings import FastflowSettings, PadimSettings, PatchcoreSettings
from anomalib_moleflow.models.moleflow.settings import (
    RUNTIME_SETTINGS,
    SPEED_SETTINGS,
    ArchitectureSettings,
    MoleFlowSettings,
    TrainingSettings,
    differences,
)

#: Constructor arguments that are anomalib components, not settings.
COMPONENTS = {"pre_processor", "post_processor", "evaluator", "visualizer"}
#: Arguments every benchmark row shares, declared once by the benchmark (not in a baseline's dataclass).
SHARED = {"backbone", "layers", "pre_trained", "image_size"}


def signature_defaults(function: Any, skip: set[str]) -> dict[str, Any]:
    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if name != "self" and name not in skip
    }


def dataclass_defaults(settings: type) -> dict[str, Any]:
    return {field.name: field.default for field in fields(settings)}


@pytest.mark.parametrize(
    ("constructor", "settings", "skip"),
    [
        (MoleFlowModel.__init__, ArchitectureSettings, set()),
        (MoleFlow.__init__, MoleFlowSettings, COMPONENTS),
        (TimmFastflow.__init__, FastflowSettings, COMPONENTS | SHARED),
        (TimmPatchcore.__init__, PatchcoreSettings, COMPONENTS | SHARED),
        (TimmPadim.__init__, PadimSettings, COMPONENTS | SHARED),
    ],
    ids=["MoleFlowModel", "MoleFlow", "Fastflow", "Patchcore", "Padim"],
)
def test_constructor_and_settings_list_the_same_arguments_and_defaults(
    constructor: Any, settings: type, skip: set[str]
) -> None:
    given, listed = signature_defaults(constructor, skip), dataclass_defaults(settings)
    assert sorted(given) == sorted(listed), f"only in the constructor: {set(given) - set(listed)}; only in the " + (
        f"settings: {set(listed) - set(given)}"
    )
    assert differences(listed, given) == []
    annotations = {name: str(p.annotation) for name, p in inspect.signature(constructor).parameters.items()}
    mismatched = {
        f.name: (annotations[f.name], str(f.type)) for f in fields(settings) if annotations[f.name] != str(f.type)
    }
    assert not mismatched, f"types differ (constructor, settings): {mismatched}"


def test_training_settings_are_what_moleflow_adds_to_the_architecture() -> None:
    architecture, training = set(dataclass_defaults(ArchitectureSettings)), set(dataclass_defaults(TrainingSettings))
    assert not architecture & training
    assert set(dataclass_defaults(MoleFlowSettings)) == architecture | training
    assert architecture >= RUNTIME_SETTINGS  # free to differ from a checkpoint's: architecture settings by definition
    assert set(SPEED_SETTINGS) <= training


def test_differences_names_each_changed_leaf() -> None:
    saved = {"model": {"lr": 1e-3, "layers": ["a", "b"], "max_epochs": 3}, "seed": 0}
    current = {"model": {"lr": 3e-4, "layers": ("a", "b"), "max_epochs": 3.0}, "seed": 0, "extra": 1}
    assert differences(saved, current) == [("extra", None, 1), ("model.lr", 1e-3, 3e-4)]

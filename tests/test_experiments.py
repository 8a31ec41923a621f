"""The research harness behind docs/quality.md: the commands the docs print still run as they ran."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "scripts" / "experiments" / "patch_score.py"


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("patch_score", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _documented_variants() -> set[str]:
    """Every ``--variants`` / ``--ensemble`` entry of a ``patch_score.py`` command in docs/quality.md."""
    text = (ROOT / "docs" / "quality.md").read_text().replace("\\\n", " ")
    commands = [line for line in text.splitlines() if "patch_score.py" in line]
    return {
        variant
        for command in commands
        for listed in re.findall(r"--(?:variants|ensemble)[ =]+(\S+)", command)
        for variant in listed.split(",")
    }


def test_every_variant_the_quality_docs_run_is_known_to_the_harness() -> None:
    """A renamed or dropped modifier would make a documented table impossible to reproduce."""
    harness = _harness()
    documented = _documented_variants()
    assert {"exact+pool1+swa0.5+polar", "exact+pool1+swa0.5+hidden2"} <= documented  # the parser finds them
    for variant in documented:
        base, _, modifiers = variant.partition("+")
        assert base in {"study", "exact"}, variant
        unknown = [m for m in filter(None, modifiers.split("+")) if m not in harness.VARIANTS]
        assert not unknown, f"{variant}: {unknown} not in the harness's VARIANTS"


def test_later_modifiers_win_and_settings_merge() -> None:
    spec = _harness().resolve("pool1+no_pos+tail_k0.005+patch_ln")
    assert spec["patch_size"] == 1
    assert spec["tail_ratio"] == 0.005
    assert spec["settings"] == {"use_pos_embedding": False, "whitening_norm": "patch"}


VARIANT = "exact+pool1"


def _run(root: Path, seeds: str) -> str:
    """The harness on one tiny generated category; its stdout."""
    command = [
        sys.executable,
        str(HARNESS),
        "--data=demo",
        f"--root={root}",
        "--categories=wood",
        "--image_size=64",
        "--embed_dim=32",
        "--steps=2",
        f"--seeds={seeds}",
        "--kinds=nll",
        f"--variants={VARIANT}",
        f"--ensemble={VARIANT},{VARIANT}",
        "--threads=1",  # not the load average's choice: another thread count sums in another order
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, check=True, env=env, cwd=ROOT, timeout=300).stdout


def _results(out: str, name: str) -> list[dict[str, float]]:
    return [ast.literal_eval(m) for m in re.findall(rf"  {re.escape(name)} seed \d: .*?(\{{.*\}})", out)]


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("demo")
    return root, _run(root, "0,1")


def test_an_ensemble_of_one_variant_with_itself_ranks_as_the_variant(two_seeds: tuple[Path, str]) -> None:
    """The ensemble's sum of standardised scores is an increasing affine map of each member's score, so with one
    member twice every metric equals that member's own: a wrong standardisation or a mixed-up seed breaks it."""
    out = two_seeds[1]
    member, ensemble = _results(out, VARIANT), _results(out, "ensemble")
    assert len(member) == len(ensemble) == 2, out
    for alone, summed in zip(member, ensemble, strict=True):
        assert set(alone) == set(summed) == {"img_auroc", "img_ap", "pix_auroc", "pix_ap"}
        for key, value in alone.items():
            assert summed[key] == pytest.approx(value, abs=1e-3), key  # float32 ties
    assert member[0] != member[1]  # two seeds, two trained flows: the pairing is tested, not one run twice


def test_a_seed_gives_the_same_figures_in_another_process(two_seeds: tuple[Path, str]) -> None:
    """The training patches' order comes from a shuffled loader: unseeded, a seed's figures changed between runs."""
    root, out = two_seeds
    assert _results(_run(root, "1"), VARIANT) == _results(out, VARIANT)[1:]


_EVERY_HELP = """
import contextlib, io, runpy, sys
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        runpy.run_path(path, run_name="__main__")
    print(path, out.getvalue().startswith("usage:"))
"""


def test_every_research_script_imports_and_parses_its_help() -> None:
    """A helper renamed in one script must not silently break another that the docs still run (one interpreter for
    all of them: the imports are shared)."""
    scripts = sorted(str(path) for path in HARNESS.parent.glob("*.py"))
    result = subprocess.run(
        [sys.executable, "-c", _EVERY_HELP, *scripts],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [word for path in scripts for word in (path, "True")], result.stdout

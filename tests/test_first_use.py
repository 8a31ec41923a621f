"""First use: what a new user meets (issue 21). Fast answers, one clear line per mistake, settings the user typed win,
thresholds that need no defect image, and nothing lost."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from anomalib.data import Folder, MVTecAD
from lightning.pytorch import seed_everything

from anomalib_moleflow import MoleFlow
from anomalib_moleflow.engine import ContinualEngine
from anomalib_moleflow.engine.options import apply_dotted, split_dotted
from anomalib_moleflow.engine.runner import given_model_settings, moleflow_strategy, translate_study_flags

from conftest import TINY_CATEGORIES, TINY_MODEL_KWARGS

REPO = Path(__file__).resolve().parents[1]


def _tasks(root: Path, categories: tuple[str, ...] = TINY_CATEGORIES[:1]) -> list[MVTecAD]:
    return [MVTecAD(root=root, category=c, train_batch_size=4, eval_batch_size=8, num_workers=0) for c in categories]


def _tiny_config(root: Path, **model: object) -> dict:
    """A continual config of one generated tiny task (the keys of ``moleflow continual``)."""
    kwargs = {key: value for key, value in TINY_MODEL_KWARGS.items() if key != "visualizer"}
    return {
        "seed": 0,
        "progress_bar": False,
        "overlays_per_task": 0,
        "model": {**kwargs, "layers": list(kwargs["layers"]), **model},
        "tasks": {
            "dataset": {
                "class_path": "anomalib.data.MVTecAD",
                "init_args": {"root": str(root), "train_batch_size": 4, "eval_batch_size": 8, "num_workers": 0},
            },
            "categories": [TINY_CATEGORIES[0]],
        },
    }


def _cli(args: list[str], tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "anomalib_moleflow.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
        check=False,
        env={**os.environ, **(env or {})},
    )


# ------------------------------------------------------------------------------------------------------ start-up
@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["continual", "--help"],
        ["benchmark", "--help"],
        ["predict", "--help"],
        ["export", "--help"],
        ["ablate", "--help"],
        ["continual", "--seed", "not-a-number"],
        ["predict", "--ckpt", "missing.ckpt", "--input", "."],
        ["continual", "--config", "USED/config.yaml", "--output", "USED"],
    ],
    ids=["help", "continual-help", "benchmark-help", "predict-help", "export-help", "ablate-help", "bad-option",
         "missing-checkpoint", "used-folder"],
)  # fmt: skip
def test_help_option_errors_and_refusals_answer_without_loading_torch(argv: list[str], tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "results.json").write_text("{}")  # an earlier run's output
    (used / "config.yaml").write_text(yaml.safe_dump(_tiny_config(tmp_path / "data")))
    argv = [arg.replace("USED", str(used)) for arg in argv]
    script = (
        "import sys\n"
        "from anomalib_moleflow.cli.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exit_:\n"
        "    code = exit_.code\n"
        "heavy = sorted(name for name in ('torch', 'anomalib.data', 'lightning') if name in sys.modules)\n"
        "print('HEAVY', heavy, 'CODE', code, file=sys.stderr)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert "HEAVY [] CODE" in completed.stderr, completed.stderr[-2000:]
    if argv[-1] == str(used):
        assert "already holds the outputs of an earlier run" in completed.stderr
        assert (used / "results.json").read_text() == "{}"


# --------------------------------------------------------------------------------------------- one line per error
def test_several_devices_without_ddp_are_refused_in_one_line_before_anything_runs(tmp_path: Path) -> None:
    """Several devices need --strategy ddp (the ranks' statistics are combined there): said at once, in one line."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_tiny_config(tmp_path / "data")))
    completed = _cli(
        ["continual", "--config", str(config), "--output", str(tmp_path / "out"), "--devices", "2"], tmp_path
    )
    assert completed.returncode != 0
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, completed.stderr
    assert "need --strategy ddp" in lines[0]
    assert "--executor ray" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_is_one_line_and_writes_no_model(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "diverge.yaml"
    config.write_text(yaml.safe_dump(_tiny_config(tiny_mvtec_root, lr=1.0e4, max_epochs=2)))
    completed = _cli(["continual", "--config", str(config), "--output", str(tmp_path / "out")], tmp_path)
    assert completed.returncode == 1
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert "Traceback" not in completed.stderr
    assert lines[-1].startswith("moleflow continual: error: Non-finite")
    assert not [line for line in lines if "site-packages" in line or "Error" in line.split(":")[0]], lines
    assert len(lines) <= 5, lines  # our own progress lines and the error: no traceback, no library warning
    assert not (tmp_path / "out" / "model.ckpt").exists()


@pytest.mark.parametrize("whitening_norm", ["pach", "[image, [image, pach]]"])
def test_a_misspelt_whitening_norm_is_one_line_naming_the_choices(
    whitening_norm: str, tiny_mvtec_root: Path, tmp_path: Path
) -> None:
    """A nested list of names: jsonargparse would list its union's subtypes; the model names the four choices."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_tiny_config(tiny_mvtec_root, flow_layout="stage")))
    argv = ["continual", "--config", str(config), "--output", str(tmp_path / "out")]
    completed = _cli([*argv, "--model.whitening_norm", whitening_norm], tmp_path)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert "Subtypes" not in completed.stderr
    assert completed.stderr.strip().splitlines()[-1] == (
        "moleflow continual: error: whitening_norm must be 'image', 'patch', 'patch_floored' or 'position', got 'pach'."
    )
    assert not (tmp_path / "out").exists()


def test_missing_offline_weights_are_one_line(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "weights.yaml"
    config.write_text(yaml.safe_dump(_tiny_config(tiny_mvtec_root, pre_trained=True)))
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    completed = _cli(["continual", "--config", str(config), "--output", str(tmp_path / "out")], tmp_path, env)
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    last = completed.stderr.strip().splitlines()[-1]
    assert last.startswith("moleflow continual: error:")
    assert "resnet18" in last


def test_verbose_shows_the_traceback(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "diverge.yaml"
    config.write_text(yaml.safe_dump(_tiny_config(tiny_mvtec_root, lr=1.0e4, max_epochs=2)))
    completed = _cli(["--verbose", "continual", "--config", str(config), "--output", str(tmp_path / "o")], tmp_path)
    assert completed.returncode == 1
    assert "Traceback" in completed.stderr


# ------------------------------------------------------------------------------------------- the user's settings
@pytest.fixture(scope="module")
def lr_checkpoint(tiny_mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-task model trained with lr 1e-3 (not the default 3e-3)."""
    output = tmp_path_factory.mktemp("lr_run")
    seed_everything(0, verbose=False)
    model = MoleFlow(**{**TINY_MODEL_KWARGS, "lr": 1e-3})
    ContinualEngine(output_dir=output, enable_progress_bar=False, overlays_per_task=0).run(
        model, _tasks(tiny_mvtec_root)
    )
    return output / "model.ckpt"


def test_a_typed_setting_equal_to_its_default_wins_over_the_checkpoints(lr_checkpoint: Path, tmp_path: Path) -> None:
    argv = translate_study_flags(["--from_checkpoint", str(lr_checkpoint), "--lr", "3e-3"])
    given = given_model_settings(argv)
    assert given == {"lr"}
    config = {"from_checkpoint": str(lr_checkpoint), "model": {"lr": 3e-3}}
    assert moleflow_strategy(config, given).model.lr == pytest.approx(3e-3)  # 3e-3 is also the parser's default
    assert moleflow_strategy(config, set()).model.lr == pytest.approx(1e-3)  # not typed: the checkpoint's
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump({"model": {"lr": 3e-3, "max_epochs": 60}}))
    assert given_model_settings(["--config", str(file)]) == {"lr", "max_epochs"}  # a config's keys count as typed


def test_one_leaf_of_the_tasks_section_can_be_changed_on_the_command_line() -> None:
    demo = yaml.safe_load((REPO / "configs" / "continual" / "demo.yaml").read_text())
    rest, changes = split_dotted(["--seed", "3", "--tasks.dataset.init_args.root", "/data/x"], "tasks")
    assert rest == ["--seed", "3"]
    tasks = apply_dotted(demo["tasks"], changes, "tasks")
    assert tasks["dataset"]["init_args"]["root"] == "/data/x"
    assert tasks["dataset"]["class_path"] == demo["tasks"]["dataset"]["class_path"]
    assert tasks["categories"] == demo["tasks"]["categories"]
    assert demo["tasks"]["dataset"]["init_args"]["root"] != "/data/x"  # the config itself is not changed
    with pytest.raises(ValueError, match="a list of 4"):
        apply_dotted(demo["tasks"], split_dotted(["--tasks.categories.9=a"], "tasks")[1], "tasks")


def _suite(tmp_path: Path, runs: list[dict]) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(_tiny_config(tmp_path / "data")))
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "typos", "base": str(base), "runs": runs}))
    return suite


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        ([{"name": "MAIN"}, {"name": "x", "sett": {"model.lr": 1}}], "sett"),
        ([{"name": "MAIN"}, {"name": "x", "set": {"seeed": 1}}], "seeed"),
        ([{"name": "MAIN"}, {"name": "x", "set": {"model.tail_wieght": 0.0}}], "tail_wieght"),
        ([{"name": "MAIN"}, {"name": "x", "set": {"model.whitening_norm": "pach"}}], "got 'pach'"),
        ([{"name": "MAIN"}, {"name": "x", "set": {"model.whitening_norm": ["image"] * 3}}], "got 3"),
    ],
    ids=["row-key", "run-key", "model-key", "whitening-name", "whitening-count"],
)
def test_a_suite_with_a_typo_is_refused_before_any_run(
    runs: list[dict], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from anomalib_moleflow.cli.main import main

    suite = _suite(tmp_path, runs)
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", "--config", str(suite), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert message in error
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "typos" / "runs").exists()  # MAIN did not run first


# ------------------------------------------------------------------------------------------ thresholds, good only
@pytest.fixture(scope="module")
def good_only_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A product with good images only (16 to train, 6 to test): no defect image anywhere."""
    from anomalib_moleflow.data.synthetic import SyntheticConfig, generate_dataset

    source = generate_dataset(
        tmp_path_factory.mktemp("good_src"),
        TINY_CATEGORIES[:1],
        SyntheticConfig(image_size=64, n_train=16, n_test_good=6, n_test_defect=1, seed=1),
    )
    root = tmp_path_factory.mktemp("good_only")
    for split, folder in (("train", "train"), ("test", "test_good")):
        (root / folder).mkdir()
        for image in sorted((source / TINY_CATEGORIES[0] / split / "good").glob("*.png")):
            (root / folder / image.name).write_bytes(image.read_bytes())
    return root


def test_good_fpr_thresholds_need_no_defect_image(good_only_root: Path, tmp_path: Path) -> None:
    datamodule = Folder(
        name="bottle_line",
        root=good_only_root,
        normal_dir="train",
        normal_test_dir="test_good",
        train_batch_size=4,
        eval_batch_size=8,
        num_workers=0,
        test_split_mode="from_dir",
        val_split_mode="same_as_test",
    )
    seed_everything(0, verbose=False)
    model = MoleFlow(**{**TINY_MODEL_KWARGS, "threshold": "good_fpr", "target_fpr": 0.05, "max_epochs": 2})
    engine = ContinualEngine(output_dir=tmp_path / "run", enable_progress_bar=False, overlays_per_task=0)
    results = engine.run(model, [datamodule])
    assert results["tasks"] == ["bottle_line"]  # a Folder's name, not task_0
    stats = model.post_processor.stats_of(0)
    assert all(torch.isfinite(torch.tensor(value)) for value in stats.values()), stats
    assert stats["image_min"] <= stats["image_threshold"]
    assert 0.0 <= results["good_flagged"]["bottle_line"] <= 1.0  # reported per task
    assert "Good test images labelled anomalous" in (tmp_path / "run" / "results.md").read_text()
    # thresholds from held-out good images cannot be fitted again for other scoring settings: refused at once
    blurred = MoleFlow.continue_from(tmp_path / "run" / "model.ckpt", anomaly_map_sigma=2.0)
    again = ContinualEngine(output_dir=tmp_path / "again", enable_progress_bar=False, overlays_per_task=0)
    with pytest.raises(ValueError, match=r"held-out good images \(threshold='good_fpr'\) cannot be fitted again"):
        again.run(blurred, [datamodule])
    assert not (tmp_path / "again").exists()


def test_good_fpr_holds_images_out_of_training_and_sets_the_threshold_from_them(
    tiny_mvtec_root: Path, tmp_path: Path
) -> None:
    from anomalib.engine import Engine

    seed_everything(0, verbose=False)
    model = MoleFlow(**{**TINY_MODEL_KWARGS, "threshold": "good_fpr", "target_fpr": 0.2})
    model.add_task(TINY_CATEGORIES[0])
    trained: list[str] = []
    step = model.training_step

    def spy(batch, *args, **kwargs):
        held = set(model._held_out)
        trained.extend(str(path) for path in batch.image_path if str(path) not in held)
        return step(batch, *args, **kwargs)

    model.training_step = spy
    held_scores: list[torch.Tensor] = []
    set_stats = model.post_processor.set_good_statistics

    def record(task, scores, maps, fpr, *rest):
        held_scores.append(scores.detach().clone())
        return set_stats(task, scores, maps, fpr, *rest)

    model.post_processor.set_good_statistics = record
    calibrated: list[int] = []
    fit_calibration = model.model.fit_calibration

    def count(task, sums, map_sums, images):
        calibrated.append(images)
        assert not held_scores  # the score statistics come before the thresholds that use them
        return fit_calibration(task, sums, map_sums, images)

    model.model.fit_calibration = count
    Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu").fit(
        model, datamodule=_tasks(tiny_mvtec_root)[0]
    )
    (scores,) = held_scores
    assert len(scores) == 2  # every 4th of the 8 training images (at least 2 held out)
    assert len(set(trained)) == 6  # the held-out ones never trained the flow
    assert calibrated == [6]  # nor the score statistics, fitted once (no validation in this mode: at the fit's end)
    threshold = model.post_processor.stats_of(0)["image_threshold"]
    expected = (
        scores.double().mean() + torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.8)) * scores.double().std()
    )
    assert threshold == pytest.approx(float(expected), rel=1e-4)  # 2 scores < 1 / 0.2: the Gaussian tail


def test_held_out_calibration_fits_the_statistics_on_images_the_flow_never_trained_on(
    tiny_mvtec_root: Path, tmp_path: Path
) -> None:
    from anomalib.engine import Engine
    from einops import rearrange

    seed_everything(0, verbose=False)
    model = MoleFlow(**{**TINY_MODEL_KWARGS, "score_calibration": "held_out", "average_last": 0.5})
    model.add_task(TINY_CATEGORIES[0])
    trained: set[str] = set()
    held: set[str] = set()
    step = model.training_step

    def spy(batch, *args, **kwargs):
        held.update(model._held_out)
        trained.update(str(path) for path in batch.image_path if str(path) not in model._held_out)
        return step(batch, *args, **kwargs)

    model.training_step = spy
    calibrated: list[int] = []
    fit_calibration = model.model.fit_calibration

    def count(task, sums, map_sums, images):
        calibrated.append(images)
        return fit_calibration(task, sums, map_sums, images)

    model.model.fit_calibration = count
    datamodule = _tasks(tiny_mvtec_root)[0]
    Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu").fit(
        model, datamodule=datamodule
    )
    assert (len(held), len(trained)) == (2, 6)  # every 4th of the 8 training images (a fifth, at least 2)
    assert not held & trained  # the held-out ones never trained the flow
    assert calibrated  # the statistics come from the held-out images only
    assert set(calibrated) == {2}
    assert model.post_processor.stats_of(0)["image_threshold"] is not None  # f1 thresholds still from validation
    inner = model.model.eval()
    images = [
        model.pre_processor.transform(batch.image[[str(p) in held for p in batch.image_path]])
        for batch in datamodule.train_dataloader()
    ]
    with torch.no_grad():
        outputs = inner.train_patches(inner.embed(torch.cat(images))[0], 0)  # the task's final weights
    assert len(inner.paths) == 2  # the default: one flow per stage
    for path, (nll, _) in zip(inner.paths, outputs, strict=True):  # each stage's statistics
        nll = rearrange(nll, "b (h w) -> b h w", h=path.grid[0])
        torch.testing.assert_close(path.calibrations[0].mean, nll.mean(0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(path.calibrations[0].std, nll.std(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"score_calibration": "held_out"}, "score_calibration='held_out' holds out"),
        ({"score_calibration": "held_out", "threshold": "good_fpr"}, "threshold='good_fpr' and score_calibration="),
    ],
)
def test_holding_images_out_of_too_few_says_which_setting_and_what_to_do(
    settings: dict[str, str], named: str, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    model = MoleFlow(**{**TINY_MODEL_KWARGS, **settings})
    samples = SimpleNamespace(image_path=[str(tmp_path / f"{i}.png") for i in range(3)])
    model._trainer = SimpleNamespace(train_dataloader=SimpleNamespace(dataset=SimpleNamespace(samples=samples)))
    with pytest.raises(ValueError, match="at least 4 training images with paths, got 3") as error:
        model.on_train_start()
    assert named in str(error.value)
    assert "score_calibration='position'" in str(error.value)


def test_f1_threshold_stays_anomalibs(tiny_mvtec_root: Path) -> None:
    model = MoleFlow(**TINY_MODEL_KWARGS)
    assert model.threshold == "f1"
    assert "limit_val_batches" not in model.trainer_arguments


# ------------------------------------------------------------------------------------------------------ damage
def test_a_checkpoint_without_its_checksum_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from anomalib_moleflow.checkpoint import read_checkpoint

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(2)}}, path)
    with caplog.at_level(logging.WARNING, logger="anomalib_moleflow"):
        read_checkpoint(path)
    assert "no checksum" in caplog.text


def test_a_damaged_weight_never_becomes_a_csv_score(lr_checkpoint: Path, tiny_mvtec_root: Path, tmp_path: Path) -> None:
    from anomalib_moleflow.cli.main import main

    checkpoint = torch.load(lr_checkpoint, map_location="cpu", weights_only=False)
    dia = "model.paths.0.dias.0"
    key = next(name for name in checkpoint["state_dict"] if name.startswith(dia) and "weight" in name)
    checkpoint["state_dict"][key].view(-1)[0] = 3.26e37  # one flipped exponent bit: finite, but absurd
    damaged = tmp_path / "damaged.ckpt"
    torch.save(checkpoint, damaged)  # no checksum beside it
    folder = tmp_path / "in"
    folder.mkdir()
    for image in sorted((tiny_mvtec_root / TINY_CATEGORIES[0] / "test" / "good").glob("*.png"))[:2]:
        (folder / image.name).write_bytes(image.read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt", str(damaged), "--input", str(folder), "--output", str(tmp_path / "p"),
              "--progress_bar", "false", "--overlays", "false"])  # fmt: skip
    assert exit_info.value.code == 1
    rows = (tmp_path / "p" / "predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == 2
    assert all("non-finite score" in row and ",inf," not in row for row in rows)


# ------------------------------------------------------------------------------------------------------ README
def test_the_readme_python_snippet_runs_as_written(tiny_mvtec_root: Path, tmp_path: Path, monkeypatch) -> None:
    import re

    import anomalib.data
    import anomalib.engine

    import anomalib_moleflow

    snippet = re.search(r"```python\n(from anomalib.data import MVTecAD.*?)```", (REPO / "README.md").read_text(), re.S)
    assert snippet, "the README's Python example"
    code = snippet.group(1)
    # The snippet as written; only what a 2-core test cannot have is swapped: MVTec AD -> the generated tiny data,
    # WRN50 -> the tiny random backbone, a quiet CPU Engine.
    tiny_data = lambda category, **_: MVTecAD(  # noqa: E731
        root=tiny_mvtec_root, category={"bottle": TINY_CATEGORIES[0], "cable": TINY_CATEGORIES[1]}[category],
        train_batch_size=4, eval_batch_size=8, num_workers=0,
    )  # fmt: skip
    monkeypatch.setattr(anomalib.data, "MVTecAD", tiny_data)
    engine = anomalib.engine.Engine
    monkeypatch.setattr(
        anomalib.engine,
        "Engine",
        lambda **kw: engine(**{"default_root_dir": str(tmp_path), "logger": False, "enable_progress_bar": False, **kw}),
    )
    original = anomalib_moleflow.MoleFlow
    monkeypatch.setattr(anomalib_moleflow, "MoleFlow", type("MoleFlow", (original,), {
        "__init__": lambda self, **kw: original.__init__(self, **{**TINY_MODEL_KWARGS, **kw}),
    }))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "model.ckpt").is_file()
    assert namespace["model"].task_names == ["bottle", "cable"]
    assert json.dumps(namespace["model"].task_names)

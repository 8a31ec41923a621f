"""Speed features change no result: the training feature cache (memory, disk, fp16, bypassed for random
transforms) and validation once after the last epoch. Behaviour only; the timings are in scripts/benchmarks."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torchvision.transforms import v2

from anomalib_moleflow import MoleFlow
from anomalib_moleflow.compat import is_compiled
from anomalib_moleflow.models.moleflow.components.feature_cache import FeatureCache, is_random, random_transform

from conftest import TINY_CATEGORIES, TINY_MODEL_KWARGS

EPOCHS = 3


def _fit(root: Path, work: Path, augment: bool = False, **overrides: Any) -> tuple[MoleFlow, dict[str, int]]:
    """Fit one task for EPOCHS epochs; count backbone passes during training and validation steps."""
    seed_everything(0, verbose=False)
    model = MoleFlow(**{**TINY_MODEL_KWARGS, "max_epochs": EPOCHS, **overrides})
    model.add_task(TINY_CATEGORIES[0])
    counts = {"backbone_in_training": 0, "validation_steps": 0}

    def count_backbone(*_: Any) -> None:
        counts["backbone_in_training"] += int(model.trainer.training)

    model.model.feature_extractor.register_forward_hook(count_backbone)
    validation_step = model.validation_step

    def counting_validation_step(*args: Any, **kwargs: Any) -> Any:
        counts["validation_steps"] += 1
        return validation_step(*args, **kwargs)

    model.validation_step = counting_validation_step  # type: ignore[method-assign]
    augmentations = v2.RandomHorizontalFlip() if augment else None
    datamodule = MVTecAD(
        root=root,
        category=TINY_CATEGORIES[0],
        train_batch_size=4,
        eval_batch_size=8,
        num_workers=0,
        train_augmentations=augmentations,
    )
    engine = Engine(default_root_dir=work, enable_progress_bar=False, logger=False, enable_model_summary=False)
    engine.fit(model, datamodule=datamodule)
    return model, counts


@pytest.fixture(scope="module")
def uncached(tiny_mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[MoleFlow, dict[str, int]]:
    return _fit(tiny_mvtec_root, tmp_path_factory.mktemp("off"), feature_cache="off")


def _same_weights(a: MoleFlow, b: MoleFlow, atol: float) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            assert torch.allclose(x, y, atol=atol, rtol=0), name


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_feature_cache_trains_the_same_weights_with_one_backbone_pass_per_image(
    uncached: tuple[MoleFlow, dict[str, int]], tiny_mvtec_root: Path, tmp_path: Path, mode: str
) -> None:
    reference, reference_counts = uncached
    model, counts = _fit(tiny_mvtec_root, tmp_path, feature_cache=mode)
    _same_weights(model, reference, atol=1e-5)
    batches_per_epoch = reference_counts["backbone_in_training"] // EPOCHS  # 8 images, batch 4
    assert batches_per_epoch == 2
    assert counts["backbone_in_training"] == batches_per_epoch  # the first epoch only
    assert not list(tmp_path.rglob("moleflow_features_*"))  # the disk cache is deleted after the fit


def test_fp16_cache_stays_close(
    uncached: tuple[MoleFlow, dict[str, int]], tiny_mvtec_root: Path, tmp_path: Path
) -> None:
    model, counts = _fit(tiny_mvtec_root, tmp_path, feature_cache="memory", feature_cache_dtype="float16")
    assert counts["backbone_in_training"] == 2
    _same_weights(model, uncached[0], atol=5e-2)


def test_random_training_transforms_bypass_the_cache(
    uncached: tuple[MoleFlow, dict[str, int]], tiny_mvtec_root: Path, tmp_path: Path
) -> None:
    _, counts = _fit(tiny_mvtec_root, tmp_path, augment=True, feature_cache="memory")
    assert counts["backbone_in_training"] == uncached[1]["backbone_in_training"] == 2 * EPOCHS
    assert is_random(v2.Compose([v2.Resize(8), v2.RandomHorizontalFlip()]))
    assert is_random(v2.RandomApply([v2.Grayscale()]))  # a random wrapper of a deterministic transform
    assert is_random(v2.Compose([v2.GaussianBlur(3)]))  # draws its sigma
    assert not is_random(v2.Compose([v2.Resize(8), v2.Normalize([0.5], [0.5])]))


class _Jitter(v2.Transform):
    """A user's own random transform: its name says nothing."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        del params
        return inpt + 0.01 * torch.randn_like(inpt)


def test_only_transforms_known_to_be_deterministic_allow_the_cache() -> None:
    assert is_random(v2.Compose([v2.Resize(8), _Jitter()]))  # unknown: treated as random
    assert is_random(v2.Compose([v2.Resize(8), v2.JPEG((50, 90))]))  # draws a quality, name without "Random"
    assert is_random(v2.Lambda(lambda image: image))
    assert is_random(torch.nn.Sequential(v2.Resize(8), v2.RandomHorizontalFlip()))
    assert not is_random(
        v2.Compose([v2.Resize(8), v2.CenterCrop(6), v2.ToDtype(torch.float32), v2.Normalize([0.5], [0.5])])
    )
    assert not is_random(None)
    assert random_transform(v2.Compose([v2.Resize(8), v2.Compose([v2.CenterCrop(6), _Jitter()])])) == "_Jitter"
    assert not is_random(MoleFlow.configure_pre_processor((64, 64)).transform)  # anomalib's default: cached


def test_validation_runs_once_after_the_last_epoch(uncached: tuple[MoleFlow, dict[str, int]]) -> None:
    # 12 validation images (same as test), batch 8: 2 batches, once, not once per epoch.
    assert uncached[1]["validation_steps"] == 2


def test_disk_cache_roundtrip(tmp_path: Path) -> None:
    cache = FeatureCache(3, mode="disk", folder=tmp_path)
    values = torch.randn(2, 2, 2, 4)
    cache.put(["a", "b"], values)
    assert cache.get(["a", "c"], torch.device("cpu")) is None
    assert torch.equal(cache.get(["b", "a"], torch.device("cpu")), values[[1, 0]])
    cache.close()
    assert not list(tmp_path.iterdir())


def _continual(root: Path, output: Path, feature_cache: str) -> tuple[dict[str, Any], int]:
    """A 3-task run; returns its results and the backbone passes made while testing."""
    from anomalib_moleflow.engine import ContinualEngine

    seed_everything(0, verbose=False)
    model = MoleFlow(**{**TINY_MODEL_KWARGS, "feature_cache": feature_cache})
    passes = [0]

    def count(*_: Any) -> None:
        with contextlib.suppress(RuntimeError):  # raised when not attached to a trainer (between fits)
            passes[0] += int(model.trainer.testing)

    model.model.feature_extractor.register_forward_hook(count)
    tasks = [
        MVTecAD(root=root, category=c, train_batch_size=4, eval_batch_size=8, num_workers=0) for c in TINY_CATEGORIES
    ]
    engine = ContinualEngine(output_dir=output, enable_progress_bar=False, overlays_per_task=0)
    return engine.run(model, tasks), passes[0]


def test_continual_matrix_scores_each_test_image_once_with_the_same_results(
    tiny_mvtec_root: Path, tmp_path: Path
) -> None:
    cached, cached_passes = _continual(tiny_mvtec_root, tmp_path / "cached", "memory")
    plain, plain_passes = _continual(tiny_mvtec_root, tmp_path / "plain", "off")
    assert cached["matrix"] == plain["matrix"]
    assert cached["routing_matrix"] == plain["routing_matrix"]
    batches = 2  # 12 test images per task, batch 8
    assert plain_passes == (1 + 2 + 3) * batches  # every seen task re-tested after each new one
    assert cached_passes == 3 * batches  # each test image once for the whole run


def test_mixed_precision_runs_and_is_recorded(tiny_mvtec_root: Path, tmp_path: Path) -> None:
    from anomalib_moleflow.engine import ContinualEngine

    seed_everything(0, verbose=False)
    tasks = [MVTecAD(root=tiny_mvtec_root, category=TINY_CATEGORIES[0], num_workers=0, train_batch_size=4)]
    engine = ContinualEngine(
        output_dir=tmp_path, enable_progress_bar=False, overlays_per_task=0, precision="bf16-mixed"
    )
    results = engine.run(MoleFlow(**TINY_MODEL_KWARGS), tasks)
    assert results["config"]["engine"]["precision"] == "bf16-mixed"
    assert 0.0 <= results["final"]["image_AUROC"] <= 1.0


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compile_mode_trains_the_same_weights_and_keeps_checkpoint_keys(
    tiny_mvtec_root: Path, tmp_path: Path, uncached: tuple[MoleFlow, dict[str, int]]
) -> None:
    compiled, _ = _fit(tiny_mvtec_root, tmp_path, feature_cache="off", compile_mode="default")
    assert is_compiled(compiled.model.feature_extractor)
    assert is_compiled(compiled.model.flows[0].blocks)
    _same_weights(uncached[0], compiled, atol=1e-4)
    assert list(compiled.state_dict()) == list(uncached[0].state_dict())  # same checkpoint layout


def test_unknown_compile_mode_is_refused() -> None:
    with pytest.raises(
        ValueError, match="compile_mode must be 'off', 'default', 'reduce-overhead' or 'max-autotune', got"
    ):
        MoleFlow(**{**TINY_MODEL_KWARGS, "compile_mode": "fast"})


@pytest.mark.parametrize(
    ("name", "value"), [("feature_cache", "ram"), ("feature_cache_dtype", "bfloat16"), ("threshold", "youden")]
)
def test_unknown_cache_and_threshold_settings_are_refused(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be '.+' or '.+', got '{value}'"):
        MoleFlow(**{**TINY_MODEL_KWARGS, name: value})


@pytest.mark.parametrize("profile", ["mvtec", "lite0", "smoke"])
@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_every_command_of_the_one_command_benchmark_is_accepted_by_its_script(profile: str, device: str) -> None:
    """``run_all.py`` passes each script its flags: a renamed or missing flag would only fail on the GPU machine."""
    import importlib.util

    folder = Path(__file__).resolve().parents[1] / "scripts" / "benchmarks"

    def load(name: str) -> Any:
        spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), folder / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    run_all = load("run_all.py")
    options = run_all.argparse.Namespace(device=device, profile=profile, pre_trained=0, epochs=3, threads=2)
    commands = run_all.commands(options)
    scripts = [argv[0] for _, argv in commands]
    assert {"speed_memory.py", "task_scaling.py", "deploy_speed.py", "stream_memory.py"} <= set(scripts)
    assert ("The same with torch.compile" in dict(commands)) == (device == "cuda")
    for _, argv in commands:
        parsed = vars(load(argv[0]).parse_args(argv[1:]))  # exits (SystemExit) on an unknown flag
        if "image_size" in parsed:
            assert parsed["image_size"] == int(run_all.PROFILES[profile]["model"][-1])


def test_inference_timing_counts_the_fastest_of_its_passes() -> None:
    """A pass slowed by other work on the machine does not set the figure: the fastest of the repeats does."""
    import time

    from anomalib_moleflow.benchmark.measure import inference_ms_per_image

    class SlowOnce(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            time.sleep(0.2 if self.calls == 2 else 0.01)  # call 1: the warm-up; call 2: the first timed pass
            return images

    images = torch.zeros(4, 3, 8, 8)  # one batch of 4 per pass: 0.2 s is 50 ms per image, 0.01 s is 2.5
    module = SlowOnce()
    assert inference_ms_per_image(module, images, batch_size=4) < 10.0
    assert module.calls == 4  # the warm-up and three passes
    assert inference_ms_per_image(SlowOnce(), images, batch_size=4, repeats=1) >= 50.0  # the slow pass alone

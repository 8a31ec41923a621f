"""Pins every assumption :mod:`anomalib_moleflow.compat` makes about anomalib's private attributes."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from anomalib.post_processing import PostProcessor

from anomalib_moleflow.compat import (
    POST_PROCESSOR_BUFFERS,
    apply_threshold,
    normalize,
    reset_memory_bank,
    set_single_statistics,
)


def test_post_processor_single_set_buffers() -> None:
    post = PostProcessor()
    values = torch.tensor([0.4, 0.6, 0.1, 0.9, 0.2, 0.8])
    set_single_statistics(post, values)
    buffers = dict(post.named_buffers())
    assert torch.equal(torch.stack([buffers[name] for name in POST_PROCESSOR_BUFFERS]), values)
    # anomalib's public properties read these very buffers
    assert post.image_threshold == 0.4
    assert post.pixel_threshold == 0.6


def test_normalize_maps_threshold_to_half_and_clips() -> None:
    values = torch.tensor([0.0, 1.0, 2.0, 5.0, 9.0])
    out = normalize(values, torch.tensor(1.0), torch.tensor(5.0), torch.tensor(2.0))
    assert out[2] == 0.5
    assert out.min() >= 0.0
    assert out.max() <= 1.0
    assert torch.all(out[1:] >= out[:-1])


def test_apply_threshold_is_strictly_greater() -> None:
    assert apply_threshold(torch.tensor([0.4, 0.5, 0.6]), torch.tensor(0.5)).tolist() == [False, False, True]


def test_padim_default_features_are_anomalibs() -> None:
    from anomalib.models.image.padim.torch_model import PadimModel

    from anomalib_moleflow.compat import padim_default_features

    assert padim_default_features("resnet18") == PadimModel("resnet18", pre_trained=False).n_features == 100
    assert padim_default_features("tf_efficientnet_lite0") is None


def _patchcore() -> Any:
    from anomalib_moleflow.baselines import TimmPatchcore

    torch.manual_seed(0)  # the same random backbone in every model, so that banks of one task compare equal
    return TimmPatchcore(
        backbone="resnet18", layers=("layer2",), pre_trained=False, image_size=64, coreset_sampling_ratio=1.0
    )


def _bank(model: Any) -> torch.Tensor:
    """The memory bank's rows in a fixed order (training batches are shuffled)."""
    bank = model.model.memory_bank.detach().clone()
    return bank[bank.sum(dim=1).argsort()]


def test_patchcore_fits_its_bank_once_and_reset_makes_it_fit_again(
    tiny_mvtec_root: Path, tiny_categories: tuple[str, ...], make_datamodule: Any, make_engine: Any, tmp_path: Path
) -> None:
    """anomalib's ``_is_fitted`` pin, with real fits: a second fit keeps the first bank; a reset rebuilds it."""
    first, second = tiny_categories[:2]
    model = _patchcore()
    make_engine(tmp_path / "a", max_epochs=1).fit(model, datamodule=make_datamodule(tiny_mvtec_root, first))
    assert bool(model._is_fitted)
    bank_first = _bank(model)
    make_engine(tmp_path / "b", max_epochs=1).fit(model, datamodule=make_datamodule(tiny_mvtec_root, second))
    assert torch.equal(_bank(model), bank_first)  # anomalib fits once: the reason reset_memory_bank exists
    reset_memory_bank(model)
    make_engine(tmp_path / "c", max_epochs=1).fit(model, datamodule=make_datamodule(tiny_mvtec_root, second))
    alone = _patchcore()
    make_engine(tmp_path / "d", max_epochs=1).fit(alone, datamodule=make_datamodule(tiny_mvtec_root, second))
    assert not torch.equal(_bank(model), bank_first)
    torch.testing.assert_close(_bank(model), _bank(alone))  # the second task's own bank, as a fresh model builds it


def test_finetune_patchcore_rebuilds_its_bank_on_every_task(
    tiny_mvtec_root: Path, tiny_categories: tuple[str, ...], make_datamodule: Any, tmp_path: Path
) -> None:
    from anomalib_moleflow.data.tasks import Task
    from anomalib_moleflow.engine.strategies import FinetuneStrategy
    from anomalib_moleflow.engine.trainer import TaskTrainer

    strategy = FinetuneStrategy(_patchcore, "patchcore")
    trainer = TaskTrainer(accelerator="cpu", progress_bar=False)
    banks = []
    for index, category in enumerate(tiny_categories[:2]):
        task = Task(category, make_datamodule(tiny_mvtec_root, category))
        strategy.learn(index, task, trainer, tmp_path / category)
        banks.append(_bank(strategy.model))
    alone = _patchcore()
    TaskTrainer(accelerator="cpu", progress_bar=False).fit(
        alone, make_datamodule(tiny_mvtec_root, tiny_categories[1]), tmp_path / "alone"
    )
    assert not torch.equal(banks[0], banks[1])
    torch.testing.assert_close(banks[1], _bank(alone))


def test_extra_state_key_is_the_key_torch_saves_extra_state_under() -> None:
    from anomalib_moleflow.compat import extra_state_key

    class WithExtra(torch.nn.Module):
        def get_extra_state(self) -> dict[str, int]:
            return {"x": 1}

        def set_extra_state(self, state: dict[str, int]) -> None:
            del state

    parent = torch.nn.Module()
    parent.model = WithExtra()
    assert parent.state_dict()[extra_state_key("model.")] == {"x": 1}


def test_benchmark_pipeline_runs_anomalibs_pipeline_with_our_jobs(monkeypatch: Any) -> None:
    """anomalib's Benchmark asks ``_setup_runners`` for its runners; ours hand out our generator's jobs."""
    from anomalib.pipelines import Benchmark as AnomalibBenchmark
    from anomalib.pipelines.components.runners import ParallelRunner, SerialRunner

    from anomalib_moleflow.benchmark.anomalib_pipeline import Benchmark, BenchmarkJob, BenchmarkJobGenerator

    assert issubclass(Benchmark, AnomalibBenchmark)
    assert isinstance(inspect.getattr_static(AnomalibBenchmark, "_setup_runners"), staticmethod)
    assert "_setup_runners" in inspect.getsource(AnomalibBenchmark.run)  # the hook anomalib's run() calls
    (runner,) = Benchmark._setup_runners({"accelerator": "cpu"})
    assert isinstance(runner, SerialRunner)
    assert isinstance(runner.generator, BenchmarkJobGenerator)
    assert runner.generator.job_class is BenchmarkJob
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    (parallel,) = Benchmark._setup_runners({"accelerator": ["cuda"]})
    assert isinstance(parallel, ParallelRunner)
    assert isinstance(parallel.generator, BenchmarkJobGenerator)

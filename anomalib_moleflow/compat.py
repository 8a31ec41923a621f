"""Every use of anomalib's private attributes, in one place (each assumption is pinned by ``tests/test_compat.py``).

anomalib 2.7 has no public API for these:

* ``PostProcessor``: its single set of statistics (``_image_threshold``, ``_pixel_threshold``, ``image_min`` ...),
  its min-max normalisation ``_normalize`` and thresholding ``_apply_threshold``. :class:`TaskPostProcessor` keeps
  one set per task and reuses anomalib's arithmetic instead of re-deriving it.
* ``padim.torch_model._N_FEATURES_DEFAULTS``: the channels Padim keeps per backbone (``None`` for others).
* torch's, not anomalib's: ``nn.Module.compile``'s in-place wrapper ``_compiled_call_impl`` (no public way to undo
  it; exporters can neither pickle nor trace it) and ``torch._dynamo.config.cache_size_limit`` (raised in a context).
* ``MemoryBankMixin`` (Patchcore): ``_is_fitted``, and ``PatchcoreModel.embedding_store``. A fitted Patchcore never
  refits; retraining it on a new task (the fine-tuning baseline) needs both reset.
* ``pipelines.Benchmark._setup_runners`` (static): the only place that names the benchmark's job generator, which
  :func:`benchmark_pipeline` replaces (anomalib's runners kept: serial, or one per GPU).
* torch's ``_EXTRA_STATE_KEY_SUFFIX``: the state-dict key of a module's ``get_extra_state`` (a checkpoint's settings
  are read from it before any model is built).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from anomalib.models import Patchcore
from anomalib.models.image.padim import torch_model as padim_torch_model
from anomalib.post_processing import PostProcessor


def extra_state_key(prefix: str) -> str:
    """The state-dict key of the extra state of the module at ``prefix`` (e.g. ``"model."``)."""
    return prefix + torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX


#: PostProcessor buffers holding its single set of statistics, in the order of ``TaskPostProcessor``'s columns.
POST_PROCESSOR_BUFFERS: tuple[str, ...] = (
    "_image_threshold",
    "_pixel_threshold",
    "image_min",
    "image_max",
    "pixel_min",
    "pixel_max",
)


def set_single_statistics(post_processor: PostProcessor, values: torch.Tensor) -> None:
    """Copy six statistics (order of :data:`POST_PROCESSOR_BUFFERS`) into anomalib's single-set buffers."""
    for name, value in zip(POST_PROCESSOR_BUFFERS, values, strict=True):
        getattr(post_processor, name).copy_(value)


def normalize(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """anomalib's min-max normalisation: ``low`` -> 0, ``threshold`` -> 0.5, ``high`` -> 1, clipped to [0, 1]."""
    return PostProcessor._normalize(values, low, high, threshold)


def apply_threshold(values: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """anomalib's thresholding (``values > threshold``)."""
    return PostProcessor._apply_threshold(values, threshold)


def reset_memory_bank(model: Patchcore) -> None:
    """Let the next ``fit`` of a Patchcore build a new memory bank from its own data (replacing the current one)."""
    model.model.embedding_store.clear()
    model._is_fitted = torch.tensor([False], device=model._is_fitted.device)


def uncompile(model: torch.nn.Module) -> None:
    """Undo ``nn.Module.compile`` on ``model`` and its submodules (they run eagerly again)."""
    for module in model.modules():
        module._compiled_call_impl = None


def compile_cache_limit(limit: int) -> AbstractContextManager[None]:
    """Inside the block, dynamo recompiles a module up to ``limit`` times (at least its default) before giving up."""
    return torch._dynamo.config.patch(cache_size_limit=max(limit, torch._dynamo.config.cache_size_limit))


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module.compile()`` was called on ``module`` (and not undone)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def padim_default_features(backbone: str) -> int | None:
    """Channels anomalib's Padim keeps for ``backbone`` when ``n_features`` is not given (``None``: no default)."""
    return padim_torch_model._N_FEATURES_DEFAULTS.get(backbone)


def benchmark_pipeline(job_generator: type) -> type:
    """anomalib's ``Benchmark`` pipeline whose jobs come from ``job_generator(accelerator)``.

    anomalib's own runner choice is kept: a ``SerialRunner`` on the CPU or one GPU, a ``ParallelRunner`` with one job
    per GPU otherwise.
    """
    from anomalib.pipelines import Benchmark
    from anomalib.pipelines.components.runners import ParallelRunner, SerialRunner

    def setup_runners(args: dict[str, Any]) -> list[Any]:
        accelerators = args["accelerator"] if isinstance(args["accelerator"], list) else [args["accelerator"]]
        runners: list[Any] = []
        for accelerator in accelerators:
            if accelerator not in {"cpu", "cuda"}:
                msg = f"Unsupported accelerator: {accelerator}. Use 'cpu' or 'cuda'."
                raise ValueError(msg)
            device_count = torch.cuda.device_count()
            if device_count <= 1 or accelerator == "cpu":
                runners.append(SerialRunner(job_generator(accelerator)))
            else:
                runners.append(ParallelRunner(job_generator(accelerator), n_jobs=device_count))
        return runners

    return type("Benchmark", (Benchmark,), {"_setup_runners": staticmethod(setup_runners)})

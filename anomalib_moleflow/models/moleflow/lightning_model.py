"""MoLE-Flow as an anomalib ``AnomalibModule``: continual normalizing-flow anomaly detection.

Example:
    >>> from anomalib.data import MVTecAD
    >>> from anomalib.engine import Engine
    >>> from anomalib_moleflow import MoleFlow
    >>> model = MoleFlow()
    >>> for category in ("bottle", "cable"):
    ...     model.add_task(category)
    ...     Engine().fit(model, datamodule=MVTecAD(category=category))  # a new Engine per task
"""

from __future__ import annotations

import logging
import pickle
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
from anomalib import LearningType
from anomalib.data import Batch, InferenceBatch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.visualization import Visualizer
from einops import rearrange
from lightning.pytorch import Callback
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn, optim

from anomalib_moleflow.checkpoint import check_finite_state, read_checkpoint
from anomalib_moleflow.compat import compile_cache_limit, extra_state_key, is_compiled
from anomalib_moleflow.distributed import gather_objects, world_size
from anomalib_moleflow.metrics import default_evaluator

from .anomaly_map import likelihood_map_value
from .callbacks import (
    FitScope,
    TaskScoreCalibration,
    TaskStatisticsFitting,
    TaskWeightAveraging,
    TrainingFeatureCache,
    training_cache,
    true_tasks,
)
from .components.feature_cache import FeatureCache
from .components.router import Routed, RoutingLog, RoutingRecorder
from .loss import MoleFlowLoss
from .post_processor import GOOD_IMAGES, TaskPostProcessor
from .settings import (
    INTRODUCED_SETTINGS,
    RUNTIME_SETTINGS,
    SPEED_SETTINGS,
    AnomalyMapValue,
    ArchitectureSettings,
    CacheDtype,
    CacheMode,
    CompileMode,
    FlowLayout,
    RouterCovariance,
    RouterEmbedding,
    ScoreCalibration,
    ThresholdMode,
    WhiteningNorms,
    check,
    check_choice,
    defaults,
    differences,
    names,
    select,
)
from .torch_model import MoleFlowModel

logger = logging.getLogger(__name__)

NEWEST_TASK = -1
"""``MoleFlow.fitting()`` without a task: the fit trains the newest task (resolved when the fit reads it)."""

#: ONNX opset of exports (the lowest that torch's exporter writes natively).
ONNX_OPSET = 18


class _DropLitmodelsTip(logging.Filter):
    """Lightning's product tip (litmodels) printed at every fit: no advice for a MoLE-Flow user."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop the tip, keep everything else."""
        return "litmodels" not in record.getMessage()


def _quiet_what_moleflow_causes() -> None:
    """Silence, narrowly, the notices that MoLE-Flow itself provokes in every fit.

    The frozen backbone stays in eval mode on purpose (frozen batch-norm statistics), which Lightning reports at the
    start of every fit; and Lightning's litmodels tip. Only these two messages; everything else stays as it is.
    """
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLitmodelsTip) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLitmodelsTip())


_quiet_what_moleflow_causes()

#: Share of a task's good training images held out of training to set its thresholds (``threshold="good_fpr"``).
HELD_OUT_SHARE = 0.1
#: Share held out with ``score_calibration="held_out"``: enough images for a standard deviation at every position
#: (11 of MPDD's 54), most of them still training the flow. With ``good_fpr`` too, the same images serve both.
CALIBRATION_SHARE = 0.2


class ScoredImages(NamedTuple):
    """What :meth:`MoleFlow.score_images` returns.

    Attributes:
        raw: Raw predictions (patch-NLL scores and maps).
        final: Post-processed predictions (normalised with each image's task, unknown products marked).
        routed: Each image's task, router distance and unknown-product flag.
    """

    raw: InferenceBatch
    final: InferenceBatch
    routed: Routed


#: The settings that define what a checkpoint's weights mean (and the runtime ones among them).
ARCHITECTURE_NAMES: frozenset[str] = frozenset(names(ArchitectureSettings))


def _saved_hyper_parameters(checkpoint: str | Path | IO[bytes], weights_only: bool | None) -> dict[str, Any] | None:
    """The ``hyper_parameters`` a checkpoint file was saved with (memory-mapped: the weights are not read), unpickled
    under the same ``weights_only`` as Lightning's loading then uses; ``None`` for a stream or a file that cannot be
    read so (Lightning's own loading reports it)."""
    if not isinstance(checkpoint, str | Path):
        return None
    try:
        saved = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=weights_only)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError):
        return None
    return dict(saved.get("hyper_parameters", {})) if isinstance(saved, dict) else None


class MoleFlow(AnomalibModule):
    """MoLE-Flow: a frozen normalizing flow per backbone stage, a low-rank expert per task, and a router.

    Tasks are added with :meth:`add_task`; each ``fit`` trains the latest task. When ``fit`` runs on a model with no
    task (e.g. ``anomalib train``), the fit's callback :class:`~.callbacks.FitScope` adds one named after the
    datamodule's category. At test and predict time every image is routed to its task; a batch that carries its
    images' true tasks (the :class:`~.callbacks.OracleRouting` callback, the study's oracle mode) or
    ``score_images(images, tasks=...)`` uses those instead.

    The architecture arguments are those of :class:`MoleFlowModel` (documented there); this class adds training,
    loss and anomalib's components.

    Args:
        backbone: timm backbone (frozen).
        layers: Backbone stages used for the patch embedding.
        pre_trained: Load ImageNet weights into the backbone.
        image_size: Input side length; the pre-processor resizes to it.
        embed_dim: Patch embedding size D (multiple of 4); ``None``: from the backbone's channels, at most 768.
        patch_size: Local averaging window of the patch embedding (odd; 1: none).
        num_coupling_layers: MoLE coupling blocks (0: DIA only).
        dia_blocks: DIA blocks per task (0: MoLE only).
        lora_rank: LoRA rank of the experts.
        use_lora: Low-rank experts; ``False``: per-task full-rank linear.
        use_whitening_adapter: Per-task whitening adapter.
        whitening_norm: The whitening LayerNorm normalises each ``image`` (its patches and channels together, as
            anomalib's Fastflow) or each ``patch`` (the study's), or one of these per stage (``flow_layout="stage"``),
            or several for one stage (a flow per norm); see :class:`MoleFlowModel`.
        use_pos_embedding: 2D sinusoidal positional embedding.
        spatial_context_kernel: Shared spatial context kernel (0: off).
        scale_context_kernel: Scale context kernel inside each coupling subnet (0: off).
        tail_weight: Weight of the tail term of the loss.
        tail_top_k_ratio: Fraction of patches in the tail term.
        lambda_logdet: Weight of the log-determinant regulariser.
        score_aggregation_top_k: Image score = mean of the k highest patch scores.
        anomaly_map_sigma: Standard deviation of the anomaly map's Gaussian blur in pixels (0: no blur).
        score_calibration: ``position``: each task's patch scores standardised at every grid position by its good
            training images' statistics there (fitted after the task trains, :class:`~.callbacks.TaskScoreCalibration`);
            ``held_out``: the same, with statistics from :data:`CALIBRATION_SHARE` of the task's good training images
            held out of its training (unseen images, as the test's); ``none``: the flow's NLL (the study's). Any
            checkpoint loads with any of them.
        anomaly_map_value: ``calibrated_likelihood`` (the default): the anomaly map upsamples and blurs each patch's
            likelihood per dimension, ``-exp(-NLL / D)``, capped by its standard score at its own position over the
            task's training images, put on the task's overall scale
            (:meth:`~.anomaly_map.PositionCalibration.calibrate_map`; a task without these statistics, learned before
            them, maps its likelihood); ``likelihood``: that likelihood as
            it is (anomalib's Fastflow's map value); ``score``: the patch scores (the study's). The image score is the
            patch scores' either way; any checkpoint loads with any of them.
        freeze_base: Freeze the shared base after the first task (``False``: sequential fine-tuning).
        task_separated: A whole flow per task (the parameter-hungry upper bound).
        lr: Adam learning rate.
        max_epochs: Epochs per task (passed to the trainer).
        average_last: End each task with the mean of its trained weights over this last share of its epochs
            (:class:`~.callbacks.TaskWeightAveraging`; 0: the last step's weights).
        lora_alpha: LoRA alpha; defaults to ``lora_rank`` (scale 1).
        router_eps: Relative ridge of each task's own router covariance.
        router_embedding: The router's image embedding: ``mean`` or ``max`` of the patch embeddings, or
            ``quadrant_max`` (each channel's max in each quadrant of the grid, averaged over the four).
        router_covariance: Covariance of the route: each ``task``'s own, or ``pooled`` (Ledoit-Wolf, shared; LDA).
        unknown_factor: An image farther from every task than ``unknown_factor`` times the task's threshold (its
            training images' largest held-out router distance) is an unknown product; ``None``: never.
        unknown_as_anomalous: Score unknown products as anomalous (normalised score 1, label anomalous); ``False``:
            only flag them (``record_routing``), scored by the nearest task's expert.
        exact_likelihood: Train only what the NLL's log-det counts (``False``: the study's training, see
            :class:`MoleFlowModel`).
        position_condition: Channels of the positional code every coupling subnet is conditioned on (0: none).
        flow_layout: ``stage`` (the default: one flow per backbone stage) or ``joint`` (one density over all stages,
            the study's; see :class:`MoleFlowModel`).
        threshold: How each task's thresholds are chosen: ``f1`` (anomalib's, on validation images with defects) or
            ``good_fpr`` (from held-out good training images, at ``target_fpr`` false positives; no defect needed).
        target_fpr: With ``good_fpr``: the share of good images (and pixels) allowed above threshold.
        feature_cache: Compute each training image's patch embedding once per task and reuse it in later epochs:
            ``auto`` (in memory, or a memory-mapped file when large), ``memory``, ``disk`` or ``off``. Bypassed
            when a training transform is random or not known to be deterministic.
        feature_cache_dtype: Storage type of the cache (``float16`` halves it).
        compile_mode: ``torch.compile`` the backbone, the shared coupling blocks and the DIAs, in place, when a
            fit/test/predict sets up (or :meth:`compile_modules` is called): ``off``, or a torch.compile mode
            (``default``, ``reduce-overhead``, ``max-autotune``). Results stay within float tolerance (a test
            compares). Worth it on a GPU; each new task compiles the coupling blocks again (its experts are other
            modules).
        pre_processor: anomalib pre-processor, or ``True`` for resize to ``image_size`` + ImageNet normalisation. A
            custom one must resize to ``image_size``.
        post_processor: Post-processor, or ``True`` for the per-task :class:`TaskPostProcessor`.
        evaluator: Evaluator, or ``True`` for image/pixel AUROC, AUPR and pixel AUPRO.
        visualizer: Visualizer, or ``True`` for anomalib's default.
    """

    #: Settings that change only speed and memory, never a result (a resumed run may change them).
    SPEED_SETTINGS: tuple[str, ...] = SPEED_SETTINGS

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] = ("layer2", "layer3"),
        pre_trained: bool = True,
        image_size: int = 224,
        embed_dim: int | None = None,
        patch_size: int = 1,
        num_coupling_layers: int = 6,
        dia_blocks: int = 2,
        lora_rank: int = 64,
        use_lora: bool = True,
        use_whitening_adapter: bool = True,
        whitening_norm: WhiteningNorms = "image",
        use_pos_embedding: bool = True,
        spatial_context_kernel: int = 3,
        scale_context_kernel: int = 5,
        tail_weight: float = 0.7,
        tail_top_k_ratio: float = 0.02,
        lambda_logdet: float = 1e-4,
        score_aggregation_top_k: int = 3,
        anomaly_map_sigma: float = 4.0,
        score_calibration: ScoreCalibration = "position",
        anomaly_map_value: AnomalyMapValue = "calibrated_likelihood",
        freeze_base: bool = True,
        task_separated: bool = False,
        lr: float = 3e-3,
        max_epochs: int = 60,
        average_last: float = 0.5,
        lora_alpha: float | None = None,
        router_eps: float = 0.01,
        router_embedding: RouterEmbedding = "quadrant_max",
        router_covariance: RouterCovariance = "pooled",
        unknown_factor: float | None = 3.0,
        unknown_as_anomalous: bool = True,
        exact_likelihood: bool = True,
        position_condition: int = 0,
        flow_layout: FlowLayout = "stage",
        threshold: ThresholdMode = "f1",
        target_fpr: float = 0.01,
        feature_cache: CacheMode = "auto",
        feature_cache_dtype: CacheDtype = "float32",
        compile_mode: CompileMode = "off",
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        check(lr > 0, f"lr must be > 0, got {lr}.")
        check(max_epochs >= 1, f"max_epochs must be >= 1, got {max_epochs}.")
        check(0.0 <= average_last <= 1.0, f"average_last must be in [0, 1] (0: off), got {average_last}.")
        check_choice("feature_cache", feature_cache, CacheMode)
        check_choice("feature_cache_dtype", feature_cache_dtype, CacheDtype)
        check_choice("compile_mode", compile_mode, CompileMode)
        check_choice("threshold", threshold, ThresholdMode)
        check(0.0 < target_fpr < 0.5, f"target_fpr must be in (0, 0.5), got {target_fpr}.")
        if pre_processor is True:
            pre_processor = self.configure_pre_processor((image_size, image_size))
        super().__init__(
            pre_processor=pre_processor,
            post_processor=post_processor,
            evaluator=evaluator,
            visualizer=visualizer,
        )
        try:
            size = self.input_size  # anomalib probes the pre-processor with a dummy image
        except (AttributeError, TypeError, RuntimeError):
            size = None  # a custom transform that cannot be probed: nothing to compare
        if size is not None and tuple(size) != (image_size, image_size):
            msg = (
                f"The pre-processor resizes images to {tuple(size)}, but image_size is {image_size}: the patch grid "
                f"would not match. Pass image_size={size[0]} or a pre-processor that resizes to {image_size}."
            )
            raise ValueError(msg)
        self.loss = MoleFlowLoss(tail_weight, tail_top_k_ratio, lambda_logdet)
        # MoleFlowModel's own signature is the one list of architecture settings; it validates them.
        self.model: MoleFlowModel = MoleFlowModel(**select(ArchitectureSettings, locals()))
        self.freeze_base = freeze_base
        self.unknown_as_anomalous = unknown_as_anomalous
        self.feature_cache = feature_cache
        self.feature_cache_dtype = feature_cache_dtype
        self.compile_mode = compile_mode
        self._test_cache: FeatureCache | None = None
        self.lr = lr
        self.max_epochs = max_epochs
        self.average_last = average_last
        self.threshold = threshold
        self.target_fpr = target_fpr
        self._held_out: dict[str, torch.Tensor | None] = {}  # held-out image path -> its patch embedding
        self._fit_task: int | None = None  # chosen by `fitting` for one fit (NEWEST_TASK: the newest)
        self._routing = RoutingRecorder()

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path | IO[bytes],
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> MoleFlow:
        """Lightning's ``load_from_checkpoint``, where a setting added since the checkpoint was written is read with the
        value that reproduces it (:data:`INTRODUCED_SETTINGS`, e.g. ``flow_layout="joint"``,
        ``anomaly_map_value="score"``), not with today's default, for the settings of the model; a value given here
        still wins. Without this, a changed default of an architecture setting would make every older checkpoint
        refuse to load, and one of a scoring setting would score its tasks with other maps than their statistics were
        fitted on. ``score_calibration`` is the exception: a checkpoint that predates it has no statistics, and a task
        without them scores raw, as it did, while tasks learned after loading are calibrated by today's default."""
        saved = _saved_hyper_parameters(checkpoint_path, weights_only)
        introduced = {
            name: value
            for name, value in INTRODUCED_SETTINGS.items()
            if saved is not None
            and name not in saved
            and name not in kwargs
            and name in ARCHITECTURE_NAMES
            and name != "score_calibration"
        }
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, weights_only, **{**introduced, **kwargs}
        )

    @classmethod
    def continue_from(cls, path: str | Path, **settings: Any) -> MoleFlow:
        """Load a checkpoint to learn more tasks, with new settings for training and scoring.

        Settings that define the architecture (those of :class:`MoleFlowModel`, e.g. ``backbone``, ``lora_rank``)
        must equal the checkpoint's; the others (``lr``, ``max_epochs``, the loss weights, ``freeze_base``,
        ``score_aggregation_top_k``, ``anomaly_map_sigma``, components) replace the checkpoint's and are recorded in
        ``hparams``.

        Raises:
            ValueError: Naming every given architecture setting that differs from the checkpoint's.
            anomalib_moleflow.checkpoint.CheckpointError: If the file is damaged or not a checkpoint.
        """
        checkpoint = read_checkpoint(path)
        extra = checkpoint.get("state_dict", {}).get(extra_state_key("model."), {})
        saved = {**checkpoint.get("hyper_parameters", {}), **extra.get("fingerprint", {})}
        architecture = {
            name: value
            for name, value in select(ArchitectureSettings, settings).items()
            if name not in RUNTIME_SETTINGS
            and not (name in {"embed_dim", "lora_alpha"} and value is None)  # None: resolved as saved
        }
        differing = [
            f"{name} (checkpoint {old!r}, given {new!r})"
            for name, old, new in differences({name: saved.get(name) for name in architecture}, architecture)
        ]
        if differing:
            msg = (
                f"Settings that define the architecture must match the checkpoint '{path}': {'; '.join(differing)}. "
                "Leave them out (the checkpoint's values are used), or train from scratch without the checkpoint."
            )
            raise ValueError(msg)
        fixed = set(select(ArchitectureSettings, settings)) - RUNTIME_SETTINGS  # taken from the checkpoint
        others = {name: value for name, value in settings.items() if name not in fixed}
        model = cls.load_from_checkpoint(path, map_location="cpu", **others)
        if extra_state_key("post_processor.") not in checkpoint.get("state_dict", {}):
            model.record_statistics_of_earlier_version(checkpoint.get("hyper_parameters", {}))
        return model

    def record_statistics_of_earlier_version(self, saved: Mapping[str, Any]) -> None:
        """Record, for a checkpoint written before the records existed, the scoring settings its tasks' statistics
        were fitted with: its saved ``hyper_parameters`` (before any value given at loading replaced them; for a
        setting introduced since, the value that reproduces the run), with each task's calibration as it scored."""
        if not isinstance(self.post_processor, TaskPostProcessor):
            return
        saved = {**defaults(ArchitectureSettings), **INTRODUCED_SETTINGS, **saved}
        processor = self.post_processor
        processor.ensure_tasks(self.model.num_tasks)
        for task in range(self.model.num_tasks):
            if not bool(processor.task_stats[task].isfinite().any()):
                continue  # never validated: nothing to record
            processor.fitted_with[task] = {
                **self.model.scoring_settings(task, saved),
                **({GOOD_IMAGES: True} if saved.get("threshold") == "good_fpr" else {}),
            }

    # ----------------------------------------------------------- components
    def configure_post_processor(self) -> PostProcessor:
        """Per-task thresholds and normalisation."""
        return TaskPostProcessor()

    @staticmethod
    def configure_evaluator() -> Evaluator:
        """The study's metrics: image AUROC/AUPR and pixel AUROC/AUPR ("pixel AP")/AUPRO."""
        return default_evaluator()

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No gradient clipping, ``max_epochs`` epochs, validation once after the last epoch, no sanity validation.

        A one-class model needs validation only to fit its task's thresholds and normalisation, which the last
        epoch's weights define; validating after every epoch would score the validation images ``max_epochs`` times.
        """
        epochs = self.max_epochs + self.statistics_epochs
        arguments = {
            "gradient_clip_val": 0,
            "max_epochs": epochs,
            "num_sanity_val_steps": 0,
            "check_val_every_n_epoch": epochs,
        }
        if self.threshold == "good_fpr":  # thresholds and normalisation come from held-out training images
            arguments["limit_val_batches"] = 0
        return arguments

    @property
    def statistics_epochs(self) -> int:
        """Epochs before training that only collect statistics: 1 for ``whitening_norm="position"`` (its statistics
        must be known before the flow sees a normalised patch), else 0."""
        return int(
            self.model.use_whitening_adapter and any(path.whitening_norm == "position" for path in self.model.paths)
        )

    @property
    def learning_type(self) -> LearningType:
        """One-class: trained on normal images only."""
        return LearningType.ONE_CLASS

    # ---------------------------------------------------------------- tasks
    @property
    def task_names(self) -> list[str]:
        """Names of the tasks learned (or being learned), in order."""
        return list(self.model.task_names)

    @property
    def training_task(self) -> int:
        """Index of the task the running fit trains (chosen by :meth:`fitting`).

        Raises:
            RuntimeError: Outside a fit, or when the model has no task.
        """
        if self.model.num_tasks == 0:
            msg = "MoLE-Flow has no task: call `model.add_task(name)` first."
            raise RuntimeError(msg)
        if self._fit_task is None:
            msg = "No fit is running: train inside `with model.fitting(task):` or through `Engine.fit`."
            raise RuntimeError(msg)
        return self.model.num_tasks - 1 if self._fit_task == NEWEST_TASK else self._fit_task

    @property
    def is_fitting(self) -> bool:
        """Whether a fit's task is chosen (inside :meth:`fitting`): validation then scores with that task."""
        return self._fit_task is not None

    @contextmanager
    def fitting(self, task: int | None = None) -> Iterator[None]:
        """Inside the block, ``fit`` trains ``task`` and validates with its expert (no routing).

        Only the newest task can be trained: the earlier ones are frozen. ``None`` means the newest task when the fit
        reads it (after Lightning restored a checkpoint's tasks); ``Engine.fit`` outside such a block enters one so
        (:class:`~anomalib_moleflow.models.moleflow.callbacks.FitScope`).

        Raises:
            ValueError: If ``task`` is not the newest task.
            RuntimeError: If a fit's task is already chosen.
        """
        if task is not None and task != self.model.num_tasks - 1:
            msg = (
                f"Task {task} cannot be trained: only the newest task ({self.model.num_tasks - 1}) can, the earlier "
                "ones are frozen. Add a task with `model.add_task(name)` to train a new one."
            )
            raise ValueError(msg)
        if self._fit_task is not None:
            msg = "A fit's task is already chosen: `fitting` blocks do not nest."
            raise RuntimeError(msg)
        self._fit_task = NEWEST_TASK if task is None else task
        try:
            yield
        finally:
            self._fit_task = None

    def add_task(self, name: str) -> int:
        """Add a task (expert, whitening adapter, DIA, router prototype, post-processing row).

        The next ``fit`` trains it; earlier tasks are never modified when ``freeze_base`` is set.

        Returns:
            The task's index.
        """
        index = self.model.add_task(name)
        if isinstance(self.post_processor, TaskPostProcessor):
            self.post_processor.ensure_tasks(self.model.num_tasks)
        logger.info("Added task %d '%s'.", index, name)
        return index

    def task_index(self, name: str) -> int:
        """Index of a task by name."""
        if name not in self.model.task_names:
            msg = f"Unknown task '{name}'. Known tasks: {self.model.task_names}."
            raise KeyError(msg)
        return self.model.task_names.index(name)

    def record_routing(self) -> AbstractContextManager[RoutingLog]:
        """Inside the ``with`` block, record the task that scored each evaluated or predicted image."""
        return self._routing.record()

    def setup(self, stage: str) -> None:
        """Compile the modules (``compile_mode``)."""
        del stage
        self.compile_modules()

    def compile_modules(self) -> None:
        """``torch.compile`` (``compile_mode``) the backbone, shared coupling blocks and DIAs not compiled yet.

        In place (``nn.Module.compile``): parameters and state-dict keys stay the same, so checkpoints do not change.
        """
        if self.compile_mode == "off":
            return
        paths = self.model.paths
        modules = [
            self.model.feature_extractor,
            *(flow.blocks for path in paths for flow in path.flows),
            *(dia for path in paths for dia in path.dias),
        ]
        mode = None if self.compile_mode == "default" else self.compile_mode
        for module in modules:
            if not is_compiled(module) and next(module.parameters(), None) is not None:
                module.compile(mode=mode)

    def _compiled_calls(self) -> AbstractContextManager[None]:
        """Context of every call into compiled modules: dynamo's recompile limit raised for this model's tasks only.

        The coupling blocks' subnets read the task's expert by name, so dynamo compiles them once per task; with its
        default limit (8) later tasks would silently run eagerly. The limit is raised inside our calls only, never
        for the rest of the process.
        """
        if self.compile_mode == "off":
            return nullcontext()
        return compile_cache_limit(4 * self.model.num_tasks)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint with non-finite network weights before any of them is loaded (Lightning loads after)."""
        check_finite_state(checkpoint.get("state_dict", {}), "This checkpoint")
        super().on_load_checkpoint(checkpoint)

    def scoring_settings(self, task: int) -> dict[str, Any]:
        """The scoring settings ``task`` is scored with now (what its statistics depend on)."""
        return self.model.scoring_settings(task)

    def stale_statistics(self) -> dict[int, list[tuple[str, Any]]]:
        """Tasks whose thresholds and normalisation were fitted with other scoring settings than the model's now
        (loaded with other values), each with the settings that differ and the values it was fitted with."""
        if not isinstance(self.post_processor, TaskPostProcessor):
            return {}
        return self.post_processor.stale_tasks([self.scoring_settings(t) for t in range(self.model.num_tasks)])

    def refits_by_validation(self, task: int) -> bool:
        """Whether validating ``task`` fits its thresholds and normalisation again: not when they came from held-out
        good images, nor when the model sets them that way (``threshold="good_fpr"`` skips validation)."""
        fitted = self.post_processor.fitted_with[task] if isinstance(self.post_processor, TaskPostProcessor) else None
        return self.threshold != "good_fpr" and not (fitted or {}).get(GOOD_IMAGES)

    def refuse_stale_statistics(self, tasks: torch.Tensor | None = None) -> None:
        """Refuse to post-process images of a task whose statistics no longer hold (see :meth:`stale_statistics`).

        Args:
            tasks: The tasks ``(b,)`` of the images to post-process; ``None`` (and while exporting, which serves every
                task): any task.

        Raises:
            ValueError: Naming each such task, the settings it was fitted with and has now, and what to do.
        """
        processor = self.post_processor
        if not (processor.enable_normalization or processor.enable_thresholding):
            return
        stale = self.stale_statistics()
        if stale and tasks is not None and not torch.compiler.is_exporting():
            used = set(tasks.unique().tolist())
            stale = {task: differing for task, differing in stale.items() if task in used}
        if not stale:
            return
        details = "; ".join(
            f"task {task} '{self.model.task_names[task]}' with "
            + ", ".join(f"{name}={value!r} (now {self.scoring_settings(task)[name]!r})" for name, value in differing)
            for task, differing in sorted(stale.items())
        )
        if not all(self.refits_by_validation(task) for task in stale):
            advice = (
                "Thresholds from held-out good images (threshold='good_fpr') cannot be fitted again: load the model "
                "with the settings they were fitted with."
            )
        else:
            advice = (
                "Validate those tasks again with the new settings (`moleflow continual --from_checkpoint` does it for "
                "the tasks in its list; in Python: `Engine(callbacks=[OracleRouting(task)]).validate(model, "
                "datamodule)`, `from anomalib_moleflow import OracleRouting`), or load the model with the settings "
                "they were fitted with."
            )
        msg = f"Thresholds and normalisation were fitted with other scoring settings: {details}. {advice}"
        raise ValueError(msg)

    def on_test_start(self) -> None:
        """Refuse at once, before any batch, when a task's statistics no longer hold (any image may be routed to it)."""
        if isinstance(self.post_processor, TaskPostProcessor):
            self.refuse_stale_statistics()

    def on_predict_start(self) -> None:
        """As :meth:`on_test_start`."""
        self.on_test_start()

    def configure_model(self) -> None:
        """Inside a fit, freeze all but what the fit trains before Lightning builds the optimizer and (DDP) wraps the
        module: DDP reduces the gradients of the parameters that require them when it wraps."""
        if self.is_fitting and self.model.num_tasks:
            self._set_trainable()

    def configure_optimizers(self) -> optim.Optimizer:
        """Adam over the training task's own parameters, plus the shared base on the first task or when not frozen.

        Everything else gets ``requires_grad=False`` and stays out of the optimizer, so it cannot change.
        """
        return optim.Adam(self._set_trainable(), lr=self.lr)

    def _set_trainable(self) -> list[nn.Parameter]:
        """Make the fit's parameters (and only them) trainable; returns them."""
        task = self.training_task
        return self.model.set_trainable(task, train_shared=task == 0 or not self.freeze_base)

    # ------------------------------------------------------------- training
    def configure_callbacks(self) -> list[Callback]:
        """The fit's task for a plain ``Engine.fit``, anomalib's (the components that are callbacks), then the
        training feature cache's life cycle, the fitting of the training task's statistics, (``average_last``) the
        averaging of its weights and the fitting of its score statistics with the weights it ends with."""
        inherited = super().configure_callbacks()
        inherited = [inherited] if isinstance(inherited, Callback) else list(inherited)
        cache = TrainingFeatureCache(self.feature_cache, self.feature_cache_dtype)
        averaging = [TaskWeightAveraging(self.average_last)] if self.average_last > 0 else []
        # The calibration's on_train_end runs before the cache's, which closes the cache it reads.
        return [FitScope(), *inherited, TaskScoreCalibration(), cache, TaskStatisticsFitting(), *averaging]

    def on_train_start(self) -> None:
        """With ``threshold="good_fpr"`` or ``score_calibration="held_out"``, choose the held-out good images (every
        k-th training image by path, :data:`HELD_OUT_SHARE` or :data:`CALIBRATION_SHARE` of them, at least 2): they
        never train the flow; they set the task's thresholds or its score statistics."""
        self._held_out = {}
        users = self._held_out_users()
        if not users:
            return
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        paths = sorted(str(p) for p in getattr(getattr(dataset, "samples", None), "image_path", []))
        if len(paths) < 4:
            verbs = ("holds", "needs") if len(users) == 1 else ("hold", "need")
            msg = (
                f"{' and '.join(users)} {verbs[0]} out some good training images and {verbs[1]} at least 4 training "
                f"images with paths, got {len(paths)}. Add images, or use threshold='f1' and "
                "score_calibration='position'."
            )
            raise ValueError(msg)
        share = CALIBRATION_SHARE if self.model.score_calibration == "held_out" else HELD_OUT_SHARE
        step = max(2, min(round(1 / share), len(paths) // 2))
        self._held_out = dict.fromkeys(paths[::step])

    def _held_out_users(self) -> list[str]:
        """The settings that hold out good training images, as ``name='value'`` (empty: none does)."""
        users = ["threshold='good_fpr'"] if self.threshold == "good_fpr" else []
        if self.model.score_calibration == "held_out":
            users.append("score_calibration='held_out'")
        return users

    def _patches(self, batch: Batch | torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        """Patch embeddings ``(b, h, w, d)`` of a batch's images, from ``cache`` when it holds every one of them.

        Images are keyed by their paths; a bare tensor (no paths) is always embedded.
        """
        images = batch if isinstance(batch, torch.Tensor) else batch.image
        paths = None if isinstance(batch, torch.Tensor) else getattr(batch, "image_path", None)
        keys = [str(path) for path in paths] if cache is not None and paths else None
        cached = cache.get(keys, images.device) if keys else None
        if cached is not None:
            return cached
        patches, _ = self.model.embed(images)
        if keys:
            cache.put(keys, patches)  # type: ignore[union-attr]
        return patches

    def on_train_end(self) -> None:
        """Set the task's thresholds from its held-out good images (``threshold="good_fpr"``)."""
        if self._held_out and self.threshold == "good_fpr" and isinstance(self.post_processor, TaskPostProcessor):
            held = [patches for patches in self._held_out.values() if patches is not None]
            task = self.training_task
            with torch.no_grad():
                patches = torch.stack(held).to(self.device)
                tasks = torch.full((len(held),), task, device=self.device, dtype=torch.long)
                raw, _ = self.model.score_patches(patches, tasks, self.model.image_size)
            self.post_processor.set_good_statistics(
                task, raw.pred_score, raw.anomaly_map, self.target_fpr, self.scoring_settings(task)
            )
            logger.info(
                "Task %d '%s': thresholds from %d held-out good training image(s) at %.1f %% false positives.",
                task,
                self.model.task_names[task],
                len(held),
                100 * self.target_fpr,
            )
        self._held_out = {}

    def _held_out_mask(self, batch: Batch, device: torch.device) -> torch.Tensor:
        """``(b,)``: which of the batch's images are held out of training (none without paths)."""
        paths = getattr(batch, "image_path", None) or [None] * len(batch.image)
        return torch.tensor([str(path) in self._held_out for path in paths], dtype=torch.bool, device=device)

    def fit_score_calibration(self, task: int, batches: Iterable[Batch]) -> None:
        """Fit ``task``'s per-position score statistics from the patch NLLs of its good training images (with
        ``score_calibration="held_out"`` the images of ``batches`` held out of training, else all but those held out
        for ``threshold="good_fpr"``), with the weights the task has now.

        Under DDP every rank scores its share and the sums are combined. The task's training feature cache serves the
        embeddings while its fit runs.
        """
        cache = training_cache(self)
        grids = [path.grid for path in self.model.paths]
        # per path: (sum, sum of squares) of the patch NLLs, and of their likelihood map values
        sums = [[[torch.zeros(grid, dtype=torch.float64) for _ in range(2)] for _ in range(2)] for grid in grids]
        count = 0
        pre_process = getattr(self.pre_processor, "on_train_batch_start", None)
        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for index, raw in enumerate(batches):
                    batch = move_data_to_device(raw, self.device)
                    if pre_process is not None:  # as the training loop does (anomalib's PreProcessor is a callback)
                        pre_process(self.trainer, self, batch, index)
                    patches = self._patches(batch, cache)
                    held = self._held_out_mask(batch, patches.device)
                    kept = held if self.model.score_calibration == "held_out" else ~held
                    if not bool(kept.any()):
                        continue
                    outputs = self.model.train_patches(patches[kept], task)
                    for path_sums, (nll, _), path in zip(sums, outputs, self.model.paths, strict=True):
                        scores = rearrange(nll.double().cpu(), "b (h w) -> b h w", h=path.grid[0], w=path.grid[1])
                        for (total, squares), values in zip(
                            path_sums, (scores, likelihood_map_value(scores, path.dim)), strict=True
                        ):
                            total += values.sum(0)
                            squares += values.square().sum(0)
                    count += int(kept.sum())
        finally:
            self.train(training)
        shares = gather_objects((sums, count))
        sums = [
            [tuple(sum(share[0][path][kind][i] for share in shares) for i in range(2)) for kind in range(2)]
            for path in range(len(grids))
        ]
        count = sum(share[1] for share in shares)
        if count < 2:
            logger.warning(
                "Task %d '%s': %d training image(s), too few for per-position statistics; it scores raw NLL "
                "and maps the plain likelihood.",
                task,
                self.model.task_names[task],
                count,
            )
            return
        self.model.fit_calibration(task, [scores for scores, _ in sums], [values for _, values in sums], count)

    def training_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """One step of the training task: tail-aware NLL + log-det regularisation; feeds the router."""
        del args, kwargs
        task = self.training_task
        patches = every_image = self._patches(batch, training_cache(self))
        if self._held_out:
            held = self._held_out_mask(batch, patches.device)
            for index in held.nonzero().flatten().tolist():
                self._held_out[str(batch.image_path[index])] = patches[index].detach().cpu()
            if bool(held.all()):  # nothing to train on in this batch: Lightning skips the step
                self._feed_router(task, every_image, batch)
                return None
            patches = patches[~held]
        if self.model.whitening_needs_fit(task):  # the statistics epoch: collect, train nothing
            self.model.accumulate_whitening(task, patches)
            self._feed_router(task, every_image, batch)
            return self._no_step()
        with self._compiled_calls():
            outputs = self.model.train_patches(patches, task)
        # one density per path: their losses add up (the stage layout's flows share no parameter)
        loss = sum((self.loss(nll, log_det) for nll, log_det in outputs), torch.zeros((), device=patches.device))
        if not torch.isfinite(loss):
            msg = (
                f"Non-finite training loss ({loss.item()}) on task {task} '{self.model.task_names[task]}' at epoch "
                f"{self.current_epoch}. Stopped before the optimizer step, so no weight was changed by it and earlier "
                "tasks are untouched. Lower `lr`, use fewer `num_coupling_layers`, or check the images for NaN."
            )
            raise FloatingPointError(msg)
        self._feed_router(task, every_image, batch)  # after the check: a bad batch never reaches the router
        self.log("train_loss", loss.detach(), on_epoch=True, prog_bar=True, batch_size=batch.image.shape[0])
        return {"loss": loss}

    def _no_step(self) -> STEP_OUTPUT:
        """A step that trains nothing: skipped in one process. Under DDP, where Lightning refuses a skipped step, a
        zero loss: every trained parameter gets a zero gradient on every rank, which Adam turns into no change."""
        if world_size() == 1:
            return None
        return {"loss": sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0}

    def _feed_router(self, task: int, patches: torch.Tensor, batch: Batch) -> None:
        """Until ``task``'s prototype is fitted (its first epoch; :class:`TaskStatisticsFitting` fits it), collect the
        image embeddings of ``(b, h, w, d)`` patches, keyed by the batch's image paths: every image's, held-out ones
        included (the router's own folds)."""
        prototype = self.model.router.prototypes[task]
        if not prototype.ready:
            paths = getattr(batch, "image_path", None)
            prototype.accumulate(self.model.router.embed(patches), [str(p) for p in paths] if paths else None)

    # ------------------------------------------------------------ inference
    def _given_tasks(
        self, tasks: int | torch.Tensor | None, batch_size: int, device: torch.device
    ) -> torch.Tensor | None:
        """Task ids ``(b,)`` to use instead of routing: the fit's task inside a fit (validation), else ``tasks``.

        Raises:
            IndexError: If a given task does not exist.
        """
        if self.is_fitting:
            tasks = self.training_task
        if tasks is None:
            return None
        if isinstance(tasks, torch.Tensor) and tasks.ndim:
            low, high = (int(value) for value in tasks.aminmax())  # one sync for the batch (never while exporting)
            bad = low if low < 0 else high
            tasks = tasks.to(device=device, dtype=torch.long)
        else:
            bad = tasks = int(tasks)
        if not 0 <= bad < self.model.num_tasks:
            msg = f"Task {bad} does not exist: the model has {self.model.num_tasks} task(s)."
            raise IndexError(msg)
        return tasks if isinstance(tasks, torch.Tensor) else torch.full((batch_size,), tasks, device=device)

    @contextmanager
    def test_feature_cache(self, capacity: int, folder: Path | str | None = None) -> Iterator[None]:
        """Inside the block, test and predict compute each image's patch embedding once, keyed by its path.

        A continual run tests every earlier task again after each new one; with this cache the matrix costs one
        backbone pass per test image for the whole run. Storage follows ``feature_cache`` (``off``: no cache).

        Args:
            capacity: How many distinct images the block will score (the disk cache's rows).
            folder: Where a disk cache's file goes (default: the system's temporary folder).
        """
        if self.feature_cache == "off" or self._test_cache is not None:
            yield
            return
        self._test_cache = FeatureCache(capacity, self.feature_cache, self.feature_cache_dtype, folder)
        try:
            yield
        finally:
            self._test_cache.close()
            self._test_cache = None

    def _score(
        self, batch: Batch | torch.Tensor, tasks: int | torch.Tensor | None = None
    ) -> tuple[InferenceBatch, Routed]:
        """Raw predictions and each image's routing (recorded in every open routing log).

        A batch's image paths let the test feature cache answer instead of the backbone; ``tasks`` (or the fit's
        task, inside a fit) replace the routing.
        """
        images = batch if isinstance(batch, torch.Tensor) else batch.image
        patches = self._patches(batch, self._test_cache) if self._test_cache is not None else None
        given = self._given_tasks(tasks, images.shape[0], images.device)
        with self._compiled_calls():
            predictions, routed = self.model.predict(images, given, patches=patches)
        self._routing.append(routed)
        return predictions, routed

    def _overridden(self, routed: Routed) -> torch.Tensor | None:
        """The images the post-processor scores anomalous as unknown products (``None`` with the override off)."""
        return routed.unknown if self.unknown_as_anomalous else None

    def validation_step(self, batch: Batch, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Score validation images (with the training task's expert during ``fit``); gather per-task statistics."""
        del args, kwargs
        predictions, routed = self._score(batch.image, true_tasks(batch))  # validation images are not cached
        batch.update(**predictions._asdict())
        if isinstance(self.post_processor, TaskPostProcessor):
            self.post_processor.update_statistics(batch, routed.task)
        return batch

    def test_step(self, batch: Batch, batch_idx: int, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
        """Score test images, each routed to its task and normalised with that task's statistics."""
        del batch_idx, args, kwargs
        return self._update(batch, self.score_images(batch, true_tasks(batch), pre_process=False))

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> STEP_OUTPUT:
        """Score images, each routed to its task and normalised with that task's statistics."""
        del batch_idx, dataloader_idx
        return self._update(batch, self.score_images(batch, true_tasks(batch), pre_process=False))

    @staticmethod
    def _update(batch: Batch, scored: ScoredImages) -> Batch:
        """``batch`` with the final predictions; ``batch.raw_score`` keeps the scores before normalisation."""
        batch.update(**{key: value for key, value in scored.final._asdict().items() if value is not None})
        batch.raw_score = scored.raw.pred_score.clone()
        return batch

    @torch.no_grad()
    def score_images(
        self,
        images: Batch | torch.Tensor,
        tasks: int | torch.Tensor | None = None,
        *,
        pre_process: bool = True,
    ) -> ScoredImages:
        """Route, score and post-process images; keeps raw scores and routing. The one scoring path: test, predict,
        ``forward`` and the reports all call it.

        Runs without gradients (scoring never trains).

        Args:
            images: ``(b, 3, H, W)`` images, or a batch (its image paths let the test feature cache answer).
            tasks: Each image's task ``(b,)``, or one task for all, to score with instead of routing (the study's
                oracle mode); ``None``: the router picks.
            pre_process: Apply the model's pre-processor first (``False`` inside Lightning's steps, where anomalib's
                ``PreProcessor`` callback already transformed the batch: passing such a batch with ``True`` would
                resize and normalise it twice).

        Raises:
            IndexError: If a given task does not exist.
        """
        if pre_process and self.pre_processor:
            images = self.pre_processor(images.image if isinstance(images, Batch) else images)
        raw, routed = self._score(images, tasks)
        final = raw
        if isinstance(self.post_processor, TaskPostProcessor):
            self.refuse_stale_statistics(routed.task)
            final = self.post_processor(raw, task_ids=routed.task, unknown=self._overridden(routed))
        elif self.post_processor:
            final = self.post_processor(raw)
        return ScoredImages(raw, final, routed)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> Path:
        """anomalib's ONNX export, at opset 18 unless told otherwise.

        anomalib asks for opset 14, which torch's exporter does not write; it writes 18 and tries to convert down,
        which fails on this graph (reduce ops whose axes are inputs) and prints a traceback before keeping 18.
        """
        kwargs.setdefault("opset_version", ONNX_OPSET)
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    def forward(self, batch: torch.Tensor, *args: Any, **kwargs: Any) -> InferenceBatch:
        """Pre-process, score with routing, and post-process each image with its task's statistics."""
        del args, kwargs
        return self.score_images(batch).final

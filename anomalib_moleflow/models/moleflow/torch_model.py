"""PyTorch model of MoLE-Flow: frozen backbone, shared flow with per-task experts, per-task adapters, router."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.data import InferenceBatch
from einops import rearrange, repeat
from torch import nn

from .anomaly_map import (
    AnomalyMapGenerator,
    PositionCalibration,
    likelihood_map_value,
    position_capped,
    top_k_image_score,
)
from .components.adapters import WhiteningAdapter, per_image_whitening
from .components.backbone import build_feature_extractor
from .components.coupling import MoLEFlow
from .components.dia import DeepInvertibleAdapter, per_image_dia
from .components.embedding import PatchEmbedding, default_embed_dim, sinusoidal_position_embedding
from .components.router import MahalanobisRouter, Routed
from .settings import (
    INTRODUCED_SETTINGS,
    RUNTIME_SETTINGS,
    SCORING_SETTINGS,
    AnomalyMapValue,
    ArchitectureSettings,
    FlowLayout,
    RouterCovariance,
    RouterEmbedding,
    ScoreCalibration,
    WhiteningNorm,
    WhiteningNorms,
    check,
    check_choice,
    differences,
    plain_norms,
    select,
    stage_whitening_norms,
)

logger = logging.getLogger(__name__)

#: Bumped when the layout or the meaning of the state dict changes (3: ``exact_likelihood``, ``embed_dim=None``;
#: 4: ``whitening_norm``, whose default ``image`` changes what a whitening adapter saved before means; 5: the
#: whitening adapters' ``position`` statistics; 6: the router's Ledoit-Wolf covariances and ``router_embedding``).
CHECKPOINT_FORMAT = 6


def model_settings(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``arguments`` that :class:`MoleFlowModel` takes (:class:`ArchitectureSettings`)."""
    return select(ArchitectureSettings, arguments)


def stage_dims(channels: Sequence[int], embed_dim: int) -> list[int]:
    """Each stage's share of ``embed_dim`` in the ``stage`` layout: proportional to its channels, a multiple of 4.

    Raises:
        ValueError: If a stage's share would be under 4 channels.
    """
    total = sum(channels)
    dims = [4 * int(embed_dim * c / total // 4) for c in channels[:-1]]
    dims.append(embed_dim - sum(dims))
    check(
        min(dims) >= 4,
        f"embed_dim {embed_dim} is too small to give each of the {len(channels)} stages ({list(channels)} channels) "
        "its own flow of at least 4 channels: raise embed_dim (or leave it None) or use flow_layout='joint'.",
    )
    return dims


def _first_rows(coarse: int, fine: int) -> torch.Tensor:
    """For each of ``coarse`` rows, the first of ``fine`` rows that a nearest upsampling fills from it."""
    source = F.interpolate(torch.arange(coarse, dtype=torch.float32)[None, None, :, None], (fine, 1), mode="nearest")
    source = source.flatten().long()
    return torch.stack([(source == row).nonzero()[0, 0] for row in range(coarse)])


class FlowPath(nn.Module):
    """The density of one part of the patch embedding, for every task.

    In the ``joint`` layout one path takes the whole embedding on the finest grid; in the ``stage`` layout each
    backbone stage has its own path: its channels on its own grid (read back from the finest grid, which holds every
    coarse cell in a block of nearest-upsampled copies). A path owns its positional code, each task's whitening
    adapter, DIA and per-position score statistics, and the coupling flow (one shared, or one per task).

    Args:
        dim: Channels of the part.
        grid: Its grid ``(h, w)``.
        start: Its first channel in the embedding.
        rows: The finest-grid row of each of its rows (``None``: the finest grid itself).
        cols: The same for its columns.
        flow: :class:`MoLEFlow`'s arguments other than ``dim`` and ``grid``.
        whitening_norm: See :class:`MoleFlowModel`.
        use_whitening_adapter: See :class:`MoleFlowModel`.
        use_pos_embedding: See :class:`MoleFlowModel`.
        dia_blocks: See :class:`MoleFlowModel`.
        task_separated: See :class:`MoleFlowModel`.
        exact_likelihood: See :class:`MoleFlowModel`.
    """

    def __init__(
        self,
        dim: int,
        grid: tuple[int, int],
        start: int,
        rows: torch.Tensor | None,
        cols: torch.Tensor | None,
        flow: Mapping[str, Any],
        whitening_norm: WhiteningNorm,
        use_whitening_adapter: bool,
        use_pos_embedding: bool,
        dia_blocks: int,
        task_separated: bool,
        exact_likelihood: bool,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.grid = grid
        self.start = start
        self.whole = rows is None
        self.flow_arguments = dict(flow)
        self.whitening_norm = whitening_norm
        self.use_whitening_adapter = use_whitening_adapter
        self.dia_blocks = dia_blocks
        self.task_separated = task_separated
        self.exact_likelihood = exact_likelihood
        if rows is not None:
            self.register_buffer("rows", rows, persistent=False)
            self.register_buffer("cols", cols, persistent=False)
        self.pos_embedding: torch.Tensor | None
        if use_pos_embedding:
            self.register_buffer("pos_embedding", sinusoidal_position_embedding(*grid, dim), persistent=False)
        else:
            self.pos_embedding = None
        self.whitening = nn.ModuleList()
        self.dias = nn.ModuleList()
        self.calibrations = nn.ModuleList()
        self.flows = nn.ModuleList()
        if not task_separated:
            self.flows.append(self._new_flow())

    def _new_flow(self) -> MoLEFlow:
        return MoLEFlow(dim=self.dim, grid=self.grid, **self.flow_arguments)

    def select(self, patches: torch.Tensor) -> torch.Tensor:
        """The path's part ``(b, h_p, w_p, d_p)`` of ``(b, h, w, d)`` patch embeddings."""
        if self.whole:
            return patches
        part = patches.index_select(1, self.rows).index_select(2, self.cols)
        return part[..., self.start : self.start + self.dim]

    def flow_for(self, task: int | torch.Tensor) -> MoLEFlow:
        """The coupling flow that serves ``task``, or a task per image ``(b,)`` (the shared flow).

        Raises:
            ValueError: For a task per image on a task-separated model (one whole flow per task).
        """
        if not self.task_separated:
            return self.flows[0]
        if isinstance(task, torch.Tensor):
            msg = "A task-separated model (one whole flow per task) runs one task at a time: pass an int task."
            raise ValueError(msg)
        return self.flows[task]

    def add_task(self, index: int) -> None:
        """The new task's whitening adapter, DIA, score statistics and expert (each the identity / the base)."""
        self.whitening.append(
            WhiteningAdapter(self.dim, self.whitening_norm, self.grid) if self.use_whitening_adapter else nn.Identity()
        )
        self.dias.append(DeepInvertibleAdapter(self.dim, self.dia_blocks) if self.dia_blocks else nn.Identity())
        self.calibrations.append(PositionCalibration(self.grid))
        if self.task_separated:
            self.flows.append(self._new_flow())
        self.flow_for(index).add_expert(str(index))

    def with_position(self, part: torch.Tensor) -> torch.Tensor:
        """The whitening adapters' input: the part plus the positional code."""
        return part if self.pos_embedding is None else part + self.pos_embedding

    def calibrate(self, scores: torch.Tensor, task: int | torch.Tensor, calibration: ScoreCalibration) -> torch.Tensor:
        """``(b, h_p, w_p)`` patch NLLs as the task's patch scores (see :meth:`MoleFlowModel.calibrate`)."""
        if calibration == "none":
            return scores
        if isinstance(task, torch.Tensor):
            mean = torch.stack([c.mean for c in self.calibrations])[task]
            std = torch.stack([c.std for c in self.calibrations])[task]
            return (scores - mean) / std
        return self.calibrations[task](scores)

    def calibrate_map(self, values: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        """``(b, h_p, w_p)`` likelihood map values as :meth:`PositionCalibration.calibrate_map` makes them."""
        if not isinstance(task, torch.Tensor):
            return self.calibrations[task].calibrate_map(values)
        # an exported graph: each image's statistics gathered (an unfitted task's are the identity's)
        mean, std, overall = (
            torch.stack([getattr(c, name) for c in self.calibrations])[task]
            for name in ("map_mean", "map_std", "map_overall")
        )
        overall = overall[:, :, None, None]
        return position_capped(values, mean, std, overall[:, 0], overall[:, 1])

    def task_parameters(self, task: int, trained_only: bool = True) -> list[nn.Parameter]:
        """Parameters the path holds for ``task`` alone (see :meth:`MoleFlowModel.task_parameters`)."""
        params = [*self.whitening[task].parameters(), *self.dias[task].parameters()]
        params += self.flow_for(task).expert_parameters(str(task))
        if self.task_separated:
            params += self.flow_parameters(self.flows[task], trained_only)
        return params

    def flow_parameters(self, flow: MoLEFlow, trained_only: bool = True) -> list[nn.Parameter]:
        """A flow's base parameters; when ``trained_only``, without the spatial context if the likelihood is exact."""
        fixed = set()
        if trained_only and self.exact_likelihood and flow.spatial_context is not None:
            fixed = {id(p) for p in flow.spatial_context.parameters()}
        return [p for p in flow.base_parameters() if id(p) not in fixed]

    def shared_parameters(self, trained_only: bool = True) -> list[nn.Parameter]:
        """The path's parameters shared by all tasks (none when task-separated)."""
        return [] if self.task_separated else self.flow_parameters(self.flows[0], trained_only)

    def flow_inputs(self, part: torch.Tensor, task: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What enters ``task``'s invertible part (see :meth:`MoleFlowModel.flow_inputs`)."""
        flow = self.flow_for(task)  # first: refuses a task per image on a task-separated model
        x = self.with_position(part)
        log_det = None
        if isinstance(task, torch.Tensor):
            if self.use_whitening_adapter:
                x, per_image = per_image_whitening(list(self.whitening), x, task)
                log_det = repeat(per_image, "b -> (b n)", n=x.shape[1] * x.shape[2])
        else:
            x = self.whitening[task](x)
            log_det = self.whitening[task].log_abs_det() if self.use_whitening_adapter else None
        return rearrange(flow.context(x), "b h w d -> (b h w) d"), log_det

    def encode(self, part: torch.Tensor, task: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents ``((b h w), d)`` and per-token log-determinants of the part (see :meth:`MoleFlowModel.encode`)."""
        tokens, whitening_log_det = self.flow_inputs(part, task)
        z, log_det = self.flow_for(task)(tokens, task)
        if self.dia_blocks:
            per_image = isinstance(task, torch.Tensor)
            z, dia_log_det = (per_image_dia(list(self.dias), task) if per_image else self.dias[task])(z)
            log_det = log_det + dia_log_det
        if self.exact_likelihood and whitening_log_det is not None:
            log_det = log_det + whitening_log_det
        return z, log_det


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean of same-shaped tensors (one tensor: itself, no copy)."""
    return values[0] if len(values) == 1 else torch.stack(values).mean(0)


#: Old checkpoints' top-level per-task modules, now the first path's.
_PATH_MODULES = ("whitening.", "dias.", "calibrations.", "flows.")


def _into_first_path(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """A checkpoint written before paths existed (one joint density) loads into the first path."""
    del module, args
    if any(key.startswith(f"{prefix}paths.") for key in state_dict):
        return
    for key in [key for key in state_dict if key.startswith(tuple(prefix + name for name in _PATH_MODULES))]:
        state_dict[f"{prefix}paths.0.{key[len(prefix) :]}"] = state_dict.pop(key)


class MoleFlowModel(nn.Module):
    """MoLE-Flow network holding every task learned so far.

    Args:
        backbone: timm backbone name.
        layers: Backbone stages whose features form the patch embedding.
        pre_trained: Load ImageNet weights into the backbone.
        image_size: Input side length in pixels.
        embed_dim: Patch embedding size D (a positive multiple of 4); ``None``: from the backbone, the stages'
            channel count rounded down to a multiple of 4, at most 768 (WRN50 layer2+layer3: 768; lite0: 152).
        patch_size: Local averaging window of the patch embedding (PatchCore's neighbourhood aggregation, odd;
            1: none). The study uses 3; 1 localises small defects better (``docs/quality.md``).
        num_coupling_layers: MoLE coupling blocks (0: DIA only).
        dia_blocks: DIA blocks per task (0: MoLE only).
        lora_rank: Rank of the LoRA experts.
        lora_alpha: LoRA alpha (update scaled by alpha / rank); ``None``: ``lora_rank``.
        use_lora: Low-rank experts; ``False`` for per-task full-rank linears.
        use_whitening_adapter: Per-task whitening adapter.
        whitening_norm: What the whitening adapter's LayerNorm normalises over: ``image`` (each image's patches and
            channels together, as anomalib's Fastflow) or ``patch`` (each patch alone, the study's), which removes
            every patch's magnitude, a defect cue (``docs/quality.md``); or, with ``flow_layout="stage"``, one value
            per stage of ``layers`` (e.g. ``["image", "patch"]``: the coarse stage's patches alone, docs/quality.md
            0m), where a stage's value may be a list: one flow on the stage per norm, their scores and maps averaged
            before the stages' mean (e.g. ``["image", ["image", "patch_floored"]]``, docs/quality.md 0n).
        use_pos_embedding: Add the 2D sinusoidal positional embedding.
        spatial_context_kernel: Kernel of the shared spatial context (0: off, else odd).
        scale_context_kernel: Kernel of the scale context in each coupling subnet (0: off, else odd).
        score_aggregation_top_k: Image score = mean of the top-k patch scores.
        anomaly_map_sigma: Standard deviation of the anomaly map's Gaussian blur in pixels (0: no blur).
        score_calibration: ``position``: each task's patch scores standardised at every grid position by its good
            training images' statistics there (:meth:`fit_calibration`; an unfitted task scores raw); ``held_out``:
            the same (which images the statistics come from is the training's business); ``none``: the flow's NLL.
            A scoring setting: every task keeps its statistics either way.
        anomaly_map_value: ``calibrated_likelihood`` (the default): the map upsamples and blurs each patch's
            likelihood per dimension, ``-exp(-NLL / D)``, capped by its standard score at its own position over the
            task's good training images, put on the task's overall scale (:meth:`PositionCalibration.calibrate_map`,
            fitted with the score statistics); ``likelihood``: that likelihood as it is (anomalib's Fastflow's map
            value); ``score``: the patch scores (the study's). The image score is the patch scores' either way. A
            scoring setting.
        task_separated: One whole flow per task instead of a shared base.
        router_eps: Relative ridge of each task's own router covariance.
        router_embedding: The router's image embedding: ``mean`` or ``max`` of the patch embeddings over the grid, or
            ``quadrant_max``, each channel's max in each quadrant of the grid averaged over the four.
        router_covariance: Covariance of the route: each ``task``'s own, or ``pooled`` over the tasks (see
            :class:`MahalanobisRouter`).
        unknown_factor: An image whose router distance exceeds ``unknown_factor`` times every task's threshold (the
            largest held-out distance of the task's training images) is an unknown product; ``None``: never.
        exact_likelihood: Train only transforms whose log-determinant the NLL counts: the whitening affine's
            ``sum(log gamma)`` is added to every patch's log-det and the spatial context keeps its initial gate
            and box kernel. ``False`` reproduces the study, which trains both without their Jacobian, so that
            maximum likelihood rewards them for shrinking the features (see ``docs/quality.md``).
        position_condition: Channels of a 2D sinusoidal positional code given to every coupling subnet as a
            condition (a density conditioned on where the patch is, as CFlow-AD's); 0: none.
        flow_layout: ``stage`` (the default): one density per backbone stage, on the stage's own grid with its share
            of ``embed_dim``, each with its own experts, adapters and score statistics; the stages' scores (and maps)
            are averaged on the finest grid (anomalib's Fastflow's layout; ``docs/quality.md`` 0k). ``joint``: one
            density over all stages' channels on the finest grid (the study's).
    """

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
        lora_alpha: float | None = None,
        use_lora: bool = True,
        use_whitening_adapter: bool = True,
        whitening_norm: WhiteningNorms = "image",
        use_pos_embedding: bool = True,
        spatial_context_kernel: int = 3,
        scale_context_kernel: int = 5,
        score_aggregation_top_k: int = 3,
        anomaly_map_sigma: float = 4.0,
        score_calibration: ScoreCalibration = "position",
        anomaly_map_value: AnomalyMapValue = "calibrated_likelihood",
        task_separated: bool = False,
        router_eps: float = 0.01,
        router_embedding: RouterEmbedding = "quadrant_max",
        router_covariance: RouterCovariance = "pooled",
        unknown_factor: float | None = 3.0,
        exact_likelihood: bool = True,
        position_condition: int = 0,
        flow_layout: FlowLayout = "stage",
    ) -> None:
        super().__init__()
        layers = tuple(layers)
        check(len(layers) >= 1, "layers must name at least one backbone stage.")
        check(image_size >= 32, f"image_size must be >= 32, got {image_size}.")
        feature_extractor = build_feature_extractor(backbone, layers, pre_trained)
        channels = sum(feature_extractor.out_dims)
        if embed_dim is None:
            embed_dim = default_embed_dim(channels)
            logger.info("embed_dim: %d (from %s %s: %d channels).", embed_dim, backbone, list(layers), channels)
        elif embed_dim > channels:
            logger.warning(
                "embed_dim %d exceeds the %d channels of %s %s: the extra channels are copies. embed_dim=None picks "
                "%d.",
                embed_dim,
                channels,
                backbone,
                list(layers),
                default_embed_dim(channels),
            )
        check(embed_dim >= 4 and embed_dim % 4 == 0, f"embed_dim must be a positive multiple of 4, got {embed_dim}.")
        check(patch_size >= 1 and patch_size % 2 == 1, f"patch_size must be a positive odd number, got {patch_size}.")
        check(num_coupling_layers >= 0, f"num_coupling_layers must be >= 0, got {num_coupling_layers}.")
        check(dia_blocks >= 0, f"dia_blocks must be >= 0, got {dia_blocks}.")
        check(num_coupling_layers + dia_blocks > 0, "num_coupling_layers and dia_blocks cannot both be 0.")
        check(lora_rank >= 1, f"lora_rank must be >= 1, got {lora_rank}.")
        check(
            position_condition >= 0 and position_condition % 4 == 0,
            f"position_condition must be 0 or a positive multiple of 4, got {position_condition}.",
        )
        norms = stage_whitening_norms(whitening_norm, list(layers), flow_layout)  # now, not at the first task
        for name, kernel in (
            ("spatial_context_kernel", spatial_context_kernel),
            ("scale_context_kernel", scale_context_kernel),
        ):
            check(kernel == 0 or (kernel > 0 and kernel % 2 == 1), f"{name} must be 0 (off) or odd, got {kernel}.")
        check(score_aggregation_top_k >= 1, f"score_aggregation_top_k must be >= 1, got {score_aggregation_top_k}.")
        check(anomaly_map_sigma >= 0, f"anomaly_map_sigma must be >= 0 (0: no blur), got {anomaly_map_sigma}.")
        check_choice("score_calibration", score_calibration, ScoreCalibration)
        check_choice("anomaly_map_value", anomaly_map_value, AnomalyMapValue)
        check_choice("flow_layout", flow_layout, FlowLayout)
        check(router_eps > 0, f"router_eps must be > 0, got {router_eps}.")
        check(unknown_factor is None or unknown_factor > 0, f"unknown_factor must be > 0, got {unknown_factor}.")
        #: Every constructor argument (``embed_dim`` and ``lora_alpha`` resolved): the checkpoint fingerprint's source.
        self.settings: dict[str, Any] = {
            **model_settings(locals()),
            "whitening_norm": whitening_norm if isinstance(whitening_norm, str) else plain_norms(whitening_norm),
            "embed_dim": embed_dim,
            "layers": list(layers),
            "lora_alpha": float(lora_alpha if lora_alpha is not None else lora_rank),
        }
        self.image_size = (image_size, image_size)
        self.embed_dim = embed_dim
        self.num_coupling_layers = num_coupling_layers
        self.dia_blocks = dia_blocks
        self.lora_rank = lora_rank
        self.lora_alpha = self.settings["lora_alpha"]
        self.use_lora = use_lora
        self.use_whitening_adapter = use_whitening_adapter
        self.spatial_context_kernel = spatial_context_kernel
        self.scale_context_kernel = scale_context_kernel
        self.score_aggregation_top_k = score_aggregation_top_k
        self.score_calibration = score_calibration
        self.anomaly_map_value = anomaly_map_value
        self.unknown_factor = unknown_factor
        self.task_separated = task_separated
        self.exact_likelihood = exact_likelihood
        self.position_condition = position_condition
        self.flow_layout = flow_layout

        self.feature_extractor = feature_extractor
        dims = stage_dims(feature_extractor.out_dims, embed_dim) if flow_layout == "stage" else None
        self.patch_embedding = PatchEmbedding(embed_dim, patch_size, dims)
        with torch.no_grad():
            probe = [f.shape[-2:] for f in self.feature_extractor(torch.zeros(1, 3, image_size, image_size)).values()]
        self.grid: tuple[int, int] = tuple(probe[0])  # type: ignore[assignment]
        flow = {
            "num_blocks": num_coupling_layers,
            "position_dims": position_condition,
            "spatial_context_kernel": spatial_context_kernel,
            "scale_context_kernel": scale_context_kernel,
            "rank": lora_rank,
            "alpha": self.lora_alpha,
            "use_lora": use_lora,
        }
        path = {
            "flow": flow,
            "use_whitening_adapter": use_whitening_adapter,
            "use_pos_embedding": use_pos_embedding,
            "dia_blocks": dia_blocks,
            "task_separated": task_separated,
            "exact_likelihood": exact_likelihood,
        }
        #: The densities: one over the whole embedding (``joint``), or one per stage (``stage``).
        self.paths = nn.ModuleList()
        #: The stage of each path (a stage with several whitening norms has a path per norm).
        self.path_stages: list[int] = []
        if dims is None:
            self.paths.append(FlowPath(embed_dim, self.grid, 0, None, None, whitening_norm=norms[0][0], **path))
            self.path_stages.append(0)
        else:
            for index, (dim, (height, width)) in enumerate(zip(dims, probe, strict=True)):
                rows, cols = _first_rows(height, self.grid[0]), _first_rows(width, self.grid[1])
                start = sum(dims[:index])
                for norm in norms[index]:
                    self.paths.append(FlowPath(dim, (height, width), start, rows, cols, whitening_norm=norm, **path))
                    self.path_stages.append(index)
        self.register_load_state_dict_pre_hook(_into_first_path)

        self.router = MahalanobisRouter(embed_dim, router_eps, router_embedding, router_covariance)
        self.task_names: list[str] = []
        self.anomaly_map_generator = AnomalyMapGenerator(sigma=anomaly_map_sigma)

    # ------------------------------------------------------------------ tasks
    # The first path's parts, by their names before paths existed (the joint layout has only that path).
    @property
    def whitening(self) -> nn.ModuleList:
        """The first path's whitening adapters, one per task."""
        return self.paths[0].whitening

    @property
    def dias(self) -> nn.ModuleList:
        """The first path's DIAs, one per task."""
        return self.paths[0].dias

    @property
    def calibrations(self) -> nn.ModuleList:
        """The first path's per-position score statistics, one per task."""
        return self.paths[0].calibrations

    @property
    def flows(self) -> nn.ModuleList:
        """The first path's coupling flows (one shared, or one per task)."""
        return self.paths[0].flows

    @property
    def pos_embedding(self) -> torch.Tensor | None:
        """The first path's positional code ``(h, w, d)``."""
        return self.paths[0].pos_embedding

    @property
    def num_tasks(self) -> int:
        """Number of tasks added so far."""
        return len(self.task_names)

    def flow_for(self, task: int | torch.Tensor) -> MoLEFlow:
        """The first path's coupling flow that serves ``task`` (see :meth:`FlowPath.flow_for`)."""
        return self.paths[0].flow_for(task)

    def add_task(self, name: str) -> int:
        """Create the expert, whitening adapter, DIA and router prototype of a new task.

        Every new part starts as the identity / the base, so the model's output for the new task equals the
        shared base's until it is trained.

        Returns:
            The new task's index.
        """
        if not name or name in self.task_names:
            msg = f"Task names must be unique and non-empty; '{name}' is already used or empty: {self.task_names}."
            raise ValueError(msg)
        index = len(self.task_names)
        self.task_names.append(name)
        for path in self.paths:
            path.add_task(index)
        self.router.add_task()
        self.to(next(self.feature_extractor.parameters()).device)
        return index

    def whitening_needs_fit(self, task: int) -> bool:
        """Whether ``task``'s whitening adapters must see the training features before its flow trains."""
        return any(isinstance(a := path.whitening[task], WhiteningAdapter) and a.needs_fit for path in self.paths)

    def accumulate_whitening(self, task: int, patches: torch.Tensor) -> None:
        """Collect ``(b, h, w, d)`` training patch embeddings for ``task``'s whitening statistics."""
        for path in self.paths:
            path.whitening[task].accumulate(path.with_position(path.select(patches)))

    def finalize_whitening(self, task: int) -> None:
        """Fit ``task``'s whitening statistics from what :meth:`accumulate_whitening` collected."""
        for path in self.paths:
            path.whitening[task].finalize()

    def fit_calibration(
        self,
        task: int,
        sums: Sequence[tuple[torch.Tensor, torch.Tensor]],
        map_sums: Sequence[tuple[torch.Tensor, torch.Tensor]],
        count: int,
    ) -> None:
        """Fit ``task``'s score statistics from float64 sums over its ``count`` good training images (scored by
        :meth:`train_patches` with the task's final weights): ``(total, total_squares)`` per path, each of the path's
        ``(h_p, w_p)``, of the patch NLLs (``sums``) and of their :func:`likelihood_map_value` (``map_sums``)."""
        for path, scores, map_values in zip(self.paths, sums, map_sums, strict=True):
            path.calibrations[task].fit(scores, map_values, count)

    def calibrate(self, scores: torch.Tensor, task: int | torch.Tensor, path: int = 0) -> torch.Tensor:
        """``(b, h_p, w_p)`` patch NLLs of one path as the task's patch scores (calibrated unless
        ``score_calibration="none"``).

        Args:
            scores: Patch NLLs of one task's images, or of images with a task each.
            task: The task, or a task index per image ``(b,)`` (each image's statistics gathered).
            path: Which path's statistics.
        """
        return self.paths[path].calibrate(scores, task, self.score_calibration)

    def task_parameters(self, task: int, trained_only: bool = True) -> list[nn.Parameter]:
        """Parameters owned by ``task`` alone (expert, whitening, DIA of every path; the whole flows when
        task-separated). ``trained_only=False`` adds the fixed spatial context of a task-separated flow (for size
        accounting)."""
        return [p for path in self.paths for p in path.task_parameters(task, trained_only)]

    def shared_parameters(self, trained_only: bool = True) -> list[nn.Parameter]:
        """Parameters shared by all tasks (empty when task-separated); trained ones only unless told otherwise."""
        return [p for path in self.paths for p in path.shared_parameters(trained_only)]

    def set_trainable(self, task: int, train_shared: bool) -> list[nn.Parameter]:
        """Freeze everything except ``task``'s own parameters (and the shared ones if ``train_shared``).

        Returns:
            The parameters left trainable.
        """
        self.requires_grad_(requires_grad=False)
        trainable = self.task_parameters(task) + (self.shared_parameters() if train_shared else [])
        for parameter in trainable:
            parameter.requires_grad_(requires_grad=True)
        return trainable

    def parameter_report(self) -> dict[str, Any]:
        """Parameter and byte counts: backbone, shared, and added per task (router and score statistics in bytes)."""

        def size(tensors: list[torch.Tensor]) -> tuple[int, int]:
            unique = {id(t): t for t in tensors}.values()
            return sum(t.numel() for t in unique), sum(t.numel() * t.element_size() for t in unique)

        per_task = []
        for task, name in enumerate(self.task_names):
            params, param_bytes = size(self.task_parameters(task, trained_only=False))
            statistics = [
                *self.router.prototypes[task].state_dict().values(),
                *(b for path in self.paths for b in path.calibrations[task].buffers()),
            ]
            _, statistics_bytes = size(statistics)
            per_task.append({"task": name, "params": params, "bytes": param_bytes + statistics_bytes})
        backbone_params, backbone_bytes = size(list(self.feature_extractor.parameters()))
        shared_params, shared_bytes = size(self.shared_parameters(trained_only=False))
        return {
            "backbone": {"params": backbone_params, "bytes": backbone_bytes},
            "shared": {"params": shared_params, "bytes": shared_bytes},
            "per_task": per_task,
        }

    # ------------------------------------------------------------ checkpoints
    def fingerprint(self) -> dict[str, Any]:
        """Settings that must match for a checkpoint to load into this model (all but :data:`RUNTIME_SETTINGS`)."""
        settings = {key: value for key, value in self.settings.items() if key not in RUNTIME_SETTINGS}
        return {"format": CHECKPOINT_FORMAT, **settings}

    def scoring_settings(self, task: int, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What ``task``'s scores and maps are made with: the values of :data:`SCORING_SETTINGS` that change them
        (what its thresholds and normalisation depend on), the model's now or, given, ``values`` (e.g. saved ones).

        ``score_calibration`` is the effective one: ``"position"`` when the task's scores are standardised (also for
        ``"held_out"``, which differs only in the images that fitted the statistics), ``"none"`` when they are raw
        (also for a task whose calibration was never fitted, e.g. learned before it existed).
        """
        if values is None:
            values = {
                "score_aggregation_top_k": self.score_aggregation_top_k,
                "anomaly_map_sigma": self.anomaly_map_generator.sigma,
                "score_calibration": self.score_calibration,
                "anomaly_map_value": self.anomaly_map_value,
            }
        calibrated = values["score_calibration"] != "none" and all(p.calibrations[task].fitted for p in self.paths)
        map_value = values["anomaly_map_value"]
        if map_value == "calibrated_likelihood" and not all(p.calibrations[task].map_fitted for p in self.paths):
            map_value = "likelihood"
        return {
            **{name: values[name] for name in SCORING_SETTINGS},
            "score_calibration": "position" if calibrated else "none",
            "anomaly_map_value": map_value,
        }

    def get_extra_state(self) -> dict[str, Any]:
        """Task names and settings, saved in the state dict so that loading can recreate every task."""
        return {"task_names": list(self.task_names), "fingerprint": self.fingerprint()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Recreate the saved tasks before their tensors are loaded (torch loads the parent before its children).

        Raises:
            ValueError: If the checkpoint was made with other settings or other tasks.
        """
        saved, current = state.get("fingerprint", {}), self.fingerprint()
        if saved.get("format") != CHECKPOINT_FORMAT:
            msg = (
                f"This checkpoint was written by another version of anomalib-moleflow (checkpoint format "
                f"{saved.get('format')}; this version reads format {CHECKPOINT_FORMAT}). Train the tasks again with "
                "this version, or load the checkpoint with the version that wrote it."
            )
            raise ValueError(msg)
        diff = differences({key: saved.get(key, INTRODUCED_SETTINGS.get(key)) for key in current}, current)
        if diff:
            details = ", ".join(f"{key}: checkpoint {old} vs model {new}" for key, old, new in diff)
            msg = (
                f"This checkpoint was made with another MoLE-Flow configuration ({details}). "
                "Build the model with the checkpoint's settings, e.g. `MoleFlow.load_from_checkpoint(path)`."
            )
            raise ValueError(msg)
        names = list(state.get("task_names", []))
        if names[: self.num_tasks] != self.task_names:
            msg = f"Checkpoint tasks {names} do not extend the model's tasks {self.task_names}."
            raise ValueError(msg)
        for name in names[self.num_tasks :]:
            self.add_task(name)

    # ---------------------------------------------------------------- forward
    def train(self, mode: bool = True) -> MoleFlowModel:
        """Set train mode, keeping the backbone in eval mode (frozen batch-norm statistics)."""
        super().train(mode)
        self.feature_extractor.eval()
        return self

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch embeddings ``(b, h, w, d)`` and image embeddings ``(b, d)`` (the router's pooling)."""
        with torch.no_grad():
            features = list(self.feature_extractor(images).values())
            patches = self.patch_embedding(features)
        return patches, self.router.embed(patches)

    def encode(
        self, patches: torch.Tensor, task: int | torch.Tensor, path: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map ``(b, h, w, d)`` patch embeddings through ``task``'s path to latents.

        Args:
            patches: Patch embeddings.
            task: One task for the batch, or a task index per image ``(b,)``: a routed batch that mixes tasks, run
                in one pass with each image's experts gathered (shared flow only).
            path: Which density (the ``stage`` layout has one per stage).

        Returns:
            Latent tokens ``((b h w), d)`` of the path's part and per-token log-determinants ``((b h w),)``.
        """
        flow_path = self.paths[path]
        return flow_path.encode(flow_path.select(patches), task)

    def flow_inputs(
        self, patches: torch.Tensor, task: int | torch.Tensor, path: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What enters ``task``'s invertible part of ``path``: positional code, whitening, spatial context.

        Args:
            patches: Patch embeddings ``(b, h, w, d)``.
            task: One task for the batch, or a task index per image ``(b,)`` (each image's adapter gathered).
            path: Which density.

        Returns:
            Tokens ``((b h w), d)`` and the whitening affine's log-determinant: one value for the batch (one task),
            per token ``((b h w),)`` (a task per image), or ``None`` without whitening adapters.
        """
        flow_path = self.paths[path]
        return flow_path.flow_inputs(flow_path.select(patches), task)

    @staticmethod
    def patch_nll(z: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood per patch: ``0.5 * ||z||^2 - log|det J|``."""
        return 0.5 * z.pow(2).sum(dim=-1) - log_det

    def train_patches(self, patches: torch.Tensor, task: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Training pass of ``(b, h, w, d)`` patch embeddings (from :meth:`embed` or a feature cache).

        Returns:
            Per path: patch NLL ``(b, h_p*w_p)`` and patch log-determinants ``(b, h_p*w_p)``.
        """
        batch = patches.shape[0]
        out = []
        for path in range(len(self.paths)):
            z, log_det = self.encode(patches, task, path)
            nll = rearrange(self.patch_nll(z, log_det), "(b n) -> b n", b=batch)
            out.append((nll, rearrange(log_det, "(b n) -> b n", b=batch)))
        return out

    def route(self, image_embedding: torch.Tensor, tasks: torch.Tensor | None = None) -> Routed:
        """Task, router distance and unknown-product flag of each image (``tasks``: given instead of routed)."""
        return self.router.route(image_embedding, self.unknown_factor, tasks)

    def predict(
        self,
        images: torch.Tensor,
        tasks: torch.Tensor | None = None,
        patches: torch.Tensor | None = None,
    ) -> tuple[InferenceBatch, Routed]:
        """Score images, each with the expert of its routed (or given) task.

        Args:
            images: ``(b, 3, H, W)`` pre-processed images.
            tasks: Optional true task index per image (oracle routing); routed when ``None``.
            patches: The images' patch embeddings ``(b, h, w, d)`` when already computed (a feature cache).

        Returns:
            The predictions, and the routing of each image (task used, router distance, unknown product).
        """
        if patches is None:
            patches, _ = self.embed(images)
        return self.score_patches(patches, tasks, tuple(images.shape[-2:]))

    def score_patches(
        self, patches: torch.Tensor, tasks: torch.Tensor | None, output_size: tuple[int, int]
    ) -> tuple[InferenceBatch, Routed]:
        """Route and score ``(b, h, w, d)`` patch embeddings; anomaly maps of ``output_size`` ``(H, W)``."""
        if self.num_tasks == 0:
            msg = "MoLE-Flow has no task yet: call `add_task(name)` and train before predicting."
            raise RuntimeError(msg)
        routed = self.route(self.router.embed(patches), tasks)
        scores, map_values = [], []
        for index in range(len(self.paths)):
            score, map_value = self._path_scores(patches, routed.task, index)
            scores.append(self._on_grid(score))
            map_values.append(self._on_grid(map_value))
        # the stages' scores on an equal footing: each is calibrated per position (or a per-dimension likelihood)
        score_map, map_value = self._stages_mean(scores), self._stages_mean(map_values)
        anomaly_map = self.anomaly_map_generator(map_value, output_size)
        pred_score = top_k_image_score(score_map, self.score_aggregation_top_k)
        return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map), routed

    def _path_scores(
        self, patches: torch.Tensor, image_tasks: torch.Tensor, path: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One path's patch scores and map values ``(b, h_p, w_p)``, each image with its task's expert."""
        height, width = self.paths[path].grid
        if self.task_separated or not torch.compiler.is_exporting():
            # Eager: one pass per task present, with plain linears (gathering per-image weights was slower on CPU).
            shape = (patches.shape[0], height, width)
            scores = patches.new_zeros(shape, dtype=torch.float32)  # float32 also under mixed precision
            map_values = torch.zeros_like(scores)
            for task in image_tasks.unique().tolist():
                selected = image_tasks == task
                z, log_det = self.encode(patches[selected], task, path)
                nll = rearrange(self.patch_nll(z, log_det).float(), "(b h w) -> b h w", h=height, w=width)
                scores[selected], map_values[selected] = self._score_and_map(nll, task, path)
            return scores, map_values
        # An exported graph cannot branch on the routed tasks: one pass, each image's expert weights gathered.
        z, log_det = self.encode(patches, image_tasks, path)
        nll = rearrange(self.patch_nll(z, log_det).float(), "(b h w) -> b h w", h=height, w=width)
        return self._score_and_map(nll, image_tasks, path)

    def _score_and_map(
        self, nll: torch.Tensor, task: int | torch.Tensor, path: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b, h_p, w_p)`` patch NLLs of one path as its patch scores and its map values (``anomaly_map_value``)."""
        score = self.calibrate(nll, task, path)
        if self.anomaly_map_value == "score":
            return score, score
        likelihood = likelihood_map_value(nll, self.paths[path].dim)
        if self.anomaly_map_value == "likelihood":
            return score, likelihood
        return score, self.paths[path].calibrate_map(likelihood, task)

    def _stages_mean(self, values: list[torch.Tensor]) -> torch.Tensor:
        """The mean over the stages of each stage's paths' mean, of one ``(b, h, w)`` tensor per path."""
        stages = sorted(set(self.path_stages))
        return _mean([_mean([v for v, s in zip(values, self.path_stages, strict=True) if s == i]) for i in stages])

    def _on_grid(self, values: torch.Tensor) -> torch.Tensor:
        """``(b, h_p, w_p)`` values of a path on the finest grid ``(b, h, w)`` (bilinear, as the map upsamples)."""
        if tuple(values.shape[-2:]) == self.grid:
            return values
        return F.interpolate(values[:, None], size=self.grid, mode="bilinear", align_corners=False)[:, 0]

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        """Routed inference (used by export and by ``AnomalibModule.forward``)."""
        predictions, _ = self.predict(images)
        return predictions

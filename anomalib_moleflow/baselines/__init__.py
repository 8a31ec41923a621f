"""anomalib's own baselines (Fastflow, Patchcore, Padim) set up for the benchmark, and the router that picks one.

* :class:`TimmFastflow`: anomalib's ``Fastflow`` extended (by subclassing) to any timm CNN backbone and stages,
  including ``tf_efficientnet_lite0`` with its offline ImageNet weights;
* :class:`TimmPatchcore` and :class:`TimmPadim`: anomalib's ``Patchcore`` and ``Padim`` whose backbone weights come
  from the same place as MoLE-Flow's;
* :class:`TaskRouter` and :class:`RoutedExperts`: one model per task, and MoLE-Flow's Mahalanobis router choosing
  which model scores each image.

All of them evaluate with the package's metrics (image/pixel AUROC and AUPR, pixel AUPRO), see
:func:`anomalib_moleflow.metrics.default_evaluator`.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "common": ["non_backbone_size", "tensor_size"],
        "fastflow": ["TimmFastflow", "TimmFastflowModel"],
        "padim": ["TimmPadim"],
        "patchcore": ["TimmPatchcore"],
        "routing": ["RoutedExperts", "RoutedModels", "TaskRouter"],
    },
)

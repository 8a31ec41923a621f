"""``moleflow export``: one artefact with the router and every task's expert, and the loader that runs it.

Choice: **one graph for all tasks**, not one graph per task behind a loader. MoLE-Flow's tasks share the backbone
and the flow's base weights; per-task graphs would copy them into every file (tens of MB per product at the MAIN
configuration instead of the few MB of its expert) and move routing into hand-written loader code. Here each
image's expert weights are gathered inside the graph (:meth:`MoleFlowModel.encode` with a task per image), so the
graph has no data-dependent branch, exports as is, and costs one expert per image whatever the number of tasks.

Formats:
    ``onnx``: ``model.onnx`` (ONNX Runtime), ``openvino``: ``model.xml/.bin`` (OpenVINO). Both output the routing
    too (:data:`~anomalib_moleflow.models.moleflow.export.ROUTED_OUTPUTS`) and come with ``metadata.json`` and
    ``moleflow_inferencer.py`` (:mod:`anomalib_moleflow.deploy.inferencer`), which runs them without torch.
    ``torch``: anomalib's pickled ``weights/torch/model.pt`` for anomalib's ``TorchInferencer`` (four outputs).
    anomalib's own ``engine.export(model, ExportType.ONNX | OPENVINO)`` also works; it writes the four outputs that
    anomalib's inferencers read, routing included but not reported.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from pathlib import Path

import torch

from anomalib_moleflow.compat import uncompile
from anomalib_moleflow.deploy import inferencer as deploy_inferencer
from anomalib_moleflow.io import claim_output_dir
from anomalib_moleflow.models import MoleFlow
from anomalib_moleflow.models.moleflow.export import ROUTED_OUTPUTS, RoutedGraph
from anomalib_moleflow.models.moleflow.lightning_model import ONNX_OPSET

from .options import ExportFormat, check_export_format

logger = logging.getLogger(__name__)

#: The loader's name beside the model.
LOADER_NAME = "moleflow_inferencer.py"
#: What an export writes in its folder (removed by ``overwrite``).
EXPORT_OUTPUTS: tuple[str, ...] = ("model.onnx", "model.xml", "model.bin", "metadata.json", LOADER_NAME, "weights")


def export_routed_onnx(model: MoleFlow, path: Path | str) -> Path:
    """Write ``model``'s :class:`RoutedGraph` to ONNX: any batch size, images at ``image_size`` in [0, 1].

    The height and width are fixed: the loader resizes like the PyTorch side does (antialiased bilinear), while the
    graph's own resize (anomalib's export transform) is not antialiased and would score resized images differently.
    """
    path = Path(path)
    graph = RoutedGraph(model.eval().cpu()).eval()
    height, width = model.model.image_size
    example = torch.rand(2, 3, height, width)  # batch 2: a size-1 example would be specialised to 1
    dims = {0: torch.export.Dim("batch")}
    with torch.no_grad():
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=["image"],
            output_names=list(ROUTED_OUTPUTS),
            dynamo=True,
            dynamic_shapes={"images": dims},
            opset_version=ONNX_OPSET,
            external_data=False,  # one file (ONNX's limit of 2 GB is far above MoLE-Flow's size)
            verbose=False,
        )
    return path


def export_model(
    model: MoleFlow, output: Path | str, export_format: ExportFormat = "onnx", overwrite: bool = False
) -> Path:
    """Export a trained model with all its tasks into ``output``; returns the model file.

    The model is moved to the CPU and set to eval mode; modules compiled by ``compile_mode`` are exported uncompiled.

    Raises:
        ValueError: For an unknown format, a model without tasks, or a task-separated model (one flow per task).
        FileExistsError: If ``output`` holds an earlier export and ``overwrite`` is not set.
        ModuleNotFoundError: If a package the format needs is not installed (before anything is written).
    """
    check_export_format(export_format)  # before the folder exists
    if model.model.num_tasks == 0:
        msg = "The model has no task: train it (`moleflow continual`) before exporting."
        raise ValueError(msg)
    if model.model.task_separated and export_format != "torch":
        msg = "A task-separated model (the one-flow-per-task ablation) has no single routed graph: export it as torch."
        raise ValueError(msg)
    output = Path(output)
    openvino = importlib.import_module("openvino") if export_format == "openvino" else None
    claim_output_dir(output, EXPORT_OUTPUTS, resume=False, overwrite=overwrite, resumable=False)
    output.mkdir(parents=True, exist_ok=True)
    uncompile(model)  # torch.compile's in-place wrapper is neither picklable nor traceable by the exporter
    if export_format == "torch":
        return model.eval().cpu().to_torch(output)  # anomalib's: weights/torch/model.pt
    onnx_path = export_routed_onnx(model, output / "model.onnx")
    path = onnx_path
    if openvino is not None:
        path = output / "model.xml"
        # fp32: an fp16 model would not match PyTorch within 1e-3.
        openvino.save_model(openvino.convert_model(onnx_path), path, compress_to_fp16=False)
        onnx_path.unlink()
    metadata = {
        "format": export_format,
        "task_names": model.task_names,
        "image_size": list(model.model.image_size),
        "input": "image: (batch, 3, image_size[0], image_size[1]) float32 RGB in [0, 1] (the loader resizes files)",
        "outputs": list(ROUTED_OUTPUTS),
        "opset": ONNX_OPSET,
    }
    (output / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    shutil.copyfile(deploy_inferencer.__file__, output / LOADER_NAME)
    logger.info("Exported %d task(s) to '%s' (run it with `python %s`).", model.model.num_tasks, path, LOADER_NAME)
    return path

"""Score images with a ``moleflow export`` artefact: no torch, no anomalib, no training code.

``moleflow export`` copies this file beside the model as ``moleflow_inferencer.py``. On the inspection PC it needs
numpy, Pillow and the artefact's runtime (``onnxruntime`` for ``model.onnx``, ``openvino`` for ``model.xml``)::

    python moleflow_inferencer.py model.onnx IMAGE_OR_FOLDER --csv predictions.csv

or, from Python::

    from moleflow_inferencer import RoutedInferencer
    inferencer = RoutedInferencer("model.onnx")
    for prediction in inferencer.predict_files(["a.png", "b.png"]):
        print(prediction.routed_task, prediction.score, prediction.label)

The model itself routes each image to its product's expert, scores it, and normalises the score with that
product's statistics (0.5 is the product's threshold); ``metadata.json`` beside it names the products. This file
imports nothing from the package, so it can travel alone.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: Columns of the CSV, the same as ``moleflow predict``'s.
COLUMNS = (
    "image_path",
    "routed_task",
    "router_distance",
    "unknown_product",
    "raw_score",
    "normalized_score",
    "label",
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


@dataclass
class RoutedPrediction:
    """One image's result.

    Attributes:
        path: The image file ("" for an array).
        routed_task: Name of the product the image was routed to.
        router_distance: Squared Mahalanobis distance to that product's prototype.
        unknown_product: The image is far from every learned product (scored anomalous).
        raw_score: Image score before normalisation (mean of the top-k patch negative log-likelihoods).
        score: Normalised score in [0, 1]; above 0.5 is anomalous for the routed product.
        label: "anomalous" or "normal".
        anomaly_map: ``(H, W)`` normalised anomaly map at the model's input size.
    """

    path: str
    routed_task: str
    router_distance: float
    unknown_product: bool
    raw_score: float
    score: float
    label: str
    anomaly_map: np.ndarray

    def row(self) -> list[str]:
        """The prediction as a CSV row of :data:`COLUMNS`."""
        return [
            self.path,
            self.routed_task,
            f"{self.router_distance:.6g}",
            str(int(self.unknown_product)),
            f"{self.raw_score:.6g}",
            f"{self.score:.6g}",
            self.label,
        ]


def read_image(path: Path | str) -> np.ndarray:
    """An image file as ``(3, H, W)`` float32 in [0, 1] (grayscale and RGBA converted to RGB, like anomalib)."""
    with Image.open(path) as image:
        if image.mode in {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}:
            msg = f"'{path}' has 16-bit or float pixels: convert it to 8 bits first (`moleflow convert-8bit`)."
            raise ValueError(msg)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def image_files(source: Path | str) -> list[Path]:
    """An image file, or the images of a folder (nested folders included), sorted."""
    source = Path(source)
    if not source.exists():
        msg = f"'{source}' does not exist: pass an image file or a folder of images."
        raise FileNotFoundError(msg)
    if source.is_file():
        return [source]
    files = sorted(path for path in source.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        msg = f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) under '{source}'."
        raise FileNotFoundError(msg)
    return files


class RoutedInferencer:
    """An exported MoLE-Flow model (``model.onnx`` or OpenVINO ``model.xml``) and its ``metadata.json``.

    Args:
        path: The model file.
        device: OpenVINO device (``CPU``, ``GPU``, ...); ONNX Runtime picks its providers, CUDA first when present.
    """

    def __init__(self, path: Path | str, device: str = "CPU") -> None:
        path = Path(path)
        metadata_path = path.parent / "metadata.json"
        if not path.is_file() or not metadata_path.is_file():
            msg = f"'{path}' and a metadata.json beside it are needed: pass the model file `moleflow export` wrote."
            raise FileNotFoundError(msg)
        self.metadata = json.loads(metadata_path.read_text())
        self.task_names: list[str] = list(self.metadata["task_names"])
        self.outputs: list[str] = list(self.metadata["outputs"])
        if path.suffix == ".onnx":
            import onnxruntime

            available = onnxruntime.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
            session = onnxruntime.InferenceSession(str(path), providers=providers)
            input_name = session.get_inputs()[0].name
            self._run = lambda images: session.run(None, {input_name: images})
        elif path.suffix == ".xml":
            import openvino

            # f32: on CPUs with bf16 units OpenVINO would otherwise run in bf16, off by ~1e-2 from PyTorch.
            compiled = openvino.Core().compile_model(str(path), device, {"INFERENCE_PRECISION_HINT": "f32"})
            self._run = lambda images: list(compiled(images).to_tuple())
        else:
            msg = f"'{path}': expected model.onnx or model.xml."
            raise ValueError(msg)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The model's raw outputs (named by ``metadata.json``) for ``(b, 3, H, W)`` float32 images in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            msg = f"Expected (batch, 3, height, width) images, got shape {images.shape}."
            raise ValueError(msg)
        return dict(zip(self.outputs, self._run(np.ascontiguousarray(images, dtype=np.float32)), strict=True))

    def predict(self, images: np.ndarray, paths: Sequence[str] | None = None) -> list[RoutedPrediction]:
        """Score ``(b, 3, H, W)`` images in [0, 1] (any size: the model resizes)."""
        out = self.run(images)
        paths = list(paths) if paths is not None else [""] * len(images)
        return [
            RoutedPrediction(
                path=paths[i],
                routed_task=self.task_names[int(out["routed_task"][i])],
                router_distance=float(out["router_distance"][i]),
                unknown_product=bool(out["unknown_product"][i]),
                raw_score=float(out["raw_score"][i]),
                score=float(out["pred_score"][i]),
                label="anomalous" if bool(out["pred_label"][i]) else "normal",
                anomaly_map=out["anomaly_map"][i].reshape(out["anomaly_map"].shape[-2:]),
            )
            for i in range(len(images))
        ]

    def predict_files(self, files: Sequence[Path | str], batch_size: int = 8) -> Iterator[RoutedPrediction]:
        """Score image files, ``batch_size`` at a time (images of one size share a batch)."""
        batch: list[np.ndarray] = []
        names: list[str] = []
        for file in files:
            image = read_image(file)
            if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
                yield from self.predict(np.stack(batch), names)
                batch, names = [], []
            batch.append(image)
            names.append(str(file))
        if batch:
            yield from self.predict(np.stack(batch), names)


def main(argv: Sequence[str] | None = None) -> int:
    """``python moleflow_inferencer.py MODEL INPUT [--csv FILE] [--batch_size N] [--device CPU]``."""
    parser = argparse.ArgumentParser(description="Score images with an exported MoLE-Flow model.")
    parser.add_argument("model", help="model.onnx or model.xml written by `moleflow export`.")
    parser.add_argument("input", help="An image, or a folder of images (nested folders included).")
    parser.add_argument("--csv", default="predictions.csv", help="Output CSV (default: predictions.csv).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="CPU", help="OpenVINO device.")
    args = parser.parse_args(argv)
    try:
        inferencer = RoutedInferencer(args.model, args.device)
        files = image_files(args.input)
        with Path(args.csv).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            for prediction in inferencer.predict_files(files, args.batch_size):
                writer.writerow(prediction.row())
    except (FileNotFoundError, ValueError, OSError) as error:
        sys.stderr.write(f"moleflow_inferencer: error: {error}\n")
        return 1
    sys.stdout.write(f"{args.csv}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

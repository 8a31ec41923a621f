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
import importlib
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
    "error",
)
#: anomalib's mask folders (MVTec layout): their files are masks, not images to score.
MASK_FOLDERS = frozenset({"ground_truth"})
#: Image file suffixes read from folders.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
#: PIL modes with more than 8 bits per channel, which anomalib's reader (``convert("RGB")``) clips to white.
WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


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

    error: str = ""

    def row(self) -> list[str]:
        """The prediction as a CSV row of :data:`COLUMNS` (only the path and the error when it failed)."""
        if self.error:
            return [self.path, *[""] * (len(COLUMNS) - 2), self.error]
        return [
            self.path,
            self.routed_task,
            f"{self.router_distance:.6g}",
            str(int(self.unknown_product)),
            f"{self.raw_score:.6g}",
            f"{self.score:.6g}",
            self.label,
            "",
        ]

    @classmethod
    def failed(cls, path: str, error: str) -> RoutedPrediction:
        """An image that could not be scored, and why."""
        return cls(path, "", float("nan"), False, float("nan"), float("nan"), "", np.zeros((0, 0)), error)


def overlay_name(task: str, label: str, score: float, file: Path | str) -> str:
    """File name of an image's overlay: ``TASK_LABEL_SCORE_NAME.png``."""
    return f"{task}_{label}_{score:.3f}_{Path(file).stem}.png"


def overlay_path(folder: Path, file: Path, source: Path) -> Path:
    """Where ``file``'s overlay goes: its path below ``source`` mirrored under ``folder``, as a PNG.

    Unique per image (``a/000.png`` and ``b/000.png`` get two overlays); a non-PNG keeps its suffix in the name
    (``000.jpg`` -> ``000.jpg.png``), so that ``000.png`` and ``000.jpg`` beside each other do not collide either.
    """
    relative = file.relative_to(source) if file.is_relative_to(source) else Path(file.name)
    return folder / (relative if relative.suffix.lower() == ".png" else relative.with_name(relative.name + ".png"))


def read_image(path: Path | str, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image file as ``(3, H, W)`` float32 in [0, 1] (grayscale and RGBA converted to RGB, like anomalib).

    Args:
        path: The file.
        size: ``(height, width)`` to resize to: bilinear with antialiasing on the [0, 1] floats, per channel, which is
            what the PyTorch side does (torchvision's ``resize(antialias=True)``, which matches PIL's).
    """
    with Image.open(path) as image:
        if image.mode in WIDE_MODES:
            msg = f"'{path}' has 16-bit or float pixels (PIL mode {image.mode}): convert it to 8 bits first."
            raise ValueError(msg)
        rgb = image.convert("RGB")
    pixels = np.asarray(rgb, dtype=np.float32) / 255.0
    if size is not None and pixels.shape[:2] != tuple(size):
        channels = [Image.fromarray(np.ascontiguousarray(pixels[..., c]), mode="F") for c in range(3)]
        resized = [channel.resize((size[1], size[0]), Image.Resampling.BILINEAR) for channel in channels]
        pixels = np.stack([np.asarray(channel, dtype=np.float32) for channel in resized], axis=-1)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def scoreable_files(source: Path | str) -> tuple[list[Path], int]:
    """:func:`image_files` without the files in anomalib's mask folders (:data:`MASK_FOLDERS`), and how many those were.

    Raises:
        FileNotFoundError: If ``source`` does not exist.
        ValueError: If it holds no image, or only masks.
    """
    source = Path(source)
    files = image_files(source)
    root = source if source.is_dir() else source.parent
    kept = [path for path in files if not MASK_FOLDERS.intersection(path.relative_to(root).parts[:-1])]
    if not kept:
        msg = f"'{source}' holds only mask files (under {'/'.join(sorted(MASK_FOLDERS))}): pass a folder of images."
        raise ValueError(msg)
    return kept, len(files) - len(kept)


def image_files(source: Path | str) -> list[Path]:
    """An image file, or the images of a folder (nested folders included), sorted.

    Raises:
        FileNotFoundError: If ``source`` does not exist.
        ValueError: If it holds no image.
    """
    source = Path(source)
    if not source.exists():
        msg = f"'{source}' does not exist: pass an image file or a folder of images."
        raise FileNotFoundError(msg)
    if source.is_file():
        return [source]
    files = sorted(path for path in source.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        msg = f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) under '{source}'."
        raise ValueError(msg)
    return files


class RoutedInferencer:
    """An exported MoLE-Flow model (``model.onnx`` or OpenVINO ``model.xml``) and its ``metadata.json``.

    Args:
        path: The model file.
        device: OpenVINO device (``CPU``, ``GPU``, ...); ONNX Runtime picks its providers, CUDA first when present.
        threads: CPU threads of the runtime (``None``: its default, every core).
    """

    def __init__(self, path: Path | str, device: str = "CPU", threads: int | None = None) -> None:
        path = Path(path)
        metadata_path = path.parent / "metadata.json"
        if not path.is_file() or not metadata_path.is_file():
            msg = f"'{path}' and a metadata.json beside it are needed: pass the model file `moleflow export` wrote."
            raise FileNotFoundError(msg)
        self.metadata = json.loads(metadata_path.read_text())
        self.task_names: list[str] = list(self.metadata["task_names"])
        self.outputs: list[str] = list(self.metadata["outputs"])
        self.image_size: tuple[int, int] = tuple(self.metadata["image_size"])  # type: ignore[assignment]
        if path.suffix not in {".onnx", ".xml"}:
            msg = f"'{path}': expected model.onnx or model.xml."
            raise ValueError(msg)
        runtime = "onnxruntime" if path.suffix == ".onnx" else "openvino"
        try:
            module = importlib.import_module(runtime)
        except ImportError as error:
            msg = f"Running '{path.name}' needs {runtime}: `pip install {runtime}`."
            raise ImportError(msg) from error
        if runtime == "onnxruntime":
            options = module.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            available = module.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
            session = module.InferenceSession(str(path), options, providers=providers)
            input_name = session.get_inputs()[0].name
            self._run = lambda images: session.run(None, {input_name: images})
        else:
            # f32: on CPUs with bf16 units OpenVINO would otherwise run in bf16, off by ~1e-2 from PyTorch.
            config = {"INFERENCE_PRECISION_HINT": "f32"} | ({"INFERENCE_NUM_THREADS": threads} if threads else {})
            compiled = module.Core().compile_model(str(path), device, config)
            self._run = lambda images: list(compiled(images).to_tuple())

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The model's raw outputs (named by ``metadata.json``) for ``(b, 3, H, W)`` float32 images in [0, 1].

        ``(H, W)`` is the model's ``image_size`` (:func:`read_image` resizes files to it).
        """
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != self.image_size:
            msg = f"Expected (batch, 3, {self.image_size[0]}, {self.image_size[1]}) images, got shape {images.shape}."
            raise ValueError(msg)
        return dict(zip(self.outputs, self._run(np.ascontiguousarray(images, dtype=np.float32)), strict=True))

    def predict(self, images: np.ndarray, paths: Sequence[str] | None = None) -> list[RoutedPrediction]:
        """Score ``(b, 3, H, W)`` images in [0, 1] at the model's ``image_size``."""
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
        """Score image files of any size, ``batch_size`` at a time (each resized to the model's ``image_size``).

        A file that cannot be read, or whose score is not finite, yields a failed prediction (its ``error`` says
        why) and the others are still scored.
        """
        files = list(files)
        for begin in range(0, len(files), batch_size):
            readable, images = [], []
            for file in files[begin : begin + batch_size]:
                try:
                    images.append(read_image(file, self.image_size))
                except (OSError, ValueError, SyntaxError) as error:
                    yield RoutedPrediction.failed(str(file), f"unreadable image ({error})")
                    continue
                readable.append(str(file))
            if not readable:
                continue
            for prediction in self.predict(np.stack(images), readable):
                if not (np.isfinite(prediction.raw_score) and np.isfinite(prediction.score)):
                    reason = "non-finite score: the model is damaged or diverged (export it again)"
                    yield RoutedPrediction.failed(prediction.path, reason)
                else:
                    yield prediction


def main(argv: Sequence[str] | None = None) -> int:
    """``python moleflow_inferencer.py MODEL INPUT [--csv FILE] [--batch_size N] [--device CPU]``."""
    parser = argparse.ArgumentParser(description="Score images with an exported MoLE-Flow model.")
    parser.add_argument("model", help="model.onnx or model.xml written by `moleflow export`.")
    parser.add_argument("input", help="An image, or a folder of images (nested folders included).")
    parser.add_argument("--csv", default="predictions.csv", help="Output CSV (default: predictions.csv).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="CPU", help="OpenVINO device.")
    args = parser.parse_args(argv)
    failed: list[str] = []
    try:
        inferencer = RoutedInferencer(args.model, args.device)
        files, skipped = scoreable_files(args.input)
        with Path(args.csv).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            for prediction in inferencer.predict_files(files, args.batch_size):
                writer.writerow(prediction.row())
                if prediction.error:
                    failed.append(f"{prediction.path}: {prediction.error}")
                    sys.stderr.write(f"moleflow_inferencer: {prediction.path}: {prediction.error}\n")
    except (ValueError, OSError, ImportError) as error:
        sys.stderr.write(f"moleflow_inferencer: error: {error}\n")
        return 1
    note = f"; {skipped} mask file(s) skipped" if skipped else ""
    sys.stdout.write(f"{args.csv}: {len(files) - len(failed)} image(s) scored{note}\n")
    if failed:
        sys.stderr.write(f"moleflow_inferencer: error: {len(failed)} image(s) could not be scored (see the CSV).\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

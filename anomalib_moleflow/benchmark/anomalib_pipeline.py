"""anomalib's ``benchmark`` pipeline, with a results table that accepts models reporting different metrics.

anomalib 2.7's ``BenchmarkJob.collect`` builds its table from the keys of the *first* job only, so a grid that mixes
models with other settings or metrics (MoLE-Flow beside Patchcore and Fastflow) ends in a ``KeyError`` after every job
ran. :class:`Benchmark` is anomalib's pipeline whose job generator names :class:`BenchmarkJob`, whose ``collect``
takes the union of the keys (empty cells where a job has no such key). Jobs, runners and saving are anomalib's.

``moleflow anomalib benchmark --config FILE`` runs it; ``anomalib benchmark`` itself stays as shipped.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from anomalib.pipelines import Benchmark as AnomalibBenchmark
from anomalib.pipelines.benchmark.generator import BenchmarkJobGenerator as AnomalibJobGenerator
from anomalib.pipelines.benchmark.job import BenchmarkJob as AnomalibBenchmarkJob
from anomalib.pipelines.components.base import Runner
from anomalib.pipelines.components.runners import ParallelRunner, SerialRunner


class BenchmarkJob(AnomalibBenchmarkJob):
    """anomalib's benchmark job; its table is built over the union of the jobs' keys."""

    @staticmethod
    def collect(results: list[dict[str, Any]]) -> pd.DataFrame:
        """One row per job, one column per key that any job reported."""
        return pd.DataFrame(results)


class BenchmarkJobGenerator(AnomalibJobGenerator):
    """anomalib's job generator; results are collected by :class:`BenchmarkJob`."""

    @property
    def job_class(self) -> type:
        """:class:`BenchmarkJob`."""
        return BenchmarkJob


class Benchmark(AnomalibBenchmark):
    """anomalib's benchmark pipeline with :class:`BenchmarkJobGenerator` (same runners: serial, or one per GPU)."""

    @staticmethod
    def _setup_runners(args: dict) -> list[Runner]:
        accelerators = args["accelerator"] if isinstance(args["accelerator"], list) else [args["accelerator"]]
        runners: list[Runner] = []
        for accelerator in accelerators:
            if accelerator not in {"cpu", "cuda"}:
                msg = f"Unsupported accelerator: {accelerator}. Use 'cpu' or 'cuda'."
                raise ValueError(msg)
            device_count = torch.cuda.device_count()
            if device_count <= 1 or accelerator == "cpu":
                runners.append(SerialRunner(BenchmarkJobGenerator(accelerator)))
            else:
                runners.append(ParallelRunner(BenchmarkJobGenerator(accelerator), n_jobs=device_count))
        return runners

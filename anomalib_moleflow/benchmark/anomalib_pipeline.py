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
from anomalib.pipelines.benchmark.generator import BenchmarkJobGenerator as AnomalibJobGenerator
from anomalib.pipelines.benchmark.job import BenchmarkJob as AnomalibBenchmarkJob

from anomalib_moleflow.compat import benchmark_pipeline


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


#: anomalib's benchmark pipeline with :class:`BenchmarkJobGenerator` (same runners: serial, or one per GPU).
Benchmark = benchmark_pipeline(BenchmarkJobGenerator)

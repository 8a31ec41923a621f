"""Benchmark: MoLE-Flow against anomalib's Fastflow, Patchcore and Padim on the same continual task sequence.

``moleflow benchmark --config configs/benchmark/NAME.yaml --output DIR`` (or :func:`run_benchmark`) runs, on the same
tasks, backbone and image size: MoLE-Flow (frozen base), and anomalib's Fastflow and Patchcore each in three regimes
(``finetune``: one model trained task after task; ``separate``: one model per task chosen by MoLE-Flow's router;
``joint``: one model on all tasks at once), and Padim (``separate``, ``joint``). ``seeds: [...]`` runs the table
once per seed and adds the mean ± half-range table ``seeds.md``. Every row runs through the same continual engine.
It writes ``benchmark.json``, ``.csv``, ``.md`` and ``.png`` in ``DIR``, and each row's details under ``DIR/rows/``.

:mod:`.anomalib_pipeline` holds anomalib's own ``benchmark`` pipeline with a table that accepts mixed models.
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={"config": ["ROWS", "RowSpec", "benchmark_parser"], "runner": ["run_benchmark"]},
)

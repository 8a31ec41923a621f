"""What a benchmark writes (no heavy import: the command line refuses a used folder at once)."""

from __future__ import annotations

#: What a benchmark writes into its output folder (``overwrite`` deletes these and nothing else).
BENCHMARK_OUTPUTS: tuple[str, ...] = (
    "benchmark.json",
    "benchmark.csv",
    "benchmark.md",
    "benchmark.png",
    "seeds.json",
    "seeds.md",
    "rows",
    "seed_[0-9]*",
)

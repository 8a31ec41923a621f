"""Reports: the continual results (matrix, forgetting, tables), the benchmark table, plots and overlays."""

import lazy_loader

# Submodules load on first use: the `moleflow` command answers --help without importing torch or anomalib.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "benchmark_table": ["COLUMNS", "seeds_markdown", "summarize_seeds", "write_report"],
        "plots": ["plot_final_bars", "plot_matrix_heatmaps", "save_overlays"],
        "results": ["clean", "markdown_table", "read_csv", "summarize", "write_results", "write_routing_csv"],
    },
)

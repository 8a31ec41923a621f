"""Reports: the continual results (matrix, forgetting, tables), the benchmark table, plots and overlays."""

from .benchmark_table import COLUMNS, seeds_markdown, summarize_seeds, write_report
from .plots import plot_final_bars, plot_matrix_heatmaps, save_overlays
from .results import clean, markdown_table, read_csv, summarize, write_results, write_routing_csv

__all__ = [
    "COLUMNS",
    "clean",
    "markdown_table",
    "plot_final_bars",
    "plot_matrix_heatmaps",
    "read_csv",
    "save_overlays",
    "seeds_markdown",
    "summarize",
    "summarize_seeds",
    "write_report",
    "write_results",
    "write_routing_csv",
]

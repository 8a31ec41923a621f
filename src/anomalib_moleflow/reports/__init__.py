"""Plots and overlays of continual and benchmark results."""

from .plots import plot_final_bars, plot_matrix_heatmaps, save_overlays

__all__ = ["plot_final_bars", "plot_matrix_heatmaps", "save_overlays"]

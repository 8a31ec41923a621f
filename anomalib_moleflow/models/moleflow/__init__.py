"""MoLE-Flow model (anomalib layout: lightning_model, torch_model, loss, anomaly_map, components; settings)."""

import lazy_loader

# Submodules load on first use: the `moleflow` command answers --help without importing torch or anomalib.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "callbacks": ["OracleRouting"],
        "lightning_model": ["MoleFlow"],
        "post_processor": ["TaskPostProcessor"],
        "torch_model": ["MoleFlowModel"],
    },
)

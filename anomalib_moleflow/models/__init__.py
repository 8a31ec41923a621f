"""Models of the anomalib-moleflow plugin (imported on first use: see :mod:`anomalib_moleflow`)."""

import lazy_loader

# Submodules load on first use: the `moleflow` command answers --help without importing torch or anomalib.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "moleflow": ["MoleFlow", "MoleFlowModel", "OracleRouting", "TaskPostProcessor"],
    },
)

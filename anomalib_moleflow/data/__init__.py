"""Data: task sequences, the generated offline demo datamodule, ELPV, task groups, and input checks."""

import lazy_loader

# Submodules load on first use: the `moleflow` command answers --help without importing torch or anomalib.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "checks": ["DatasetError", "check_datamodule"],
        "datamodules": ["SyntheticMVTecAD", "TaskGroup"],
        "tasks": ["Task", "TaskLike", "build_tasks", "joint_datamodule", "resolve_tasks"],
    },
)

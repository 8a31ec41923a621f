"""The continual protocol (one engine, one runner) and the strategies it runs: MoLE-Flow and anomalib baselines."""

import lazy_loader

# Submodules load on first use: the `moleflow` command answers --help without importing torch or anomalib.
__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "continual": ["ContinualEngine"],
        "options": ["CHECKPOINT_FILE", "RUN_OUTPUTS", "STATE_FILE"],
        "runner": ["continual_parser", "resolve", "run_continual"],
        "strategies": [
            "FinetuneStrategy",
            "JointStrategy",
            "MoleFlowStrategy",
            "SeparateStrategy",
            "Strategy",
            "check_finite",
        ],
        "trainer": ["TaskTrainer"],
    },
)

"""Building blocks of MoLE-Flow, one stage of the design (docs/design.md) per module."""

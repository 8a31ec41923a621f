"""Building blocks of MoLE-Flow, one DESIGN.md row per module."""

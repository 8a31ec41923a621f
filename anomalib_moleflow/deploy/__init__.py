"""Run an exported MoLE-Flow model on an inspection PC: :mod:`.inferencer` needs numpy, Pillow and a runtime only."""

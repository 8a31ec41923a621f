"""Continual learning over a task sequence: engine and results."""

from .engine import ContinualEngine, Task, resolve_tasks
from .results import METRICS, summarize

__all__ = ["METRICS", "ContinualEngine", "Task", "resolve_tasks", "summarize"]

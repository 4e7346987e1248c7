"""Rebuilds a trained stage from its workdir and restores only the params asked for."""
from __future__ import annotations


class NotTrainedError(FileNotFoundError):
    """The workdir does not exist, or holds no config.json or no checkpoint."""

"""Importers of published checkpoints (Hugging Face CLIP, Karlo) into this project's modules."""
from __future__ import annotations

from typing import Any

MAX_LISTED = 40  # Problems spelled out in one error message (the rest counted).


class ConversionError(ValueError):
    """A checkpoint does not fit this project's modules: `problems` lists every reason found."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        shown = self.problems[:MAX_LISTED]
        more = len(self.problems) - len(shown)
        super().__init__(
            f"cannot import {what} ({len(self.problems)} problem"
            f"{'s' if len(self.problems) != 1 else ''}):\n  " + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else ""))


def nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    """{("a", "b"): x} -> {"a": {"b": x}}: a param tree from flat paths."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree

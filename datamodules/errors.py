"""Errors raised by the data modules."""

from __future__ import annotations

from pathlib import Path


class DatasetNotFoundError(FileNotFoundError):
    """A data set's root or one of its files is missing.

    The message names the root, the missing path, the layout the loader expects and where to get the data.
    """

    def __init__(self, dataset: str, root: str | Path, missing: str | Path, layout: str, source: str) -> None:
        self.root, self.missing = Path(root), Path(missing)
        super().__init__(
            f"{dataset}: {missing} not found (data root: {root}).\n"
            f"Expected layout under the root:\n{layout}\n{source}"
        )

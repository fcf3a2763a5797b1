"""Errors raised by the data modules."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class DatasetNotFoundError(FileNotFoundError):
    """A data set's root or one of its files is missing.

    The message is one line: the data set, the missing path, the root, what led there (``detail``), the
    layout the loader expects under the root and where to get the data.

    Attributes:
        root: the data set's root as configured.
        missing: the path that is missing (the root itself when it is absent).
    """

    def __init__(self, dataset: str, root: str | Path, missing: str | Path, layout: Sequence[str], source: str,
                 detail: str = "") -> None:
        self.root, self.missing = Path(root), Path(missing)
        context = f"data root: {root}" + (f"; {detail}" if detail else "")
        super().__init__(f"{dataset}: {missing} not found ({context}). Expected layout under the root: "
                         f"{'; '.join(layout)}. {source}")

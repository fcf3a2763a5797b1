"""What the on-disk data sets share: where their files lie (``DiskLayout``, with the existence checks that
raise ``DatasetNotFoundError``), split lists, and reading RGB images and their headers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.errors import DatasetNotFoundError


@dataclass(frozen=True)
class DiskLayout:
    """How a data set lies under its root, and the checks that it does.

    Attributes:
        dataset: the data set's name in messages.
        lines: the expected layout, one entry per kind of file (shown by every ``DatasetNotFoundError``).
        source: where to get the data.
        files: per-sample file roles (``image``, a task name, ...) -> candidate ``(folder, extension)`` pairs
            under the root; a sample's file of a role is the first candidate that exists.
        split_lists: split -> its id list, relative to the root.
    """

    dataset: str
    lines: tuple[str, ...]
    source: str
    files: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    split_lists: Mapping[str, str] = field(default_factory=dict)

    def not_found(self, root: Path, missing: Path | str, detail: str = "") -> DatasetNotFoundError:
        """The error for ``missing`` under ``root``."""
        return DatasetNotFoundError(self.dataset, root, missing, self.lines, self.source, detail)

    def require(self, root: Path, *groups: Sequence[Path]) -> None:
        """Check that ``root`` is a folder and that each group has a path that exists (alternatives: any of them).

        Raises:
            DatasetNotFoundError: naming the root, or the first group none of whose paths exists.
        """
        if not root.is_dir():
            raise self.not_found(root, root)
        for group in groups:
            if not any(path.exists() for path in group):
                raise self.not_found(root, " or ".join(map(str, group)))

    def split_list(self, root: Path, split: str) -> Path:
        """The id list of ``split``."""
        return root / self.split_lists[split]

    def folders(self, root: Path, roles: Sequence[str]) -> list[list[Path]]:
        """The candidate folders of each role."""
        return [[root / folder for folder, _ in self.files[role]] for role in roles]

    def candidates(self, root: Path, role: str, image_id: str) -> list[Path]:
        """The candidate paths of one sample's file of ``role``, in order of preference."""
        return [root / folder / f"{image_id}{extension}" for folder, extension in self.files[role]]

    def sample_path(self, root: Path, role: str, image_id: str) -> Path:
        """The first candidate of one sample's file of ``role`` that exists.

        Raises:
            DatasetNotFoundError: no candidate exists.
        """
        candidates = self.candidates(root, role, image_id)
        for path in candidates:
            if path.is_file():
                return path
        raise self.not_found(root, " or ".join(map(str, candidates)))

    def check_split(self, root: Path, split: str, roles: Sequence[str]) -> Path:
        """The layout check of one split, without reading a sample: the root, the split's id list and the folders
        of ``roles`` exist. Returns the id list's path.

        Raises:
            DatasetNotFoundError: naming the first of them that is missing.
        """
        list_path = self.split_list(root, split)
        self.require(root, [list_path], *self.folders(root, roles))
        return list_path

    def check_samples(self, root: Path, roles: Sequence[str], ids: Sequence[str], list_path: Path) -> None:
        """Check that every id of ``list_path`` has a file of every role.

        Raises:
            DatasetNotFoundError: naming the first missing file, the id and how many files are missing.
        """
        missing = []
        for image_id in ids:
            for role in roles:
                candidates = self.candidates(root, role, image_id)
                if not any(path.is_file() for path in candidates):
                    missing.append((image_id, candidates))
        if missing:
            image_id, candidates = missing[0]
            raise self.not_found(root, " or ".join(map(str, candidates)),
                                 f"{list_path.name} lists {image_id!r}; {len(missing)} needed file(s) of listed ids "
                                 "missing, the first is named here")


def read_id_list(path: Path) -> list[str]:
    """The ids of a split list, one per line (blank lines skipped).

    Raises:
        ValueError: the list names no id, or an id twice (metrics would count it twice).
    """
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{path}: lists no ids; expected one sample id per line")
    duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise ValueError(f"{path}: ids listed more than once: {duplicates[:8]}; every sample must be listed once "
                         "(metrics would count it twice)")
    return ids


def _unreadable(path: Path, error: Exception) -> ValueError:
    return ValueError(f"{path}: cannot read the image ({error}); expected an RGB JPEG")


def image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image from its header only.

    Raises:
        ValueError: the file is not an image PIL can identify.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError) as error:
        raise _unreadable(path, error) from error
    return height, width


def read_rgb(path: Path) -> np.ndarray:
    """An image as ``(H, W, 3)`` float32 in 0..255.

    Raises:
        ValueError: the file cannot be decoded as an image.
    """
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.float32)
    except (OSError, SyntaxError, ValueError) as error:
        raise _unreadable(path, error) from error

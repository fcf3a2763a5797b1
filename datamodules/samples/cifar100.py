"""A tiny fake CIFAR-100 in the real on-disk format: ``cifar-100-python/{train,test,meta}``.

The real files are Python 2 pickles of dicts, read with ``pickle.load(f, encoding="latin1")`` (torchvision's
``CIFAR10``/``CIFAR100`` source): ``train`` and ``test`` hold ``data`` (uint8 ndarray ``(n, 3072)``, each row
the red, green and blue 32 x 32 planes one after the other, row-major), ``fine_labels`` and
``coarse_labels`` (lists of ints), ``filenames`` (list of str) and ``batch_label`` (``"training batch 1 of
1"`` / ``"testing batch 1 of 1"``); ``meta`` holds ``fine_label_names`` (100) and ``coarse_label_names`` (20).
Names and the fine -> coarse map are the real ones, so every superclass has its 5 fine classes.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

FINE_LABEL_NAMES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip
COARSE_LABEL_NAMES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
]  # fmt: skip
FINE_TO_COARSE = [
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
]  # fmt: skip
FOLDER = "cifar-100-python"
_BATCH_LABELS = {"train": "training batch 1 of 1", "test": "testing batch 1 of 1"}


def write_pickle(path: Path, obj: Any) -> None:
    """Pickle ``obj`` to ``path`` with protocol 2, the newest one Python 2 (which wrote the real files) had."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def read_pickle(path: Path) -> dict[str, Any]:
    """Load a pickle as the real files are read (``encoding="latin1"``); for tests that corrupt a file."""
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _split(name: str, n: int, rng: np.random.Generator) -> dict[str, Any]:
    # Every fine class at least once (n >= 100), so each split shows all 5 classes of every superclass.
    fine = rng.permutation(np.arange(n) % 100)
    return {
        "batch_label": _BATCH_LABELS[name],
        "fine_labels": [int(f) for f in fine],
        "coarse_labels": [FINE_TO_COARSE[f] for f in fine],
        "data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
        "filenames": [f"{FINE_LABEL_NAMES[f]}_s_{i:06d}.png" for i, f in enumerate(fine)],
    }


def make_cifar100(root: Path, num_train: int = 200, num_test: int = 100, seed: int = 0) -> Path:
    """Write a fake CIFAR-100 under ``root/cifar-100-python/``.

    Args:
        root: the folder that will hold ``cifar-100-python/`` (created if missing).
        num_train: training images, at least 100 (every fine class appears).
        num_test: test images, at least 100.
        seed: seed of the pixels and of the label order.

    Returns:
        ``root``, the path to pass as the data module's ``root``.
    """
    if num_train < 100 or num_test < 100:
        raise ValueError(f"num_train and num_test must be at least 100 (one image per fine class), "
                         f"got {num_train} and {num_test}")
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_pickle(folder / "train", _split("train", num_train, rng))
    write_pickle(folder / "test", _split("test", num_test, rng))
    write_pickle(folder / "meta", {"fine_label_names": list(FINE_LABEL_NAMES),
                                   "coarse_label_names": list(COARSE_LABEL_NAMES)})
    return Path(root)

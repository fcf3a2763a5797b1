"""Lightning data modules: the synthetic ones (no files) and the paper's data sets read from disk.

``base`` holds what they share (``MultiTaskDataModule``: loaders, DDP samplers, ``sample_inputs``, ``check_data``);
``datasets`` holds the data sets themselves (on-disk formats, generated data) apart from the data modules."""

from datamodules.cifar100 import CIFAR100MultiTask
from datamodules.errors import DatasetNotFoundError
from datamodules.nyuv2 import NYUv2
from datamodules.pascal_context import PascalContext
from datamodules.synthetic import SyntheticRegressionDataModule, SyntheticScenesDataModule

__all__ = ["CIFAR100MultiTask", "DatasetNotFoundError", "NYUv2", "PascalContext", "SyntheticRegressionDataModule",
           "SyntheticScenesDataModule"]

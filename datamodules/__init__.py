"""Lightning data modules: the synthetic ones (no files) and the paper's data sets read from disk."""

from datamodules.cifar100 import CIFAR100MultiTask
from datamodules.errors import DatasetNotFoundError
from datamodules.nyuv2 import NYUv2
from datamodules.pascal_context import PascalContext
from datamodules.synthetic import SyntheticRegressionDataModule, SyntheticScenesDataModule

__all__ = ["CIFAR100MultiTask", "DatasetNotFoundError", "NYUv2", "PascalContext", "SyntheticRegressionDataModule",
           "SyntheticScenesDataModule"]

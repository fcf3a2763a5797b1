"""Lightning data modules."""

from datamodules.synthetic import SyntheticRegressionDataModule, SyntheticScenesDataModule

__all__ = ["SyntheticRegressionDataModule", "SyntheticScenesDataModule"]

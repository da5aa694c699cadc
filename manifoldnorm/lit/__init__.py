"""Lightning integration: the classification module, the EEG data module and the run helpers."""

from manifoldnorm.lit.datamodule import REPRESENTATIONS, SOURCES, EEGDataModule
from manifoldnorm.lit.module import ClassificationModule

__all__ = ["ClassificationModule", "EEGDataModule", "SOURCES", "REPRESENTATIONS"]

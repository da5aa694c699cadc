"""SPD models built from :mod:`manifoldnorm.nn`: SPDNet and the TSMNet EEG front end."""

from .spdnet import SPDNet
from .tsmnet import TSMNet

__all__ = ["SPDNet", "TSMNet"]

"""Models built from :mod:`manifoldnorm.nn`: SPDNet, the TSMNet EEG front end and the LieNet-style SO3Net."""

from .so3net import RotMap, RotPooling, SO3Net
from .spdnet import SPDNet
from .tsmnet import TSMNet

__all__ = ["SPDNet", "TSMNet", "SO3Net", "RotMap", "RotPooling"]

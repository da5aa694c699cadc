"""Models built from :mod:`manifoldnorm.nn`: SPDNet, the TSMNet EEG front end, the LieNet-style SO3Net, and the
Euclidean GPT decoder and ResNet whose norm (and, for GPT, its placement) is configuration."""

from .gpt import GPT
from .resnet import BasicBlock, ResNet
from .so3net import RotMap, RotPooling, SO3Net
from .spdnet import SPDNet
from .tsmnet import TSMNet

__all__ = ["SPDNet", "TSMNet", "SO3Net", "RotMap", "RotPooling", "GPT", "ResNet", "BasicBlock"]

"""Models built from :mod:`manifoldnorm.nn`: SPDNet, the TSMNet EEG front end, the LieNet-style SO3Net, and the
Euclidean GPT decoder and ResNet whose norm (and, for GPT, its placement) is configuration."""

from .so3net import RotMap, RotPooling, SO3Net
from .spdnet import SPDNet
from .tsmnet import TSMNet

__all__ = ["SPDNet", "TSMNet", "SO3Net", "RotMap", "RotPooling", "ResNet", "BasicBlock", "GPT"]


def __getattr__(name: str):
    # the Euclidean models are imported on first use
    if name in ("ResNet", "BasicBlock"):
        from . import resnet

        return getattr(resnet, name)
    if name == "GPT":
        from .gpt import GPT

        return GPT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

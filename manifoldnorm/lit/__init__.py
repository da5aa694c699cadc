"""Lightning integration: the classification and language-model modules, the EEG, image and text data modules,
the callbacks (norm and optimizer diagnostics, test confusion matrices, ...) and the run helpers."""

from manifoldnorm.lit.checkpoint import AtomicCheckpointIO, CarryBestCheckpoint, CheckpointError, verify_checkpoint
from manifoldnorm.lit.confusion import ConfusionReport
from manifoldnorm.lit.datamodule import REPRESENTATIONS, SOURCES, EEGDataModule
from manifoldnorm.lit.guard import NonFiniteError, NonFiniteGuard
from manifoldnorm.lit.images import IMAGE_SOURCES, ImageDataModule
from manifoldnorm.lit.lm import CharLMDataModule, LanguageModelModule
from manifoldnorm.lit.module import ClassificationModule
from manifoldnorm.lit.monitor import NormMonitor
from manifoldnorm.lit.requeue import SLURMRequeue
from manifoldnorm.lit.resume import ResumableDataLoader, RNGStates
from manifoldnorm.lit.sync import RiemannianSyncBatchNorm

__all__ = [
    "AtomicCheckpointIO",
    "CarryBestCheckpoint",
    "CheckpointError",
    "verify_checkpoint",
    "NonFiniteError",
    "NonFiniteGuard",
    "RiemannianSyncBatchNorm",
    "RNGStates",
    "ResumableDataLoader",
    "SLURMRequeue",
    "ClassificationModule",
    "ConfusionReport",
    "NormMonitor",
    "EEGDataModule",
    "SOURCES",
    "REPRESENTATIONS",
    "CharLMDataModule",
    "LanguageModelModule",
    "ImageDataModule",
    "IMAGE_SOURCES",
]

"""Test-time confusion matrices, overall and per domain: the metric, accuracies from counts, and the report.

:class:`DomainConfusion` counts ``(domain, true class, predicted class)`` triples (a torchmetrics metric, summed
over the processes of a run); :func:`accuracy` and :func:`balanced_accuracy` read them. The
:class:`~manifoldnorm.lit.ClassificationModule` logs ``test/acc/domain=<d>`` and ``test/bacc/domain=<d>`` from
it; the :class:`ConfusionReport` callback (on by default, ``conf/callbacks/default.yaml``) writes the matrices as
CSV into the run directory and logs them to W&B.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torchmetrics import Metric

__all__ = ["ConfusionReport", "DomainConfusion", "EpochAccuracy", "accuracy", "balanced_accuracy",
           "write_confusion_csv"]

log = logging.getLogger(__name__)

CONFUSION_CSV = "test_confusion.csv"
CONFUSION_BY_DOMAIN_CSV = "test_confusion_by_domain.csv"


class DomainConfusion(Metric):
    """Confusion matrix per domain: ``counts[d, i, j]`` samples of domain ``d`` and true class ``i`` predicted
    as ``j``, shape ``(D, K, K)`` (int64), summed over the processes of a distributed run.

    Parameters
    ----------
    num_classes : int
        ``K``.
    num_domains : int
        ``D``; ``update`` without domain ids counts everything in domain 0.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None
    counts: Tensor

    def __init__(self, num_classes: int, num_domains: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name, value, low in (("num_classes", num_classes, 2), ("num_domains", num_domains, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"DomainConfusion: {name} must be an int >= {low}, got {value!r}")
        self.num_classes, self.num_domains = num_classes, num_domains
        self.add_state("counts", default=torch.zeros(num_domains, num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, domain: Tensor | None = None) -> None:
        """Count a batch: ``preds`` class ids ``(N,)`` or scores ``(N, K)``, ``target`` ``(N,)``, ``domain``
        ``(N,)`` ids in ``0..D-1`` (``None``: domain 0)."""
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(-1)
        K, D = self.num_classes, self.num_domains
        preds, target = preds.reshape(-1).long(), target.reshape(-1).long()
        if domain is None:
            d = torch.zeros_like(target)
        else:
            d = torch.as_tensor(domain, device=target.device).reshape(-1).long()
            if d.numel() and (int(d.min()) < 0 or int(d.max()) >= D):
                raise ValueError(f"DomainConfusion: domain id {int(d.max()) if int(d.max()) >= D else int(d.min())} "
                                 f"is outside 0..{D - 1} (num_domains={D}); pass the data's number of domains "
                                 f"(module.num_domains)")
        index = (d * K + target) * K + preds
        self.counts += torch.bincount(index, minlength=D * K * K).reshape(D, K, K)

    def compute(self) -> Tensor:
        """The counts ``(D, K, K)``."""
        return self.counts


class EpochAccuracy(Metric):
    """Accuracy and balanced accuracy of an epoch from one confusion matrix ``(K, K)`` (one ``bincount`` per
    batch), summed over the processes of a distributed run.

    ``compute()`` returns ``{prefix + "acc": ..., prefix + "bacc": ...}`` (float32): the values of torchmetrics'
    ``MulticlassAccuracy`` with ``average="micro"`` and ``average="macro"``: the balanced accuracy is the mean
    recall over the classes that occur among the targets or the predictions (a class only predicted counts with
    recall 0, a class absent from both is left out).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    counts: Tensor

    def __init__(self, num_classes: int, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"EpochAccuracy: num_classes must be an int >= 2, got {num_classes!r}")
        self.num_classes, self.prefix = num_classes, prefix
        self.add_state("counts", default=torch.zeros(num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Count a batch: ``preds`` class scores ``(N, K)`` or ids ``(N,)``, ``target`` ``(N,)``."""
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(-1)
        K = self.num_classes
        index = target.reshape(-1).long() * K + preds.reshape(-1).long()
        self.counts += torch.bincount(index, minlength=K * K).reshape(K, K)

    def compute(self) -> dict[str, Tensor]:
        c = self.counts
        tp = torch.diagonal(c).float()
        support, predicted = c.sum(1).float(), c.sum(0).float()
        total = support.sum()
        acc = tp.sum() / total if total > 0 else torch.zeros((), device=c.device)
        recall = torch.where(support > 0, tp / support.clamp_min(1.0), 0.0)
        weight = ((support + predicted) > 0).float()  # tp + fp + fn > 0
        bacc = (weight * recall).sum() / weight.sum() if weight.sum() > 0 else torch.zeros((), device=c.device)
        return {f"{self.prefix}acc": acc, f"{self.prefix}bacc": bacc}


def accuracy(counts: Tensor) -> Tensor:
    """Accuracy from confusion counts ``(..., K, K)``: correct / total, ``(...)`` (NaN where there is no sample)."""
    c = counts.to(torch.float64)
    return torch.diagonal(c, dim1=-2, dim2=-1).sum(-1) / c.sum((-2, -1))


def balanced_accuracy(counts: Tensor) -> Tensor:
    """Balanced accuracy from confusion counts ``(..., K, K)``: the mean recall over the classes that have samples
    (scikit-learn's ``balanced_accuracy_score``), ``(...)`` (NaN where there is no sample)."""
    c = counts.to(torch.float64)
    support = c.sum(-1)
    recall = torch.diagonal(c, dim1=-2, dim2=-1) / support.clamp_min(1.0)
    present = (support > 0).to(torch.float64)
    return (recall * present).sum(-1) / present.sum(-1)


def _write_rows(path: Path, rows: list[list[Any]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    os.replace(tmp, path)


def write_confusion_csv(counts: Tensor, directory: str | os.PathLike) -> list[Path]:
    """Write ``test_confusion.csv`` (the matrix over all domains: one row per true class, one column per predicted
    class, header ``true\\predicted``) and, for more than one domain with samples, ``test_confusion_by_domain.csv``
    (``domain,true,predicted,count`` rows of the domains with samples) into ``directory``; return their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    c = counts.detach().cpu().long()
    total = c.sum(0)
    K = total.shape[-1]
    paths = [out / CONFUSION_CSV]
    _write_rows(paths[0], [["true\\predicted", *range(K)], *([i, *total[i].tolist()] for i in range(K))])
    domains = [d for d in range(c.shape[0]) if int(c[d].sum()) > 0]
    if len(domains) > 1:
        paths.append(out / CONFUSION_BY_DOMAIN_CSV)
        _write_rows(paths[1], [["domain", "true", "predicted", "count"],
                               *([d, i, j, int(c[d, i, j])] for d in domains for i in range(K) for j in range(K))])
    return paths


class ConfusionReport(pl.Callback):
    """After testing, write the test confusion matrices as CSV and log them to W&B.

    Reads ``last_test_confusion`` (``(D, K, K)`` counts) of the Lightning module, which
    :class:`~manifoldnorm.lit.ClassificationModule` sets at the end of each test epoch; a module without it (the
    language model) is left alone. The process of global rank 0 writes :func:`write_confusion_csv` into
    ``dirpath`` (default: the trainer's ``default_root_dir``, the run directory) and, for each W&B logger, logs
    ``test/confusion_matrix`` (W&B's confusion-matrix chart of the table ``Actual, Predicted, nPredictions`` over
    all domains).

    Parameters
    ----------
    dirpath : str, optional
        Directory of the CSV files.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.dirpath = dirpath

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = getattr(pl_module, "last_test_confusion", None)
        if not isinstance(counts, Tensor) or trainer.global_rank != 0:
            return
        paths = write_confusion_csv(counts, self.dirpath or trainer.default_root_dir)
        log.info("test confusion matrix: %s", ", ".join(str(p) for p in paths))
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        total = counts.detach().cpu().long().sum(0)
        K = total.shape[-1]
        table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"],
                            data=[[str(i), str(j), int(total[i, j])] for i in range(K) for j in range(K)])
        chart = wandb.plot_table("wandb/confusion_matrix/v1", table,
                                 {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                                 {"title": "test confusion matrix"})
        for lg in loggers:
            lg.log_metrics({"test/confusion_matrix": chart})

    def __repr__(self) -> str:
        return f"ConfusionReport(dirpath={self.dirpath!r})"

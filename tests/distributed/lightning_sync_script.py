"""One training step of a tiny SPD model under Lightning DDP (2 CPU processes) with RiemannianSyncBatchNorm.

Run as ``python lightning_sync_script.py OUT_DIR`` (Lightning starts the second process by re-running this
script). Each rank saves what it saw during training and its state after ``fit`` to ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from manifoldnorm.distributed.sync_norm import is_synchronized
from manifoldnorm.lit.sync import RiemannianSyncBatchNorm
from manifoldnorm.nn import create_norm_layer

N, SAMPLES = 3, 8
NORMS = ("liebn_aim", "dsliebn_lem")


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    A = torch.randn(SAMPLES, N, N, generator=g, dtype=torch.float64)
    x = A @ A.mT / N + 0.3 * torch.eye(N, dtype=torch.float64)
    y = torch.arange(SAMPLES) % 2
    domain = torch.tensor([0, 1, 1, 1, 0, 1, 1, 1])  # rank 0 gets samples 0, 2, 4, 6; rank 1 only domain 1
    return TensorDataset(x, y, domain)


class TinySPD(pl.LightningModule):
    """Two Riemannian norms, a torch BatchNorm1d on the flattened matrices, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.norms = nn.ModuleList([create_norm_layer(k, N, momentum=0.5) for k in NORMS])
        self.bn = nn.BatchNorm1d(N * N, dtype=torch.float64)
        self.head = nn.Linear(N * N, 2, dtype=torch.float64)
        self.seen: list[dict] = []

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        for norm in self.norms:
            x = norm(x, domain=domain)
        return self.head(self.bn(x.flatten(1)))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: ANN001
        x, y, domain = batch
        self.seen.append({"synchronized": is_synchronized(self), "bn_class": type(self.bn).__name__,
                          "batch": x.shape[0]})
        return nn.functional.cross_entropy(self(x, domain), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.head.parameters(), lr=0.1)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    model = TinySPD()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[RiemannianSyncBatchNorm()],
                         max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(make_data(), batch_size=SAMPLES // 2, shuffle=False))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"seen": model.seen, "state": state, "bn_class_after": type(model.bn).__name__,
                "synchronized_after": is_synchronized(model)},
               Path(out_dir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])

"""NonFiniteGuard under Lightning DDP (2 CPU processes, gloo): a NaN loss on one rank is skipped by both.

Run as ``python nonfinite_ddp_script.py OUT_DIR`` (Lightning starts the second process by re-running this
script). Rank 1's loss is NaN at step 1 only; DDP's all-reduce spreads the NaN gradient to rank 0, so both ranks
must skip that step (and no other) and end with the same finite weights. Each rank saves what it saw to
``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from manifoldnorm.lit import NonFiniteGuard


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        self.changed: list[bool] = []

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: ANN001
        self._before = [p.detach().clone() for p in self.parameters()]
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.global_step == 1 and self.global_rank == 1:
            loss = loss * float("nan")
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:  # noqa: ANN001
        self.changed.append(any(not torch.equal(a, p) for a, p in zip(self._before, self.parameters(), strict=True)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    guard = NonFiniteGuard(max_consecutive_skips=2)
    model = Net()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[guard])
    trainer.fit(model, DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=False))
    torch.save({"changed": model.changed, "skipped": guard.skipped,
                "state": {k: v.clone() for k, v in model.state_dict().items()}},
               Path(out_dir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])

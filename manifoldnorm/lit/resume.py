"""Exact resume from a checkpoint taken in the middle of an epoch.

Lightning restores the model, the optimizers, the LR schedulers and the loop counters from a checkpoint, and
counts how many batches of the interrupted epoch were already trained on. Two things it leaves to the user:

* the data: a plain ``DataLoader`` starts the interrupted epoch again from its first batch (Lightning then stops
  the epoch early, so the resumed run trains on different batches than an uninterrupted one).
  :class:`ResumableDataLoader` is stateful in the sense of Lightning's ``state_dict`` / ``load_state_dict``
  protocol: the checkpoint records how many batches of the epoch it has yielded, and after a restore its next
  iteration skips them, in the order the sampler draws for that epoch;
* the global random state (``torch``, CUDA, NumPy, Python): dropout masks and other random draws after the
  resume differ unless it is restored. :class:`RNGStates` saves the random state of every process into the
  checkpoint and restores each process's own state when training resumes.

Together with samplers that draw their order from ``(seed, epoch)`` alone (the data modules of
:mod:`manifoldnorm.lit`) and ``trainer.deterministic=true``, the loss curve after a resume equals the one of an
uninterrupted run, step for step (``tests/lit/test_exact_resume.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Sampler

from manifoldnorm._dist import is_multiprocess, world_size

__all__ = ["ResumableDataLoader", "RNGStates", "seeded_loader"]

log = logging.getLogger(__name__)


def _inner_sampler(sampler: Sampler | None) -> Any:
    """The sampler wrapped by Lightning's ``DistributedSamplerWrapper`` (DDP), else ``None``."""
    wrapped = getattr(sampler, "dataset", None)
    return getattr(wrapped, "_sampler", None)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that resumes an interrupted epoch where it stopped.

    ``state_dict()`` returns the number of batches the current iteration has yielded; Lightning stores it in
    every checkpoint of the fit loop. After ``load_state_dict`` the next iteration skips that many batches
    (fetched and dropped, so the sampler and any per-item randomness advance exactly as in the uninterrupted
    epoch) and yields the rest. A count of 0 or of a whole epoch skips nothing.

    Under DDP Lightning wraps the sampler in a distributed wrapper and calls ``set_epoch`` on the wrapper only;
    the loader passes the epoch on to the wrapped sampler, so samplers seeded by ``(seed, epoch)`` draw a new
    order every epoch on every process.

    The constructor takes ``DataLoader``'s arguments. Give it a ``generator`` (the data modules do): otherwise
    every iteration draws its worker base seed from the global random state, which shifts every later random
    draw of the training step by one call.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip = self._skip, 0
        return self._iterate(skip)

    def _iterate(self, skip: int) -> Iterator[Any]:
        # a generator: nothing runs before the first batch is asked for, i.e. after the loop's set_epoch
        inner, outer = _inner_sampler(self.sampler), self.sampler
        if inner is not None and hasattr(inner, "set_epoch") and hasattr(outer, "epoch"):
            inner.set_epoch(outer.epoch)
        self._yielded = 0
        it = super().__iter__()
        for _ in range(skip):
            next(it)
        self._yielded = skip
        for batch in it:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"batches": <batches yielded by the current iteration>}``."""
        return {"batches": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Skip ``state_dict["batches"]`` batches at the start of the next iteration (unless 0 or a whole epoch)."""
        batches = int(state_dict.get("batches", 0))
        try:
            total = len(self)
        except TypeError:  # an iterable dataset without length: trust the count
            total = None
        self._skip = batches if batches > 0 and (total is None or batches < total) else 0
        if self._skip:
            log.info("resuming the epoch after %d of its batches", self._skip)


def _encode(states: dict[str, Any]) -> dict[str, Any]:
    """NumPy's state as tensors and builtins, so the checkpoint loads with ``torch.load(weights_only=True)``."""
    out = dict(states)
    if "numpy" in out:
        kind, keys, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = (str(kind), torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))
    version, internal, gauss = out["python"]
    out["python"] = (int(version), [int(v) for v in internal], gauss)
    return out


def _decode(states: dict[str, Any]) -> dict[str, Any]:
    out = dict(states)
    if "numpy" in out:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = out["numpy"]
        out["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    if "torch.cuda" in out and not torch.cuda.is_available():
        out.pop("torch.cuda")
    return out


def seeded_loader(dataset: Any, *, train: bool, seed: int, **kwargs: Any) -> DataLoader:
    """The loader policy of the data modules: a :class:`ResumableDataLoader` for training, a plain ``DataLoader``
    otherwise, both with their own generator seeded by ``seed`` (never the global random state).
    ``kwargs`` go to the loader (``batch_size``, ``sampler``, ``drop_last``, ...)."""
    cls = ResumableDataLoader if train else DataLoader
    return cls(dataset, generator=torch.Generator().manual_seed(int(seed)), **kwargs)


class RNGStates(Callback):
    """Save the global random state of every process in checkpoints; restore it when training resumes.

    The state of ``torch`` (and CUDA when present), NumPy and Python's ``random`` is gathered from all processes
    when a checkpoint is written (a collective: Lightning writes checkpoints from every process), stored under
    this callback's key as a list indexed by global rank, and set back in each process when training starts
    from that checkpoint, after the restore and the sanity check (which Lightning runs with an isolated random
    state). A checkpoint written by a different number of processes restores nothing, with a warning.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        local = _encode(_collect_rng_states(include_cuda=torch.cuda.is_available()))
        if is_multiprocess():
            states: list[Any] = [None] * world_size()
            dist.all_gather_object(states, local)
        else:
            states = [local]
        return {"states": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = list(state_dict.get("states") or []) or None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        states, self._pending = self._pending, None
        if states is None:
            return
        if len(states) != trainer.world_size:
            log.warning("checkpoint holds random states of %d processes, this run has %d: not restored",
                        len(states), trainer.world_size)
            return
        state = _decode(states[trainer.global_rank])
        _set_rng_states(state)

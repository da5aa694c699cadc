"""The ``reduce=`` path of the functional means: a batch split into parts gives the mean of the whole batch.

The parts run in threads of one process whose ``reduce`` sums over the threads, so the functional layer is
checked without ``torch.distributed`` (the processes are covered by ``test_sync_norm.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from manifoldnorm import functional as mf
from manifoldnorm.functional._batch import SplitBatchMean


class _ThreadSum:
    """``reduce`` functions for ``parts`` threads: each call returns the sum of what every thread passed."""

    def __init__(self, parts: int) -> None:
        self.barrier = threading.Barrier(parts, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * parts

    def part(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[i] = t
            self.barrier.wait()
            out = sum(self.slots[1:], self.slots[0])  # same order in every thread
            self.barrier.wait()
            return out

        return reduce


def _split_run(fn: Callable, parts: list[tuple]) -> list:
    """``fn(*args, reduce=...)`` in one thread per part; the results (or exceptions) in part order."""
    summer = _ThreadSum(len(parts))
    results: list = [None] * len(parts)

    def run(i: int) -> None:
        try:
            results[i] = fn(*parts[i], reduce=summer.part(i))
        except Exception as exc:  # noqa: BLE001 - handed to the test (a part stuck at the barrier times out)
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _spd(n_samples: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n_samples, 2, 3, 3, generator=g, dtype=torch.float64)
    return A @ A.mT / 3 + 0.2 * torch.eye(3, dtype=torch.float64)


@pytest.mark.parametrize("sizes", [(5, 3), (0, 4), (2, 2, 3)])
@pytest.mark.parametrize("weighted", [False, True])
def test_mean_aim_over_parts_equals_mean_of_the_whole(sizes: tuple[int, ...], weighted: bool) -> None:
    X = _spd(sum(sizes), seed=1)
    w = torch.rand(sum(sizes), generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    weights = w if weighted else None
    want = mf.mean_aim(X, dim=0, weights=weights, karcher_steps=3, tol=0.0)
    bounds = torch.tensor((0, *sizes)).cumsum(0).tolist()
    parts = [(X[a:b], None if weights is None else weights[a:b]) for a, b in zip(bounds[:-1], bounds[1:],
                                                                                 strict=True)]

    def fn(x: torch.Tensor, w_part: torch.Tensor | None, reduce) -> torch.Tensor:  # noqa: ANN001
        return mf.mean_aim(x, dim=0, weights=w_part, karcher_steps=3, tol=0.0, reduce=reduce)

    for got in _split_run(fn, parts):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_mean_aim_early_stop_is_taken_together() -> None:
    X = _spd(7, seed=3)
    want = mf.mean_aim(X, dim=0, karcher_steps=100)
    got = _split_run(lambda x, reduce: mf.mean_aim(x, dim=0, karcher_steps=100, reduce=reduce), [(X[:2],), (X[2:],)])
    for g in got:
        torch.testing.assert_close(g, want, rtol=0, atol=1e-12)


def test_mean_so3_over_parts_equals_mean_of_the_whole() -> None:
    g = torch.Generator().manual_seed(4)
    R = mf.so3_exp(0.8 * torch.randn(6, 4, 3, generator=g, dtype=torch.float64))  # (N, F, 3, 3)
    want = mf.mean_so3(R, dim=0, steps=4, tol=0.0)
    got = _split_run(lambda r, reduce: mf.mean_so3(r, dim=0, steps=4, tol=0.0, reduce=reduce), [(R[:1],), (R[1:],)])
    for m in got:
        torch.testing.assert_close(m, want, rtol=0, atol=1e-12)


def test_split_mean_weights_each_part_by_its_count_and_differentiates() -> None:
    T = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)

    def part_mean(t: torch.Tensor, reduce) -> torch.Tensor:  # noqa: ANN001
        return SplitBatchMean(torch.ones(t.shape[0], dtype=t.dtype), 0, reduce)(t)

    got = _split_run(part_mean, [(T[:6],), (T[6:],)])
    torch.testing.assert_close(got[0], T.mean(0), rtol=0, atol=1e-14)
    got[0].sum().backward()  # the thread sum is plain autograd: the gradient reaches the first part only
    torch.testing.assert_close(T.grad[:6], torch.full((6, 3), 1 / 8, dtype=torch.float64), rtol=0, atol=1e-15)


def test_every_part_empty_raises_in_every_part() -> None:
    X = _spd(2, seed=5)
    got = _split_run(lambda x, reduce: mf.mean_aim(x, dim=0, reduce=reduce), [(X[:0],), (X[:0],)])
    assert all(isinstance(e, ValueError) and "empty" in str(e) for e in got)


def test_local_path_unchanged_by_an_identity_reduce() -> None:
    X = _spd(5, seed=6)
    w = torch.tensor([0.0, 1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    for steps in (1, 4):
        torch.testing.assert_close(mf.mean_aim(X, weights=w, karcher_steps=steps, reduce=lambda t: t),
                                   mf.mean_aim(X, weights=w, karcher_steps=steps), rtol=0, atol=1e-13)

"""The one process-group query every layer, optimizer and callback shares (no manifoldnorm imports: it sits
below every package).

Without ``torch.distributed``, or before a process group is initialized, a program is a single process:
:func:`world_size` is 1 and nothing here touches ``torch.distributed`` state.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

__all__ = ["is_multiprocess", "process_group_ready", "world_size"]


def process_group_ready() -> bool:
    """Whether ``torch.distributed`` is available and a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """Processes in ``group`` (the default group when ``None``); 1 without an initialized process group."""
    return dist.get_world_size(group) if process_group_ready() else 1


def is_multiprocess(group: Any = None) -> bool:
    """Whether ``group`` has other processes to communicate with."""
    return world_size(group) > 1

"""The one way our callbacks reduce a measurement across processes, so that every rank decides alike.

The RoutingMonitor's sums, its probe at train begin and its drift, and the retention check's loss all
go through `all_reduce_sum`. Two rules make it safe:

- every rank joins every collective. A measurement that can fail on one rank (the drift probe's forward,
  caught so that a run never fails over drift) travels with a count of the ranks that could not make it,
  in the same collective (`all_reduce_measured`): every rank then sees the same count and takes the same
  decision (drift off everywhere), instead of one rank skipping a collective the others wait in;
- the tensor is reduced on the backend's device: NCCL reduces CUDA tensors only and gloo CPU ones, while
  the measured tensor lives wherever it was measured (the first router's device, the CPU under CPU
  offload); it goes there and comes back.
"""

from __future__ import annotations

import torch


def world_size() -> int:
    """Processes in the run (1 without torch.distributed): whether a measurement must be reduced across ranks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def reduce_device(device: torch.device) -> torch.device:
    """Where the process group's backend reduces a tensor that lives on `device`."""
    backend = str(torch.distributed.get_backend()).lower()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return device  # a backend per device type ("cpu:gloo,cuda:nccl"), or one that takes what it is given


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `tensor` (itself in one process), on `tensor`'s own device; `tensor` is not changed."""
    if world_size() == 1:
        return tensor
    work = tensor.detach().to(reduce_device(tensor.device), copy=True)
    torch.distributed.all_reduce(work)
    return work.to(tensor.device)


def all_reduce_measured(values: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """The sum over ranks of a measurement and how many ranks could not make it, in one collective.

    `values` is this rank's measurement, None where it failed (or there was nothing to measure); `like`
    gives the shape, dtype and device the others send (zeros stand in for a missing one). Returns the sum
    (None when any rank is missing one: a sum over some ranks is no rank's measurement) and the count,
    the same on every rank.
    """
    sent = values if values is not None else torch.zeros_like(like)
    missing = torch.tensor([0.0 if values is not None else 1.0], dtype=torch.float64, device=like.device)
    flat = torch.cat([sent.reshape(-1).to(device=like.device, dtype=torch.float64), missing])
    reduced = all_reduce_sum(flat)
    count = round(float(reduced[-1]))
    if count:
        return None, count
    return reduced[:-1].reshape(like.shape).to(like.dtype), 0

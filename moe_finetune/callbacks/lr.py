"""Cutting a learning rate that a scheduler owns, so that the cut lasts for the rest of the run.

A scheduler recomputes the rate at every step from its own reference values, so multiplying the
optimizer's current rate alone is undone at the next step. Each kind keeps its references in a
different place: LambdaLR-style schedules (every `lr_scheduler_type` transformers offers, bar one)
compute `base_lr * lambda(step)` from `base_lrs`; OneCycleLR reads `initial_lr`, `max_lr` and `min_lr`
from each param group; CyclicLR has `base_lrs` and `max_lrs`; chainable ones (StepLR, ExponentialLR,
...) and ReduceLROnPlateau scale the group's current rate. Scaling all of these by the factor keeps any
of those schedules' shapes, scaled. A scheduler of some other class cannot be cut reliably, and the
guard refuses it at train begin rather than cut in vain.
"""

from __future__ import annotations

from typing import Any

from moe_finetune.errors import RecipeError

# Param-group keys that schedulers read their reference rates from (OneCycleLR, and every
# scheduler's `initial_lr` as set by LRScheduler.__init__).
_GROUP_RATE_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
# Scheduler attributes holding reference rates (LambdaLR & co: base_lrs; CyclicLR: max_lrs too).
_SCHEDULER_RATE_ATTRS = ("base_lrs", "max_lrs")


def unwrap_scheduler(scheduler: Any) -> Any:
    """accelerate wraps the scheduler; the reference rates live on the inner one."""
    return getattr(scheduler, "scheduler", scheduler)


def _schedulers_within(scheduler: Any) -> list[Any]:
    """The scheduler and, for SequentialLR / ChainedScheduler, the ones it runs."""
    inner = unwrap_scheduler(scheduler)
    if inner is None:
        return []
    return [inner, *getattr(inner, "_schedulers", [])]


def check_scheduler_can_be_cut(scheduler: Any) -> None:
    """Refuse (exit 2) a scheduler whose rate a cut cannot durably scale: one that is not torch's own."""
    for inner in _schedulers_within(scheduler):
        module = type(inner).__module__
        if not module.startswith("torch.optim.lr_scheduler"):
            raise RecipeError(
                f"guards: EntropyGuard cannot cut the learning rate of the scheduler {type(inner).__name__} "
                f"({module}): it recomputes the rate from references the guard does not know, so a cut would be "
                "undone at the next step. Use a torch.optim.lr_scheduler scheduler (every transformers "
                "lr_scheduler_type is one), or turn the guard off (guards.enabled: false)"
            )


def scale_learning_rate(optimizer: Any, scheduler: Any, factor: float) -> tuple[float, float]:
    """Multiply the current and every scheduled reference learning rate by `factor`; return (before, after).

    The current rate is scaled too, so the very next optimizer step already uses the cut rate.
    """
    before = float(optimizer.param_groups[0]["lr"])
    for group in optimizer.param_groups:
        for key in _GROUP_RATE_KEYS:
            if isinstance(group.get(key), (int, float)):
                group[key] = group[key] * factor
    for inner in _schedulers_within(scheduler):
        for attr in _SCHEDULER_RATE_ATTRS:
            if getattr(inner, attr, None):
                setattr(inner, attr, [lr * factor for lr in getattr(inner, attr)])
        if hasattr(inner, "_last_lr"):
            inner._last_lr = [group["lr"] for group in optimizer.param_groups]
    return before, float(optimizer.param_groups[0]["lr"])


def peak_learning_rate(optimizer: Any, scheduler: Any) -> float:
    """The rate a cut scales: the schedule's reference rate (not the warm-up- or decay-scaled current one)."""
    inner = unwrap_scheduler(scheduler)
    if inner is not None and getattr(inner, "max_lrs", None):
        return float(inner.max_lrs[0])
    group = optimizer.param_groups[0]
    if isinstance(group.get("max_lr"), (int, float)):
        return float(group["max_lr"])
    if inner is not None and getattr(inner, "base_lrs", None):
        return float(inner.base_lrs[0])
    return float(group["lr"])

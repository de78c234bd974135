"""Trainer callbacks that watch (and protect) MoE routing, for any transformers Trainer.

    from moe_finetune.callbacks import RoutingMonitor, attach
    attach(trainer, RoutingMonitor())

`attach` registers the callbacks and wraps `trainer.log` so that whatever a callback queues in its
`pop_log()` lands in the Trainer's own log entry (state.log_history and every report_to logger).
A new callback joins by defining `pop_log() -> dict[str, float]` and being exported here.
"""

from typing import Any

from moe_finetune.callbacks.dataset_size import DatasetSizeGuard, check_dataset_size
from moe_finetune.callbacks.guard import EntropyGuard
from moe_finetune.callbacks.monitor import ROUTING_FILE, RoutingMonitor
from moe_finetune.callbacks.monitor import attach as _attach_callbacks
from moe_finetune.callbacks.policy import GuardAction, GuardConfig, GuardPolicy, RoutingSnapshot


def attach(trainer: Any, *callbacks: Any) -> Any:
    """Register callbacks on `trainer`, route their metrics through `trainer.log`, and link a guard
    to the monitor it should read (an EntropyGuard given without one reads the RoutingMonitor
    attached beside it, so the routers are hooked once)."""
    monitors = [c for c in callbacks if isinstance(c, RoutingMonitor)]
    for callback in callbacks:
        if isinstance(callback, EntropyGuard) and callback.monitor is None and monitors:
            callback.monitor = monitors[0]
    # The monitor must see each step before the guard judges it: monitors go first.
    ordered = monitors + [c for c in callbacks if not isinstance(c, RoutingMonitor)]
    return _attach_callbacks(trainer, *ordered)


__all__ = [
    "ROUTING_FILE",
    "DatasetSizeGuard",
    "EntropyGuard",
    "GuardAction",
    "GuardConfig",
    "GuardPolicy",
    "RoutingMonitor",
    "RoutingSnapshot",
    "attach",
    "check_dataset_size",
]

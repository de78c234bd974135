"""`attach(trainer, *callbacks)`: the one way our callbacks join a Trainer a user already has.

It does three things a bare `callbacks=[...]` cannot:

1. links each EntropyGuard given without a monitor to the RoutingMonitor attached beside it (or to
   one it creates and registers when none is given), so the routers are hooked once and the
   metrics reach the loggers;
2. registers monitors before everything else, because the guard judges what the monitor has just
   measured in the same step;
3. wraps `trainer.log` once, so whatever a callback queues in its `pop_log()` lands in the Trainer's
   own log entry: `state.log_history` and every `report_to` logger (TensorBoard, W&B, MLflow) see it.
   `Trainer.log` appends to the history and runs the logger callbacks before any user callback's
   `on_log`, so keys added there reach neither (DESIGN.md section 3).

A `PerLayerAuxLoss` given here is installed on the trainer (`PerLayerAuxLoss.attach`). A new callback
joins by defining `pop_log() -> dict[str, float]`.
"""

from __future__ import annotations

import functools
from typing import Any

from moe_finetune.callbacks.guard import EntropyGuard
from moe_finetune.callbacks.monitor import RoutingMonitor

_ATTACHED_MARK = "_moe_finetune_attached"


def attach(trainer: Any, *callbacks: Any) -> Any:
    """Register `callbacks` on `trainer`, monitors first, and send their metrics through `trainer.log`."""
    from moe_finetune.callbacks.aux_loss import PerLayerAuxLoss

    losses = [c for c in callbacks if isinstance(c, PerLayerAuxLoss) and not c._attached]
    for loss in losses:  # a loss term is installed on the trainer itself (it registers its callback part)
        loss.attach(trainer)
    callbacks = tuple(c for c in callbacks if c not in losses)
    monitors = [c for c in callbacks if isinstance(c, RoutingMonitor)]
    guards_alone = [c for c in callbacks if isinstance(c, EntropyGuard) and c.monitor is None]
    if guards_alone and not monitors:
        # A guard needs a monitor; one registered here (not run privately by the guard) also sends its
        # metrics through the log wrapper below, so the loggers see them.
        monitors = [RoutingMonitor()]
    for callback in callbacks:
        if isinstance(callback, EntropyGuard) and callback.monitor is None and monitors:
            callback.monitor = monitors[0]
    for callback in monitors + [c for c in callbacks if not isinstance(c, RoutingMonitor)]:
        trainer.add_callback(callback)
    if not getattr(trainer.log, _ATTACHED_MARK, False):
        original = trainer.log

        @functools.wraps(original)
        def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
            for callback in list(trainer.callback_handler.callbacks):
                pop = getattr(callback, "pop_log", None)
                if callable(pop):
                    logs.update(pop())
            return original(logs, *args, **kwargs)

        setattr(log, _ATTACHED_MARK, True)
        trainer.log = log
    return trainer

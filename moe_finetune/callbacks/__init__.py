"""Trainer callbacks that watch (and protect) MoE routing, for any transformers Trainer.

    from moe_finetune.callbacks import RoutingMonitor, EntropyGuard, attach
    attach(trainer, RoutingMonitor(), EntropyGuard())

The guard's decisions come from the pure `GuardPolicy` (moe_finetune.routing.policy), exported here
too for hand-written loops.
"""

from moe_finetune.callbacks.attach import attach
from moe_finetune.callbacks.aux_loss import PerLayerAuxLoss
from moe_finetune.callbacks.dataset_size import DatasetSizeGuard, check_dataset_size
from moe_finetune.callbacks.guard import EntropyGuard
from moe_finetune.callbacks.monitor import RoutingMonitor
from moe_finetune.routing.policy import GuardAction, GuardPolicy, RoutingSnapshot
from moe_finetune.rundir import ROUTING_FILE
from moe_finetune.sections import GuardConfig, MonitorSection

__all__ = [
    "ROUTING_FILE",
    "DatasetSizeGuard",
    "EntropyGuard",
    "GuardAction",
    "GuardConfig",
    "GuardPolicy",
    "MonitorSection",
    "PerLayerAuxLoss",
    "RoutingMonitor",
    "RoutingSnapshot",
    "attach",
    "check_dataset_size",
]

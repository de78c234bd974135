"""Routing telemetry and judgement: hooks that watch every router (capture), pure metrics over what they
saw, the drift probe, and the guard's pure policy (policy, reasons).

from moe_finetune.routing import capture_routing
with capture_routing(model) as cap:
    model(**batch)
stats = cap.stats()   # RoutingMetrics: per-layer entropy, load (L x E), aux loss, z-loss, drop fraction
"""

from moe_finetune.routing.capture import RoutingCapture, capture_routing
from moe_finetune.routing.load_balancing import RouterLogitsTap, layer_balancing_loss
from moe_finetune.routing.metrics import (
    RoutingMetrics,
    RoutingSums,
    aux_loss,
    balance,
    combine_sums,
    dead_experts,
    drop_fraction,
    js_divergence,
    layer_aux_loss,
    load_cv,
    load_max,
    load_share,
    normalised_entropy,
    overflow_assignments,
    prob_share,
    summarise,
    token_entropy,
    topk_set_change,
    z_loss,
)
from moe_finetune.routing.policy import GuardAction, GuardPolicy, GuardState, RoutingSnapshot
from moe_finetune.routing.probe import Drift, ProbeResult, compare_probes, probe_routing

__all__ = [
    "Drift",
    "GuardAction",
    "GuardPolicy",
    "GuardState",
    "ProbeResult",
    "RouterLogitsTap",
    "RoutingCapture",
    "RoutingMetrics",
    "RoutingSnapshot",
    "RoutingSums",
    "aux_loss",
    "balance",
    "capture_routing",
    "combine_sums",
    "compare_probes",
    "dead_experts",
    "drop_fraction",
    "js_divergence",
    "layer_aux_loss",
    "layer_balancing_loss",
    "load_cv",
    "load_max",
    "load_share",
    "normalised_entropy",
    "overflow_assignments",
    "prob_share",
    "probe_routing",
    "summarise",
    "token_entropy",
    "topk_set_change",
    "z_loss",
]

"""Routing telemetry: hooks that watch every router (capture) and pure metrics over what they saw.

from moe_finetune.routing import capture_routing
with capture_routing(model) as cap:
    model(**batch)
stats = cap.stats()   # RoutingMetrics: per-layer entropy, load (L x E), aux loss, z-loss, drop fraction
"""

from moe_finetune.routing.capture import (
    Drift,
    ProbeResult,
    RoutingCapture,
    capture_routing,
    compare_probes,
    find_routers,
)
from moe_finetune.routing.metrics import (
    RoutingMetrics,
    RoutingSums,
    aux_loss,
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

__all__ = [
    "Drift",
    "ProbeResult",
    "RoutingCapture",
    "RoutingMetrics",
    "RoutingSums",
    "aux_loss",
    "capture_routing",
    "compare_probes",
    "dead_experts",
    "drop_fraction",
    "find_routers",
    "js_divergence",
    "layer_aux_loss",
    "load_cv",
    "load_max",
    "load_share",
    "normalised_entropy",
    "overflow_assignments",
    "prob_share",
    "summarise",
    "token_entropy",
    "topk_set_change",
    "z_loss",
]

"""The drift probe: route one fixed batch now and again, and measure how far routing has moved.

`routing/drift` is "the share of probe tokens whose top-k expert set changed since the start". The
RoutingMonitor takes the first rows of the training data as the probe (`take_probe_batch`, without
touching the samplers' random state), routes it at train begin (`probe_routing`) and again every few
hundred steps, and compares the two (`compare_probes`). A probe is a no-grad, eval-mode forward of the
backbone only, recorded by the capture's hooks without touching the running sums.

The probe at train begin is also the guard's baseline: routing of the model before any update. Its
forwards are summed exactly as a training window's are (`ProbeResult.sums`), so `summarise` gives it
the same metrics a logging step has (per-token entropy, load share, balance per layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moe_finetune.routing.capture import RoutingCapture, real_rows
from moe_finetune.routing.metrics import RoutingSums, js_divergence, load_share, topk_set_change

# Keyword arguments of a backbone forward that the probe passes on (labels would only add a loss).
_PROBE_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")


@dataclass
class ProbeResult:
    """What every router chose for a fixed probe batch (no gradient, eval mode, not in the sums)."""

    topk: torch.Tensor  # (L, N, k) expert indices chosen per layer and token (N = B*T rows)
    counts: torch.Tensor  # (L, E) top-k assignments over the real tokens
    valid: torch.Tensor | None  # (N,) bool, False for padding; None = every row is real
    # the probe's forwards as a logging window's running sums (metrics.summarise reads them); None for the
    # drift reference read back from routing_probe.pt, which keeps the choices only
    sums: RoutingSums | None = None

    def load_share(self) -> torch.Tensor:
        """(L, E) fraction of the probe's top-k assignments per expert."""
        return load_share(self.counts)


@dataclass
class Drift:
    """How far routing moved between two probes of the same batch."""

    topk_change: float  # share of (layer, real token) whose top-k expert set changed
    load_js: float  # mean over layers of the JS divergence (bits) between the probes' load shares
    layer_topk_change: list[float]  # (L,)
    layer_load_js: list[float]  # (L,)


def compare_probes(start: ProbeResult, now: ProbeResult) -> Drift:
    """Drift of `now` against `start` (same batch): top-k set changes and load JS divergence."""
    valid = start.valid
    per_layer = [
        topk_set_change(start.topk[i : i + 1], now.topk[i : i + 1], valid) for i in range(start.topk.shape[0])
    ]
    layer_js = js_divergence(start.load_share(), now.load_share())  # (L,)
    pooled = topk_set_change(start.topk, now.topk, valid)
    host = torch.cat([pooled.reshape(1), layer_js.nanmean().reshape(1), torch.stack(per_layer), layer_js])
    values = host.double().cpu().tolist()  # the one host sync of a drift measurement
    num_layers = len(per_layer)
    return Drift(
        topk_change=values[0],
        load_js=values[1],
        layer_topk_change=values[2 : 2 + num_layers],
        layer_load_js=values[2 + num_layers :],
    )


@torch.no_grad()
def probe_routing(
    capture: RoutingCapture, batch: Mapping[str, Any], chunk_rows: int | None = None
) -> ProbeResult:
    """Route a fixed batch through the captured model and return what every router chose.

    Runs the backbone only (no LM head, no loss), without gradient and in eval mode (Mixtral's
    router jitter and other train-time noise off), then restores each module's own mode. The
    running sums are untouched, so a probe can run in the middle of a logging window.
    `chunk_rows` splits the batch into forwards of at most that many sequences: with the
    training batch size, a probe never needs more memory than a training step does.
    """
    inputs = {
        key: value.to(capture.device) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
        if key in _PROBE_INPUTS and value is not None
    }
    if "input_ids" not in inputs and "inputs_embeds" not in inputs:
        raise ValueError(f"a probe batch needs input_ids or inputs_embeds; got keys {sorted(batch)}")
    rows = next(v for k, v in inputs.items() if k in ("input_ids", "inputs_embeds")).shape[0]
    step = rows if not chunk_rows or chunk_rows <= 0 else chunk_rows
    chunks = [
        {k: v[start : start + step] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        for start in range(0, rows, step)
    ]
    modes = [(module, module.training) for module in capture.model.modules()]
    topk_parts: list[list[torch.Tensor]] = [[] for _ in range(capture.num_layers)]
    counts = torch.zeros(capture.num_layers, capture.num_experts, device=capture.device)
    sums = capture.empty_sums()
    try:
        capture.model.eval()
        for chunk in chunks:
            with capture.recording_choices(into=sums) as chosen_by_layer:
                capture.backbone(**chunk, use_cache=False)
            missing = [capture.layer_names[i] for i in range(capture.num_layers) if i not in chosen_by_layer]
            if missing:
                raise RuntimeError(f"the probe forward did not reach {len(missing)} router(s), first {missing[0]}")
            for layer, (chosen, layer_counts) in chosen_by_layer.items():
                topk_parts[layer].append(chosen)
                counts[layer] += layer_counts.to(capture.device)
    finally:
        for module, training in modes:
            module.training = training
    # chunks split the batch dimension, so concatenated rows keep the row-major b*T+t order
    topk = torch.stack([torch.cat(parts) for parts in topk_parts])  # (L, N, k)
    return ProbeResult(topk=topk, counts=counts, valid=_real_rows(topk.shape[1], inputs), sums=sums)


def _real_rows(rows: int, inputs: Mapping[str, Any]) -> torch.Tensor | None:
    """(N,) bool of the probe's non-padding rows, flattened as the routers see them; None = all real."""
    keep = real_rows(inputs)
    return keep if keep is not None and keep.numel() == rows else None


def take_probe_batch(dataloader: Any, size: int) -> dict[str, torch.Tensor] | None:
    """The first `size` training rows, collated exactly as training batches are.

    Read from the dataloader's dataset through its collate_fn rather than by iterating the loader:
    iterating would draw from the samplers' random state and change the training data order.
    """
    if dataloader is None or size <= 0:
        return None
    dataset = getattr(dataloader, "dataset", None)
    collate = getattr(dataloader, "collate_fn", None)
    rows: list[Any] = []
    if dataset is not None and collate is not None:
        if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            rows = [dataset[i] for i in range(min(size, len(dataset)))]
        else:  # an IterableDataset: the first rows of a fresh iterator
            for row in dataset:
                rows.append(row)
                if len(rows) >= size:
                    break
    if not rows:
        return None
    batch = collate(rows)
    if not isinstance(batch, Mapping):
        return None
    return {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}

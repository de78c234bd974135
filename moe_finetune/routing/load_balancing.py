"""A load-balancing loss that balances each MoE layer on its own, with gradient.

transformers' `load_balancing_loss_func` concatenates the router logits of ALL layers before it
balances them: f and P are means over (layers x tokens), so expert 3 of layer 0 and expert 3 of
layer 1 count as one expert, one layer's overload cancels another's underload, and the pooled loss
reads k ("balanced") while single layers collapse (transformers #28255). Switch Transformer adds
the loss "for each Switch layer"; so does this module:

    aux_l = E * sum_e f_le * P_le        f_le = top-k assignments to e / real tokens   (sum_e f_le = k)
                                         P_le = mean routing score of e over real tokens
    aux   = mean over MoE layers of aux_l                       (uniform routing: every aux_l = k)

Why the mean over layers, not the sum: the gradient of transformers' pooled loss w.r.t. layer l's
P_le is E * f_e / L (f pooled), that of the mean is E * f_le / L. So at the same coefficient each
router is pushed exactly as hard as by the pooled loss (it reads k at balance, as the pooled loss
does), only against its own load instead of the pooled one: recipes tuned for transformers'
loss (router_aux_loss_coef 0.001-0.02) keep their strength. The Switch/Megatron sum over layers is
the mean at coef x L.

What it is computed from is what the routing metrics use (routing/capture.py), so the per-layer
`aux_loss` values in routing.jsonl are this loss's terms: f counts the router's OWN chosen experts
(never recomputed: DeepSeek-V3 chooses with a correction bias inside expert groups), P uses the
family's routing scores (`routing_scores`: softmax; for sigmoid families the normalised sigmoid
affinities s / sum s, which makes it DeepSeek-V3's complementary sequence-wise balance loss up to
the factor k and computed over the micro-batch; the correction bias is left alone). For softmax
families f and P are exactly what `load_balancing_loss_func` computes for one layer.

Where the logits with gradient come from: forward hooks on every router keep the router's output
tensors (not detached) for the forwards of one loss computation, and a pre-hook on the backbone
keeps which rows are padding (`attention_mask[:, -T:]`, the flattening transformers uses). Hooks
skip gradient-checkpointing recomputes (`is_recompute`), so a layer is counted once; with
non-reentrant checkpointing the kept logits are the real forward's, and the loss's backward
recomputes the layer like the task loss's does. With `use_reentrant=True` the real forward runs
without grad, so this loss (like transformers') is added but trains nothing: aux_check.py says so.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_finetune.errors import UnknownFamilyError
from moe_finetune.models.families import family_for_model, find_routers, unwrap_model
from moe_finetune.routing.capture import (
    find_backbone,
    is_recompute,
    read_router_output,
    real_rows,
    routing_scores,
)

# ------------------------------------------------------------------------------------------------
# the loss, as pure functions


def layer_balancing_loss(
    logits: torch.Tensor,
    chosen: torch.Tensor,
    num_experts: int,
    keep: torch.Tensor | None = None,
    scores: str = "softmax",
) -> torch.Tensor:
    """Switch/HF load-balancing loss of ONE layer, differentiable through the routing scores.

    aux = E * sum_e f_e * P_e,  f_e = #(kept rows choosing e) / #kept rows (no gradient: counts),
    P_e = mean over kept rows of the routing score of e. Uniform routing scores k, not 1.
    logits (N, E) raw router logits, chosen (N, k) expert indices, keep (N,) bool or None -> ().
    A layer with no kept row scores 0 (nothing to balance), not nan.
    """
    logits = logits.reshape(-1, num_experts).float()
    chosen = chosen.reshape(logits.shape[0], -1)
    probs = routing_scores(logits, scores)  # (N, E)
    weights = torch.ones(chosen.shape, device=logits.device, dtype=probs.dtype)
    if keep is None:
        tokens = torch.tensor(float(logits.shape[0]), device=logits.device)
        prob_sum = probs.sum(0)
    else:
        keep = keep.to(logits.device).bool()
        tokens = keep.sum().to(probs.dtype)
        weights = weights * keep.to(probs.dtype).unsqueeze(-1)
        # where, not multiply: a padding row's nan must not leak into the sum
        prob_sum = torch.where(keep.unsqueeze(-1), probs, 0.0).sum(0)
    counts = torch.zeros(num_experts, device=logits.device, dtype=probs.dtype)
    counts = counts.index_add(0, chosen.reshape(-1).to(logits.device), weights.reshape(-1).detach())
    tokens = tokens.clamp(min=1.0)
    return num_experts * ((counts / tokens) * (prob_sum / tokens)).sum()


def per_layer_balancing_loss(layer_losses: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of the layers' losses (see the module docstring for why the mean), on the first
    layer's device.      [(), ...] -> ()"""
    if not layer_losses:
        raise ValueError("no MoE layer routed anything: there is no load-balancing loss to compute")
    device = layer_losses[0].device
    return torch.stack([loss.to(device) for loss in layer_losses]).mean()


# ------------------------------------------------------------------------------------------------
# keeping the router logits (with gradient) of the forwards of one step


@dataclass
class _Routed:
    logits: torch.Tensor  # (N, E), not detached
    chosen: torch.Tensor  # (N, k)
    keep: torch.Tensor | None  # (N,) bool, None = every row is real


# the tap installed on each (unwrapped) model, so aux_check can say which loss is in force
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, RouterLogitsTap] = weakref.WeakKeyDictionary()


def installed_tap(model: nn.Module) -> RouterLogitsTap | None:
    """The RouterLogitsTap (per-layer loss) installed on this model or the model it wraps, if any."""
    tap = _INSTALLED.get(unwrap_model(model))
    return tap if tap is not None and tap.active else None


class RouterLogitsTap:
    """Hooks that keep each router's logits and choices, with gradient, and compute the per-layer loss.

        tap = RouterLogitsTap(model, coefficient=0.01)
        tap.begin()                        # a loss computation starts: forget earlier forwards
        out = model(**batch)               # any number of forwards
        loss = out.loss + tap.coefficient * tap.take()   # the mean per-layer loss; forgets them again

    Outside a begin()/take() window only the latest forward is kept, so a model that also generates
    or evaluates with the tap installed holds at most one forward's (N, E) logits per layer.
    `coefficient` is carried for the adapters (and reported by aux_check); the tap never applies it.
    """

    def __init__(self, model: nn.Module, coefficient: float = 0.0) -> None:
        self.model = model
        self.coefficient = float(coefficient)
        self.family = family_for_model(model)
        self.num_experts = self.family.num_experts(unwrap_model(model).config)
        self.layer_names, layer_modules = find_routers(model, self.family)
        if not self.layer_names:
            raise UnknownFamilyError(
                f"{type(model).__name__} (family {self.family.name}) has no router module of class "
                f"{', '.join(self.family.router_classes)}: a per-layer load-balancing loss cannot be computed"
            )
        self._keep: torch.Tensor | None = None
        self._forwards: list[dict[int, _Routed]] = []
        self._collecting = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        backbone = find_backbone(model)
        self._handles.append(backbone.register_forward_pre_hook(self._on_backbone_start, with_kwargs=True))
        for layer, modules in enumerate(layer_modules):
            for module in modules:
                self._handles.append(module.register_forward_hook(self._router_hook(layer)))
        _INSTALLED[unwrap_model(model)] = self

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        """Take the hooks off (idempotent) and forget every kept tensor."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._forwards.clear()
        self._keep = None
        if _INSTALLED.get(unwrap_model(self.model)) is self:
            del _INSTALLED[unwrap_model(self.model)]

    # ------------------------------------------------------------------ a loss computation

    def begin(self) -> None:
        """Start a window: forget earlier forwards, keep every forward until `take`."""
        self._forwards = []
        self._collecting = True

    def take(self) -> torch.Tensor | None:
        """The per-layer loss of the window's forwards, then forget them (None: no router ran).

        When the window ran forwards with and without grad (a trainer that recomputes its outputs
        under no_grad for metrics), only those with grad count: they are the ones being trained.
        Several forwards with grad are averaged.
        """
        forwards, self._forwards, self._collecting = [f for f in self._forwards if f], [], False
        if not forwards:
            return None
        with_grad = [f for f in forwards if any(r.logits.requires_grad for r in f.values())]
        losses = [self.loss_of(f) for f in (with_grad or forwards[-1:])]
        return per_layer_balancing_loss(losses)

    def loss_of(self, routed: dict[int, _Routed]) -> torch.Tensor:
        """The mean over the layers of one forward of each layer's own load-balancing loss."""
        return per_layer_balancing_loss(
            [
                layer_balancing_loss(r.logits, r.chosen, self.num_experts, r.keep, self.family.scores)
                for _, r in sorted(routed.items())
            ]
        )

    # ------------------------------------------------------------------ hooks

    def _on_backbone_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if is_recompute():
            return
        self._keep = real_rows(kwargs, args)
        if not self._collecting:
            self._forwards = []
        self._forwards.append({})

    def _router_hook(self, layer: int) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if is_recompute():
                return  # gradient checkpointing re-running the forward inside backward
            logits, chosen = read_router_output(output, self.family)  # logits keep their gradient
            keep = self._keep if self._keep is not None and self._keep.numel() == logits.shape[0] else None
            if not self._forwards:  # a router called outside the backbone (a unit test, a custom loop)
                self._forwards.append({})
            self._forwards[-1][layer] = _Routed(logits, chosen, keep)

        return hook

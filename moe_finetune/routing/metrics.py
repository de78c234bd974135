"""Routing-health metrics: pure torch functions over per-layer running sums.

The capture hooks (routing/capture.py) keep these sums per MoE layer, on the routers' devices
(L = MoE layers, E = experts, k = experts chosen per token):

    tokens         (L,)    real (non-padding) tokens routed
    assign_counts  (L, E)  top-k assignments per expert; each token makes k of them
    prob_sum       (L, E)  sum over tokens of the routing probabilities (each row sums to 1)
    entropy_sum    (L,)    sum over tokens of the routing entropy, in nats
    z_sum          (L,)    sum over tokens of logsumexp(router_logits)^2
    overflow       (L,)    sum over forwards of the assignments over capacity

Every function takes and returns tensors, works on any device and never syncs with the host;
`summarise` is the one place that turns the sums into Python numbers (one transfer per log).
A model split over devices (`device_map="auto"`) keeps one set of sums per device, added up by
`combine_sums` at logging time (one transfer per device).

Two kinds of entropy answer two questions. The per-token routing entropy (`normalised_entropy`,
`routing/entropy`) falls when routers get confident, which healthy specialisation also does. The
balance (`balance`, `routing/balance`) is the entropy of the layer's load share: it falls only when
the LOAD concentrates on few experts, which is collapse. A router can be certain about every token
and still perfectly balanced (each token sure of a different expert).

A layer that routed no tokens has no metrics: its per-layer values are nan, and the pooled
values skip it. Sums that are themselves non-finite (a router that produced nan or inf) are
reported by `RoutingMetrics.finite` rather than skipped silently.

Why one file of ~500 lines: it is the catalogue of routing metrics, one short function per formula,
and `summarise`, the one place they become Python numbers; splitting it would hide one from another.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

# -----------------------------------------------------------------------------
# per token


def token_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of each routing distribution, in nats.

    H(p) = -sum_e p_e ln p_e, with 0 ln 0 = 0.      probs (..., E) -> (...)
    """
    # xlogy(0, 0) = 0, so a saturated softmax (exact zeros) gives neither nan nor -inf
    return -torch.special.xlogy(probs, probs).sum(dim=-1)


# -----------------------------------------------------------------------------
# per layer, from the running sums


def _per_token(total: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """total / tokens per layer; nan where the layer routed no tokens. total (L, ...), tokens (L,)."""
    tokens = tokens.reshape(tokens.shape + (1,) * (total.dim() - tokens.dim()))
    return torch.where(tokens > 0, total / tokens, torch.nan)


def normalised_entropy(entropy_sum: torch.Tensor, tokens: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Mean routing entropy of each layer as a fraction of its maximum, ln E.

    H_norm_l = entropy_sum_l / tokens_l / ln E, in [0, 1]: 1 = uniform router, 0 = every token
    certain of one expert.      (L,), (L,) -> (L,); nan for a layer with no tokens.
    """
    if num_experts < 2:
        raise ValueError(f"normalised entropy needs at least 2 experts (ln E > 0), got {num_experts}")
    # the clamp only removes rounding (a uniform router can land a hair above 1); nan stays nan
    return (_per_token(entropy_sum, tokens) / math.log(num_experts)).clamp(0.0, 1.0)


def load_share(assign_counts: torch.Tensor) -> torch.Tensor:
    """Fraction of each layer's top-k assignments that went to each expert.

    share_le = assign_counts_le / sum_e assign_counts_le; rows sum to 1, uniform = 1/E. With
    top-2 of 8, an expert that every token picks has share 0.5.
    (L, E) -> (L, E); a row of nan for a layer with no assignments.
    """
    return assign_counts / assign_counts.sum(dim=-1, keepdim=True)


def prob_share(prob_sum: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean routing probability of each expert per layer.

    P_le = prob_sum_le / tokens_l; rows sum to 1.      (L, E), (L,) -> (L, E); nan for no tokens.
    """
    return _per_token(prob_sum, tokens)


def balance(share: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of each layer's share distribution: how evenly the layer spreads over experts.

    B_l = -sum_e share_le ln share_le / ln E, with 0 ln 0 = 0, in [0, 1]: 1 = every expert an equal
    share, 0 = one expert takes everything.      (L, E) -> (L,); nan for a nan row (no tokens).

    For the load share (top-k assignments) 0 is out of reach: a token's k assignments go to k
    different experts, so no expert holds more than 1/k of them, and a fully collapsed layer (every
    token picks the same k experts) has share 1/k on k experts and balance ln k / ln E
    (`lowest_load_balance`; top-2 of 8: ln 2 / ln 8 = 1/3). For the mean routing distribution
    (`prob_share`) 0 is reached when every token puts all its probability on one expert.
    The mean distribution is the average of the per-token ones and entropy is concave, so its
    balance is never below the layer's mean per-token entropy (`normalised_entropy`).
    """
    num_experts = share.shape[-1]
    if num_experts < 2:
        raise ValueError(f"balance needs at least 2 experts (ln E > 0), got {num_experts}")
    # same 0 ln 0 = 0 as token_entropy; the clamp only removes rounding, nan stays nan
    return (token_entropy(share) / math.log(num_experts)).clamp(0.0, 1.0)


def lowest_load_balance(num_experts: int, top_k: int) -> float:
    """The lowest `balance` a top-k load share can have: ln k / ln E (all load on the same k experts).

    Top-1 can reach 0; top-2 of 8 stops at 1/3; top-8 of 64 at 1/2. A balance threshold at or
    below this line can never fire.
    """
    if not 1 <= top_k <= num_experts or num_experts < 2:
        raise ValueError(f"need 1 <= top_k <= num_experts and num_experts >= 2, got {top_k} of {num_experts}")
    return math.log(top_k) / math.log(num_experts)


def load_cv(share: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation of the load shares: population std / mean (0 = perfectly even).

    cv_l = sqrt(mean_e (share_le - 1/E)^2) / (1/E).      (L, E) -> (L,)
    """
    return share.std(dim=-1, correction=0) / share.mean(dim=-1)


def load_max(share: torch.Tensor) -> torch.Tensor:
    """Largest expert share relative to uniform: max_e share_le * E (1.0 = uniform, E/k = collapsed).

    (L, E) -> (L,)
    """
    return share.amax(dim=-1) * share.shape[-1]


def dead_experts(share: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Number of experts per layer whose share is below threshold x uniform.

    dead_l = #{e : share_le < threshold / E}.      (L, E) -> (L,) float; nan for a layer with no
    assignments (no evidence either way).
    """
    dead = (share < threshold / share.shape[-1]).sum(dim=-1).to(share.dtype)
    return torch.where(share.isnan().any(dim=-1), torch.nan, dead)


def layer_aux_loss(assign_counts: torch.Tensor, prob_sum: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Switch/HF load-balancing loss of each layer on its own.

    aux_l = E * sum_e f_le * P_le,  f_le = assign_counts_le / tokens_l,  P_le = prob_sum_le / tokens_l.
    f counts top-k assignments (sum_e f_le = k), so a uniform router scores k, not 1.
    (L, E), (L, E), (L,) -> (L,); nan for a layer with no tokens.
    """
    f = _per_token(assign_counts, tokens)  # (L, E)
    P = _per_token(prob_sum, tokens)  # (L, E)
    return assign_counts.shape[-1] * (f * P).sum(dim=-1)


def aux_loss(assign_counts: torch.Tensor, prob_sum: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Load-balancing loss pooled over layers, exactly as transformers' `load_balancing_loss_func`.

    HF concatenates every layer's router logits, so f and P are means over (layers x tokens):
    aux = E * sum_e f_e * P_e,  f_e = sum_l assign_counts_le / sum_l tokens_l,
                                P_e = sum_l prob_sum_le / sum_l tokens_l.
    A product of pooled means, so not the mean of `layer_aux_loss`. Layers with no tokens add
    nothing.      (L, E), (L, E), (L,) -> ()
    """
    return layer_aux_loss(
        assign_counts.sum(0, keepdim=True), prob_sum.sum(0, keepdim=True), tokens.sum(0, keepdim=True)
    )[0]


def z_loss(z_sum: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss per layer: mean over tokens of logsumexp(router_logits)^2.

    z_l = z_sum_l / tokens_l.      (L,), (L,) -> (L,); nan for a layer with no tokens.
    """
    return _per_token(z_sum, tokens)


def pooled_z_loss(z_sum: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Token-weighted mean z-loss over all layers: sum_l z_sum_l / sum_l tokens_l.   (L,), (L,) -> ()"""
    return z_loss(z_sum.sum(0, keepdim=True), tokens.sum(0, keepdim=True))[0]


def overflow_assignments(counts: torch.Tensor, top_k: int, capacity_factor: float = 1.25) -> torch.Tensor:
    """Top-k assignments of ONE forward that do not fit in their expert's capacity.

    capacity = capacity_factor * tokens * k / E = capacity_factor * sum_e counts_e / E
    overflow = sum_e max(0, counts_e - capacity)
    counts (..., E) -> (...). The capture calls this per forward and adds it into `overflow`.

    GShard and Switch round the capacity to a whole number of slots (floor / ceil); we keep it
    continuous, so the drop fraction does not jump with batch size. sum_e counts_e already equals
    tokens * k, so `top_k` does not enter the arithmetic.
    """
    capacity = capacity_factor * counts.sum(dim=-1, keepdim=True) / counts.shape[-1]  # (..., 1)
    return (counts - capacity).clamp(min=0).sum(dim=-1)


def drop_fraction(overflow: torch.Tensor, assign_counts: torch.Tensor) -> torch.Tensor:
    """Share of each layer's top-k assignments that were over capacity (would be dropped).

    drop_l = overflow_l / sum_e assign_counts_le, in [0, 1).      (L,), (L, E) -> (L,)
    """
    return _per_token(overflow, assign_counts.sum(dim=-1))


def pooled_drop_fraction(overflow: torch.Tensor, assign_counts: torch.Tensor) -> torch.Tensor:
    """Share of all top-k assignments, over all layers, that were over capacity.   (L,), (L, E) -> ()"""
    return drop_fraction(overflow.sum(0, keepdim=True), assign_counts.sum(0, keepdim=True))[0]


# -----------------------------------------------------------------------------
# pooling over layers: layers with no tokens (nan) are skipped; all nan -> nan


def mean_over_layers(values: torch.Tensor) -> torch.Tensor:
    """Mean over layers, skipping nan layers.   (L,) -> ()"""
    return values.nanmean()


def min_over_layers(values: torch.Tensor) -> torch.Tensor:
    """Smallest value over layers, skipping nan layers.   (L,) -> ()"""
    lowest = torch.where(values.isnan(), math.inf, values).amin()
    return torch.where(values.isnan().all(), torch.nan, lowest)


def max_over_layers(values: torch.Tensor) -> torch.Tensor:
    """Largest value over layers, skipping nan layers.   (L,) -> ()"""
    highest = torch.where(values.isnan(), -math.inf, values).amax()
    return torch.where(values.isnan().all(), torch.nan, highest)


# -----------------------------------------------------------------------------
# drift: how far routing has moved from a reference (e.g. the probe batch at step 0)


def topk_set_change(
    before_idx: torch.Tensor, after_idx: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Share of (layer, token) pairs whose set of top-k experts changed.

    drift = mean over layers l and valid tokens n of [ set(before_ln) != set(after_ln) ]
    Order within the top-k does not count: both are sorted along k.
    (L, N, k), (L, N, k), valid (N,) bool or None -> (); nan if no token is valid.
    """
    if before_idx.shape != after_idx.shape:
        raise ValueError(
            f"top-k indices differ in shape: {tuple(before_idx.shape)} vs {tuple(after_idx.shape)}"
        )
    changed = (before_idx.sort(dim=-1).values != after_idx.sort(dim=-1).values).any(dim=-1)  # (L, N)
    if valid is None:
        return changed.float().mean()
    valid = valid.to(device=changed.device, dtype=torch.bool)  # (N,)
    return (changed & valid).sum() / (valid.sum() * changed.shape[0])


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between routing distributions, in bits (so in [0, 1]).

    JS(p, q) = 1/2 KL(p || m) + 1/2 KL(q || m),  m = (p + q) / 2,  KL(p || m) = sum_e p_e log2(p_e / m_e),
    with 0 log 0 = 0. Symmetric; 0 iff p = q; 1 iff p and q share no expert.
    p, q (..., E), each summing to 1 -> (...)
    """
    m = (p + q) / 2
    kl_pm = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(dim=-1)  # nats
    kl_qm = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(dim=-1)
    # the clamp only removes rounding (identical rows can give -1e-9)
    return ((kl_pm + kl_qm) / (2 * math.log(2))).clamp(0.0, 1.0)


# -----------------------------------------------------------------------------
# the running sums and their summary

_TENSOR_FIELDS = ("tokens", "assign_counts", "prob_sum", "entropy_sum", "z_sum", "overflow")


@dataclass(eq=False)
class RoutingSums:
    """Per-layer running sums filled by the capture hooks; all tensors on one device (a model split over
    devices has one set per device, added up by `combine_sums`)."""

    tokens: torch.Tensor  # (L,)
    assign_counts: torch.Tensor  # (L, E)
    prob_sum: torch.Tensor  # (L, E)
    entropy_sum: torch.Tensor  # (L,)
    z_sum: torch.Tensor  # (L,)
    overflow: torch.Tensor  # (L,)
    num_experts: int
    top_k: int
    layer_names: list[str]

    @classmethod
    def zeros(
        cls,
        num_layers: int,
        num_experts: int,
        top_k: int,
        layer_names: list[str],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> RoutingSums:
        """Empty sums for `num_layers` MoE layers of `num_experts` experts each."""
        if len(layer_names) != num_layers:
            raise ValueError(f"{len(layer_names)} layer names for {num_layers} layers")

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, device=device, dtype=dtype)

        L, E = num_layers, num_experts
        return cls(
            zeros(L), zeros(L, E), zeros(L, E), zeros(L), zeros(L), zeros(L), E, top_k, list(layer_names)
        )

    def __add__(self, other: RoutingSums) -> RoutingSums:
        if not isinstance(other, RoutingSums):
            return NotImplemented
        layout = (self.num_experts, self.top_k, self.layer_names)
        if layout != (other.num_experts, other.top_k, other.layer_names):
            raise ValueError(
                "cannot add routing sums of different models: (num_experts, top_k, layer_names) "
                f"{layout} vs {(other.num_experts, other.top_k, other.layer_names)}"
            )
        added = {name: getattr(self, name) + getattr(other, name) for name in _TENSOR_FIELDS}
        return replace(self, **added, layer_names=list(self.layer_names))

    def to(self, device: torch.device | str) -> RoutingSums:
        moved = {name: getattr(self, name).to(device) for name in _TENSOR_FIELDS}
        return replace(self, **moved, layer_names=list(self.layer_names))

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def as_tensor(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Every sum in one 1-D tensor (float64 by default: exact counts), so one all_reduce or one
        device transfer covers them all."""
        return torch.cat([getattr(self, name).reshape(-1).to(dtype) for name in _TENSOR_FIELDS])

    def from_tensor(self, flat: torch.Tensor) -> RoutingSums:
        """Inverse of `as_tensor`: new sums with this layout, dtype and device, values from `flat`."""
        templates = [getattr(self, name) for name in _TENSOR_FIELDS]
        sizes = [t.numel() for t in templates]
        if flat.dim() != 1 or flat.numel() != sum(sizes):
            raise ValueError(f"expected a 1-D tensor of {sum(sizes)} values, got shape {tuple(flat.shape)}")
        parts = flat.split(sizes)
        values = {
            name: part.reshape(t.shape).to(device=t.device, dtype=t.dtype)
            for name, part, t in zip(_TENSOR_FIELDS, parts, templates, strict=True)
        }
        return replace(self, **values, layer_names=list(self.layer_names))


def combine_sums(parts: Sequence[RoutingSums], device: torch.device | str | None = None) -> RoutingSums:
    """Add running sums kept on several devices (routers of a model split by `device_map`) on one.

    total = sum over parts, on `device` (default: the first part's) in the first part's dtype.
    Each part crosses to `device` as one flat tensor, so a log costs one transfer per device. The
    result is a new set of tensors: later changes to the parts (a reset, more forwards) leave it alone.
    """
    if not parts:
        raise ValueError("combine_sums needs at least one set of routing sums")
    first = parts[0]
    layout = (first.num_experts, first.top_k, first.layer_names)
    for part in parts[1:]:
        if (part.num_experts, part.top_k, part.layer_names) != layout:
            raise ValueError(
                "cannot combine routing sums of different models: (num_experts, top_k, layer_names) "
                f"{layout} vs {(part.num_experts, part.top_k, part.layer_names)}"
            )
    target = torch.device(device) if device is not None else first.device
    dtype = first.tokens.dtype
    # torch.cat makes new tensors, so the total never aliases a part
    total = first.as_tensor(dtype).to(target)
    for part in parts[1:]:
        total = total + part.as_tensor(dtype).to(target)
    shapes = [getattr(first, name).shape for name in _TENSOR_FIELDS]
    pieces = total.split([math.prod(shape) for shape in shapes])
    fields = zip(_TENSOR_FIELDS, pieces, shapes, strict=True)
    values = {name: piece.reshape(shape) for name, piece, shape in fields}
    return replace(first, **values, layer_names=list(first.layer_names))


@dataclass
class RoutingMetrics:
    """Routing health at one logging step, as Python numbers. nan = the layer routed no tokens."""

    layer_names: list[str]
    # per layer (lists of length L)
    layer_tokens: list[float]
    layer_entropy: list[float]  # normalised, 0..1
    load_share: list[list[float]]  # L x E, rows sum to 1
    prob_share: list[list[float]]  # L x E, mean routing probability
    layer_load_cv: list[float]
    layer_load_max: list[float]
    layer_dead_experts: list[float]
    layer_aux_loss: list[float]
    layer_z_loss: list[float]
    layer_drop_fraction: list[float]
    layer_balance: list[float]  # normalised entropy of load_share, ln k / ln E (collapsed) .. 1 (even)
    layer_prob_balance: list[float]  # normalised entropy of prob_share, 0..1
    # pooled over layers
    entropy: float  # mean of layer_entropy
    entropy_min: float  # lowest layer
    balance: float  # mean of layer_balance
    balance_min: float  # lowest layer
    prob_balance: float  # mean of layer_prob_balance
    load_max: float  # highest layer
    load_cv: float  # mean over layers
    dead_experts: int  # total over layers
    aux_loss: float  # HF's pooled definition
    z_loss: float  # token-weighted mean
    drop_fraction: float  # over all assignments
    finite: bool  # every running sum is finite
    tokens: int  # tokens routed per layer (the most any layer saw)
    capacity_factor: float  # the capacity factor the overflow was counted at (recorded, not recomputed)
    dead_threshold: float = 0.1  # the line (x uniform) below which an expert counted as dead

    def pooled(self) -> dict[str, float]:
        """The values sent to the Trainer's loggers (routing/drift is added by the caller)."""
        return {
            "routing/entropy": self.entropy,
            "routing/entropy_min": self.entropy_min,
            "routing/balance": self.balance,
            "routing/balance_min": self.balance_min,
            "routing/prob_balance": self.prob_balance,
            "routing/load_max": self.load_max,
            "routing/load_cv": self.load_cv,
            "routing/dead_experts": float(self.dead_experts),
            "routing/aux_loss": self.aux_loss,
            "routing/z_loss": self.z_loss,
            "routing/drop_fraction": self.drop_fraction,
        }

    def per_layer(self) -> list[dict]:
        """One dict per layer, for routing.jsonl (nan for a layer with no tokens)."""
        return [
            {
                "layer": name,
                "tokens": self.layer_tokens[i],
                "entropy": self.layer_entropy[i],
                "load": self.load_share[i],
                "prob": self.prob_share[i],
                "load_cv": self.layer_load_cv[i],
                "load_max": self.layer_load_max[i],
                "dead_experts": self.layer_dead_experts[i],
                "aux_loss": self.layer_aux_loss[i],
                "z_loss": self.layer_z_loss[i],
                "drop_fraction": self.layer_drop_fraction[i],
                "balance": self.layer_balance[i],
                "prob_balance": self.layer_prob_balance[i],
            }
            for i, name in enumerate(self.layer_names)
        ]


def summarise(
    sums: RoutingSums, capacity_factor: float = 1.25, dead_threshold: float = 0.1
) -> RoutingMetrics:
    """Every routing metric from the running sums, with a single device-to-host transfer.

    `capacity_factor` is the one the capture counted `overflow` at; it is recorded in the result so
    the drop fraction can be read, not used to recompute anything.
    """
    share = load_share(sums.assign_counts)  # (L, E)
    mean_probs = prob_share(sums.prob_sum, sums.tokens)  # (L, E)
    entropy = normalised_entropy(sums.entropy_sum, sums.tokens, sums.num_experts)  # (L,)
    load_balance, prob_balance = balance(share), balance(mean_probs)  # (L,)
    cv, peak = load_cv(share), load_max(share)  # (L,)
    dead = dead_experts(share, dead_threshold)  # (L,)
    on_device = {
        "layer_tokens": sums.tokens,
        "layer_entropy": entropy,
        "load_share": share,
        "prob_share": mean_probs,
        "layer_load_cv": cv,
        "layer_load_max": peak,
        "layer_dead_experts": dead,
        "layer_aux_loss": layer_aux_loss(sums.assign_counts, sums.prob_sum, sums.tokens),
        "layer_z_loss": z_loss(sums.z_sum, sums.tokens),
        "layer_drop_fraction": drop_fraction(sums.overflow, sums.assign_counts),
        "layer_balance": load_balance,
        "layer_prob_balance": prob_balance,
        "entropy": mean_over_layers(entropy),
        "entropy_min": min_over_layers(entropy),
        "balance": mean_over_layers(load_balance),
        "balance_min": min_over_layers(load_balance),
        "prob_balance": mean_over_layers(prob_balance),
        "load_max": max_over_layers(peak),
        "load_cv": mean_over_layers(cv),
        "dead_experts": dead.nansum(),
        "aux_loss": aux_loss(sums.assign_counts, sums.prob_sum, sums.tokens),
        "z_loss": pooled_z_loss(sums.z_sum, sums.tokens),
        "drop_fraction": pooled_drop_fraction(sums.overflow, sums.assign_counts),
        "finite": torch.stack([getattr(sums, name).isfinite().all() for name in _TENSOR_FIELDS]).all(),
        "tokens": sums.tokens.amax(),
    }
    tensors = list(on_device.values())
    # the one host sync; float64 only on the host (MPS has no float64)
    host = torch.cat([t.reshape(-1).to(sums.tokens.dtype) for t in tensors]).cpu().double()
    values = {
        name: part.reshape(t.shape).tolist()
        for name, part, t in zip(on_device, host.split([t.numel() for t in tensors]), tensors, strict=True)
    }
    values["dead_experts"] = int(values["dead_experts"])
    values["finite"] = bool(values["finite"])
    values["tokens"] = int(values["tokens"]) if math.isfinite(values["tokens"]) else 0
    return RoutingMetrics(
        layer_names=list(sums.layer_names),
        capacity_factor=capacity_factor,
        dead_threshold=dead_threshold,
        **values,
    )

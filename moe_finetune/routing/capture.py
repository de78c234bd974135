"""Forward hooks on every router of an MoE model, filling per-layer running sums on the routers' devices.

    with capture_routing(model) as cap:     # hooks on every router, removed on exit
        model(**batch)
    metrics = cap.stats()                   # the one host sync: RoutingMetrics (metrics.py)

What a hook sees and why it is read the way it is (facts: shared/research/families.md):

- Routers are found by class name from the family table (models/families.py), so a PEFT-wrapped,
  DDP-wrapped or compiled model works too; `modules_to_save` copies of a router share its layer slot.
- The chosen experts are the router's OWN returned top-k indices, never recomputed: DeepSeek-V3
  chooses with sigmoid scores + a correction bias inside expert groups, and only its output says
  what it really chose.
- Routers also route padding rows. A forward pre-hook on the backbone captures `attention_mask`
  and the input length T; router rows are kept by `attention_mask[:, -T:].reshape(-1)` (the
  flattening transformers' `load_balancing_loss_func` uses; `-T:` matters when decoding with a
  cache). No mask (or packed `position_ids` without one) means every row is real.
- Gradient checkpointing re-runs every router inside backward. `torch._C._current_graph_task_id()`
  is -1 in a real forward and >= 0 in a recompute, in both reentrant modes
  (`torch.is_grad_enabled()` is not: reentrant checkpointing runs the real forward without grad).
- Everything a hook does is tensor arithmetic queued on the device: no `.item()`, no `.cpu()`, no
  Python branch on a tensor value, so the hooks never stall a GPU. The router logits are reduced
  to a few (E,)-sized sums inside the hook and dropped: memory does not grow with sequence length.
- A model split over devices (`device_map="auto"` puts layers on different GPUs) keeps one set of
  running sums per device: each router adds to the sums on its own device, and `sums` adds them up
  on `device` (the first router's) only when read, one transfer per device per log
  (`metrics.combine_sums`). The padding mask crosses to each router device once per forward.
- Which distributions are measured: `prob_sum` (and with it the mean distribution, the per-layer
  aux loss and `prob_balance`) uses the family's routing scores (`FamilySpec.scores`); the per-token
  entropy is always that of softmax(logits). For a softmax router the two are the same thing; for
  a sigmoid router (DeepSeek-V3) see `routing_entropy_probs` for why and what was measured.

Why one file of ~400 lines: the hooks and the per-device sums they fill are one mechanism; the drift
probe that reuses them lives in probe.py.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from moe_finetune.errors import UnknownFamilyError
from moe_finetune.models.families import FamilySpec, family_for_model, find_routers, unwrap_model
from moe_finetune.routing.metrics import (
    RoutingMetrics,
    RoutingSums,
    combine_sums,
    overflow_assignments,
    summarise,
    token_entropy,
)

_SUM_FIELDS = ("tokens", "assign_counts", "prob_sum", "entropy_sum", "z_sum", "overflow")


def is_recompute() -> bool:
    """True inside backward, i.e. when gradient checkpointing re-runs a forward (both reentrant modes)."""
    return torch._C._current_graph_task_id() != -1


def find_backbone(model: nn.Module) -> nn.Module:
    """The decoder stack (e.g. MixtralModel) whose forward every path goes through.

    Its forward is always entered through `__call__` (by the CausalLM forward, and by TRL's fused LM
    head, which calls the backbone directly), so a pre-hook on it sees the mask; a hook on the
    CausalLM itself would be skipped under PEFT, which calls the wrapped model's `.forward` directly.
    """
    inner = unwrap_model(model)
    backbone = getattr(inner, "base_model", inner)  # PreTrainedModel: base_model_prefix -> the stack
    return backbone if isinstance(backbone, nn.Module) else inner


def _module_device(module: nn.Module, fallback: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers(), *fallback.parameters()):
        return tensor.device
    return torch.device("cpu")


def _sums_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps the counts exact over long logging windows; MPS has no float64
    return torch.float32 if device.type == "mps" else torch.float64


def routing_scores(logits: torch.Tensor, scores: str) -> torch.Tensor:
    """(N, E) routing probabilities of a family: what `prob_sum`, the mean distribution and the aux
    loss are computed from.

    "softmax": softmax(logits). "sigmoid" (DeepSeek-V3): s / sum_e s_e with s = sigmoid(logits), the
    normalised affinities DeepSeek-V3's own sequence-wise balance loss uses; the correction bias only
    steers the choice (read from the router's output) and is not part of the scores.
    """
    if scores == "sigmoid":
        affinity = logits.sigmoid()
        return affinity / affinity.sum(dim=-1, keepdim=True)
    return logits.softmax(dim=-1)


def routing_entropy_probs(logits: torch.Tensor) -> torch.Tensor:
    """(N, E) the distribution whose entropy is the per-token routing entropy: softmax(logits), in
    every family.

    For a softmax router that is its routing distribution. For a sigmoid router it is the normalised
    odds, s / (1 - s) = e^x for s = sigmoid(x), rather than the normalised scores s / sum s: a score
    saturates at 1, so when such a router sharpens, every expert with a positive logit ends near 1
    and s / sum s tends to uniform over those experts (about half of them for a zero-mean router),
    an entropy of about ln(E/2) / ln E however decisive the router has become. Odds do not saturate.
    Where every logit is well below zero (s << 1) the two agree, since then s is about e^x.

    Measured on the tiny DeepSeek-V3 (8 experts, top-2, 4x32 tokens; tests/test_sigmoid_routing.py),
    mean normalised entropy with the router weights x1 -> x10 -> x100 (near-deterministic):
    normalised scores s / sum s 0.94 -> 0.66 -> 0.60 (a 36% fall at most: it never reaches the
    guard's 40% halt line however sharp the router gets); softmax(logits) 0.77 -> 0.096 -> 0.009,
    as Mixtral's own 0.78 -> 0.100 -> 0.009; normalised top-k weights (by ln k) 0.98 -> 0.92 -> 0.86
    (both chosen scores saturate at 1 and weigh the same). The load balance stayed 0.97-0.99
    throughout: sharpening is not collapse. A correction bias sending every token to experts 0 and 1
    drops the balance to its floor 1/3 and leaves this entropy at 0.76 (the bias is in neither).
    """
    return logits.softmax(dim=-1)


class RoutingCapture:
    """Hooks on every router of `model`, accumulating RoutingSums on each router's device.

    Installed on construction; `remove()` (or leaving `capture_routing`) takes every hook off.
    `train_only=True` ignores forwards of routers in eval mode, so evaluation inside a training run
    does not leak into the training window's numbers (the RoutingMonitor uses it).
    """

    def __init__(self, model: nn.Module, *, capacity_factor: float = 1.25, train_only: bool = False) -> None:
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.model = model
        self.family = family_for_model(model)
        config = unwrap_model(model).config
        self.num_experts = self.family.num_experts(config)
        self.top_k = self.family.top_k(config)
        self.capacity_factor = float(capacity_factor)
        self.train_only = train_only
        self.layer_names, self._layer_modules = find_routers(model, self.family)
        if not self.layer_names:
            raise UnknownFamilyError(
                f"{type(model).__name__} ({type(unwrap_model(model)).__name__}, family {self.family.name}) has no "
                f"router module of class {', '.join(self.family.router_classes)}: routing cannot be captured. "
                "If the model uses a hub kernel that replaces its MoE forward, or a newer modeling file, add its "
                "router class to the family's FamilySpec in moe_finetune/models/families.py"
            )
        self.backbone = find_backbone(model)
        # where each layer's router lives; `device` (the first router's) is where `sums` are added up
        self._layer_devices = [_module_device(modules[0], model) for modules in self._layer_modules]
        self.device = self._layer_devices[0]
        self._sums_by_device: dict[torch.device, RoutingSums] = {}
        for device in dict.fromkeys([self.device, *self._layer_devices]):
            if device == self.device or device.type != "meta":  # offloaded weights: found at forward time
                self._sums_on(device)
        self._keep: torch.Tensor | None = None  # (B*T,) bool of the forward in flight
        self._keep_on: dict[torch.device, torch.Tensor] = {}  # that mask, moved to each router device
        self._probe: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._probe_sums: RoutingSums | None = None  # where a probe's forwards are summed, if asked
        self._warned_mask = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._install()

    # ------------------------------------------------------------------ lifecycle

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def active(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    def _install(self) -> None:
        self._handles.append(
            self.backbone.register_forward_pre_hook(self._on_backbone_start, with_kwargs=True)
        )
        self._handles.append(self.backbone.register_forward_hook(self._on_backbone_end, always_call=True))
        for layer, modules in enumerate(self._layer_modules):
            for module in modules:
                self._handles.append(module.register_forward_hook(self._router_hook(layer)))

    def remove(self) -> None:
        """Take every hook off the model (idempotent); the sums stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._keep = None

    def __enter__(self) -> RoutingCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # ------------------------------------------------------------------ reading the sums

    @property
    def sums(self) -> RoutingSums:
        """The running sums of every layer since the last reset, on `device`: a new set of tensors,
        so later forwards and `reset()` leave it alone (one transfer per other router device)."""
        primary = self._sums_on(self.device)
        others = [part for device, part in self._sums_by_device.items() if device != self.device]
        return combine_sums([primary, *others], self.device)

    @property
    def sums_by_device(self) -> dict[torch.device, RoutingSums]:
        """The running sums as kept: one set per router device, each with rows only for its own
        layers (the others stay zero). The hooks add into these tensors in place."""
        return dict(self._sums_by_device)

    def stats(self, dead_threshold: float = 0.1) -> RoutingMetrics:
        """Every routing metric of what was captured since the last reset (one host sync)."""
        return summarise(self.sums, capacity_factor=self.capacity_factor, dead_threshold=dead_threshold)

    def reset(self) -> None:
        """Zero the running sums in place on every device (a logging window starts)."""
        for part in self._sums_by_device.values():
            for name in _SUM_FIELDS:
                getattr(part, name).zero_()

    def load_sums(self, sums: RoutingSums) -> None:
        """Replace the running sums (e.g. with their all-reduced values), keeping tensors in place:
        the values go to the sums on `device`, every other device's are zeroed."""
        self.reset()
        primary = self._sums_on(self.device)
        for name in _SUM_FIELDS:
            getattr(primary, name).copy_(getattr(sums, name))

    def _sums_on(self, device: torch.device) -> RoutingSums:
        """The running sums kept on `device`, made (zero) the first time a router there reports."""
        part = self._sums_by_device.get(device)
        if part is None:
            part = RoutingSums.zeros(
                self.num_layers,
                self.num_experts,
                self.top_k,
                self.layer_names,
                device=device,
                dtype=_sums_dtype(device),
            )
            self._sums_by_device[device] = part
        return part

    def _layer_sums(self, layer: int, device: torch.device) -> RoutingSums:
        """The sums a layer adds to: those of the device its router was found on, unless its output
        is somewhere else (the model moved after the capture was made, or its weights are offloaded),
        in which case the layer moves to the output's device. Compares devices, not tensor values."""
        part = self._sums_by_device.get(self._layer_devices[layer])
        if part is None or part.device != device:
            self._layer_devices[layer] = device
            part = self._sums_on(device)
        return part

    # ------------------------------------------------------------------ recording choices (the drift probe)

    @contextmanager
    def recording_choices(
        self, into: RoutingSums | None = None
    ) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """Inside the block, router forwards record what they chose instead of adding to the sums.

        Yields a dict filled per layer with (chosen experts (N, k), top-k assignments per expert (E,))
        over the real rows; the running sums are untouched, so routing/probe.py can re-route a fixed
        batch in the middle of a logging window. With `into` (sums made by `empty_sums`), the same
        forwards are also added into those sums exactly as a training window's are, so the probe's
        routing gives the same metrics (`summarise`) a logging step does.
        """
        if not self.active:
            raise RuntimeError("the capture's hooks were removed; recording needs them installed")
        self._probe, self._probe_sums = {}, into
        try:
            yield self._probe
        finally:
            self._probe, self._probe_sums = None, None

    def empty_sums(self) -> RoutingSums:
        """Zero sums of this model's layout on `device`, apart from the running ones (for `recording_choices`)."""
        return RoutingSums.zeros(
            self.num_layers,
            self.num_experts,
            self.top_k,
            self.layer_names,
            device=self.device,
            dtype=_sums_dtype(self.device),
        )

    # ------------------------------------------------------------------ hooks

    def _on_backbone_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if is_recompute():
            return
        self._keep_on = {}
        self._keep = real_rows(kwargs, args)

    def _on_backbone_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._keep = None
        self._keep_on = {}

    def _router_hook(self, layer: int) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if is_recompute():
                return  # gradient checkpointing re-running the forward inside backward
            if self._probe is None and self.train_only and not module.training:
                return
            with torch.no_grad():
                logits, chosen = self._read_output(output)
                keep = self._row_mask(logits.shape[0], logits.device)
                if self._probe is not None:
                    # the probe stacks every layer's choices: gather them on one device
                    counts = self._assignments(chosen, keep, logits.dtype)
                    self._probe[layer] = (chosen.to(self.device), counts.to(self.device))
                    if self._probe_sums is not None:
                        self._accumulate(layer, logits, chosen, keep, into=self._probe_sums)
                else:
                    self._accumulate(layer, logits, chosen, keep)

        return hook

    def _read_output(self, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, E) float32 logits, detached, and (N, k) chosen experts from the router's own output."""
        logits, chosen = read_router_output(output, self.family)
        return logits.detach().float(), chosen

    def _row_mask(self, rows: int, device: torch.device) -> torch.Tensor | None:
        keep = self._keep
        if keep is None:
            return None
        if keep.numel() != rows:
            if not self._warned_mask:
                warnings.warn(
                    f"routing capture: the attention mask covers {keep.numel()} tokens but a router saw {rows} "
                    "rows; counting every row (padding may be included)",
                    stacklevel=2,
                )
                self._warned_mask = True
            return None
        moved = self._keep_on.get(device)
        if moved is None:  # once per device per forward, not once per layer
            moved = self._keep_on[device] = keep.to(device)
        return moved

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, E) routing probabilities the prob shares are computed from (`routing_scores`)."""
        return routing_scores(logits, self.family.scores)

    def _assignments(
        self, chosen: torch.Tensor, keep: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """(E,) top-k assignments per expert over the kept rows (index_add_: no host sync, unlike bincount)."""
        weights = (
            torch.ones(chosen.shape, device=chosen.device, dtype=dtype)
            if keep is None
            else keep.to(dtype).unsqueeze(-1).expand(chosen.shape)
        )
        counts = torch.zeros(self.num_experts, device=chosen.device, dtype=dtype)
        return counts.index_add_(0, chosen.reshape(-1), weights.reshape(-1))

    def _accumulate(
        self,
        layer: int,
        logits: torch.Tensor,
        chosen: torch.Tensor,
        keep: torch.Tensor | None,
        into: RoutingSums | None = None,
    ) -> None:
        probs = self._scores(logits)  # (N, E)
        # softmax(logits) in every family (routing_entropy_probs): a softmax family already has it
        entropy_probs = probs if self.family.scores == "softmax" else routing_entropy_probs(logits)
        entropy = token_entropy(entropy_probs)  # (N,)
        z = torch.logsumexp(logits, dim=-1).square()  # (N,)
        counts = self._assignments(chosen, keep, logits.dtype)  # (E,)
        if keep is None:
            tokens: torch.Tensor | int = logits.shape[0]
            prob_sum, entropy_sum, z_sum = probs.sum(0), entropy.sum(), z.sum()
        else:
            # where, not multiply: a padding row's nan (e.g. a fully masked attention row) must not leak in
            tokens = keep.sum()
            prob_sum = torch.where(keep.unsqueeze(-1), probs, 0.0).sum(0)
            entropy_sum = torch.where(keep, entropy, 0.0).sum()
            z_sum = torch.where(keep, z, 0.0).sum()
        # this router's own device: no transfer inside the hook (a probe's sums: on `device`, moved there)
        sums = self._layer_sums(layer, logits.device) if into is None else into
        # capacity is per forward (per micro-batch), as an expert-parallel dispatch would see it
        overflow = overflow_assignments(counts, self.top_k, self.capacity_factor)
        if sums.device != logits.device:
            tokens = tokens.to(sums.device) if isinstance(tokens, torch.Tensor) else tokens
            counts, prob_sum, entropy_sum = counts.to(sums.device), prob_sum.to(sums.device), entropy_sum.to(sums.device)
            z_sum, overflow = z_sum.to(sums.device), overflow.to(sums.device)
        # add_ on a row view: one in-place kernel each (`sums.x[layer] += v` would add a copy-back)
        sums.tokens[layer].add_(tokens)
        sums.assign_counts[layer].add_(counts)
        sums.prob_sum[layer].add_(prob_sum)
        sums.entropy_sum[layer].add_(entropy_sum)
        sums.z_sum[layer].add_(z_sum)
        sums.overflow[layer].add_(overflow)


def read_router_output(output: Any, family: FamilySpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) router logits as returned (gradient kept) and (N, k) chosen experts (detached).

    The chosen experts are the router's own, never recomputed (DeepSeek-V3 chooses with a correction
    bias inside expert groups). Shared by the capture and the per-layer loss, so both read a router
    the same way.
    """
    if not isinstance(output, (tuple, list)):
        raise UnknownFamilyError(
            f"router of family {family.name} returned {type(output).__name__}, not the tuple "
            f"(logits, weights, indices) its FamilySpec describes"
        )
    logits = output[family.logits_index]
    logits = logits.reshape(-1, logits.shape[-1])
    chosen = output[family.topk_index].detach().reshape(logits.shape[0], -1)
    return logits, chosen


def real_rows(kwargs: Mapping[str, Any], args: tuple = ()) -> torch.Tensor | None:
    """(B*T,) bool of a backbone forward's non-padding rows, row-major as the routers see them.

    `attention_mask[:, -T:]` flattened, the rule transformers' `load_balancing_loss_func` uses (`-T:`
    matters when decoding with a cache). None when every row is real: no mask, a 4-D custom mask, or
    packed position_ids.
    """
    mask = kwargs.get("attention_mask")
    length = input_length(kwargs, args)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and length is not None:
        return mask[:, -length:].reshape(-1).bool()
    return None


def input_length(kwargs: Mapping[str, Any], args: tuple) -> int | None:
    """T, the number of new positions in this forward, from input_ids or inputs_embeds."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return int(ids.shape[1])
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        return int(embeds.shape[1])
    return None


@contextmanager
def capture_routing(
    model: nn.Module, *, capacity_factor: float = 1.25, train_only: bool = False
) -> Iterator[RoutingCapture]:
    """Hooks on every router of `model` for the duration of the block; yields the RoutingCapture.

    `capacity_factor` is the expert capacity (x uniform load) at which each forward's overflow is
    counted for `drop_fraction`. The hooks are removed on exit, even when the block raises.
    """
    capture = RoutingCapture(model, capacity_factor=capacity_factor, train_only=train_only)
    try:
        yield capture
    finally:
        capture.remove()

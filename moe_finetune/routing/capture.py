"""Forward hooks on every router of an MoE model, filling per-layer running sums on the model's device.

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
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from moe_finetune.errors import UnknownFamilyError
from moe_finetune.models.families import family_for_model, find_routers, unwrap_model
from moe_finetune.routing.metrics import (
    RoutingMetrics,
    RoutingSums,
    overflow_assignments,
    summarise,
    token_entropy,
)


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


class RoutingCapture:
    """Hooks on every router of `model`, accumulating RoutingSums on the model's device.

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
        self.device = _module_device(self._layer_modules[0][0], model)
        self.sums = RoutingSums.zeros(
            len(self.layer_names),
            self.num_experts,
            self.top_k,
            self.layer_names,
            device=self.device,
            dtype=_sums_dtype(self.device),
        )
        self._keep: torch.Tensor | None = None  # (B*T,) bool of the forward in flight
        self._probe: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
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

    def stats(self, dead_threshold: float = 0.1) -> RoutingMetrics:
        """Every routing metric of what was captured since the last reset (one host sync)."""
        return summarise(self.sums, capacity_factor=self.capacity_factor, dead_threshold=dead_threshold)

    def reset(self) -> None:
        """Zero the running sums in place (a logging window starts)."""
        for tensor in (
            self.sums.tokens,
            self.sums.assign_counts,
            self.sums.prob_sum,
            self.sums.entropy_sum,
            self.sums.z_sum,
            self.sums.overflow,
        ):
            tensor.zero_()

    def load_sums(self, sums: RoutingSums) -> None:
        """Replace the running sums (e.g. with their all-reduced values), keeping tensors in place."""
        for name in ("tokens", "assign_counts", "prob_sum", "entropy_sum", "z_sum", "overflow"):
            getattr(self.sums, name).copy_(getattr(sums, name))

    # ------------------------------------------------------------------ recording choices (the drift probe)

    @contextmanager
    def recording_choices(self) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """Inside the block, router forwards record what they chose instead of adding to the sums.

        Yields a dict filled per layer with (chosen experts (N, k), top-k assignments per expert (E,))
        over the real rows; the running sums are untouched, so routing/probe.py can re-route a fixed
        batch in the middle of a logging window.
        """
        if not self.active:
            raise RuntimeError("the capture's hooks were removed; recording needs them installed")
        self._probe = {}
        try:
            yield self._probe
        finally:
            self._probe = None

    # ------------------------------------------------------------------ hooks

    def _on_backbone_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if is_recompute():
            return
        mask = kwargs.get("attention_mask")
        length = input_length(kwargs, args)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and length is not None:
            self._keep = mask[:, -length:].reshape(-1).bool()  # (B*T,), row-major like the routers' rows
        else:
            self._keep = None  # no mask, a 4-D custom mask, or packed position_ids: every row is real

    def _on_backbone_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._keep = None

    def _router_hook(self, layer: int) -> Callable[[nn.Module, tuple, Any], None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if is_recompute():
                return  # gradient checkpointing re-running the forward inside backward
            if self._probe is None and self.train_only and not module.training:
                return
            with torch.no_grad():
                logits, chosen = self._read_output(output)
                keep = self._row_mask(logits.shape[0])
                if self._probe is not None:
                    self._probe[layer] = (chosen, self._assignments(chosen, keep, logits.dtype))
                else:
                    self._accumulate(layer, logits, chosen, keep)

        return hook

    def _read_output(self, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, E) float32 logits and (N, k) chosen experts from the router's own output."""
        if not isinstance(output, (tuple, list)):
            raise UnknownFamilyError(
                f"router of family {self.family.name} returned {type(output).__name__}, not the tuple "
                f"(logits, weights, indices) its FamilySpec describes"
            )
        logits = output[self.family.logits_index].detach()
        logits = logits.reshape(-1, logits.shape[-1]).float()
        chosen = output[self.family.topk_index].detach().reshape(logits.shape[0], -1)
        return logits, chosen

    def _row_mask(self, rows: int) -> torch.Tensor | None:
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
        return keep.to(self.device)

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, E) routing probabilities the entropy and prob shares are computed from."""
        if self.family.scores == "sigmoid":
            # DeepSeek-V3: independent sigmoid scores, normalised; the correction bias only steers the
            # choice (read from the router's output) and is not part of the scores
            scores = logits.sigmoid()
            return scores / scores.sum(dim=-1, keepdim=True)
        return logits.softmax(dim=-1)

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
        self, layer: int, logits: torch.Tensor, chosen: torch.Tensor, keep: torch.Tensor | None
    ) -> None:
        probs = self._scores(logits)  # (N, E)
        entropy = token_entropy(probs)  # (N,)
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
        sums = self.sums
        # capacity is per forward (per micro-batch), as an expert-parallel dispatch would see it
        overflow = overflow_assignments(counts, self.top_k, self.capacity_factor)
        # add_ on a row view: one in-place kernel each (`sums.x[layer] += v` would add a copy-back)
        sums.tokens[layer].add_(tokens)
        sums.assign_counts[layer].add_(counts.to(self.device))
        sums.prob_sum[layer].add_(prob_sum.to(self.device))
        sums.entropy_sum[layer].add_(entropy_sum.to(self.device))
        sums.z_sum[layer].add_(z_sum.to(self.device))
        sums.overflow[layer].add_(overflow.to(self.device))


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

"""LoRA targets for an MoE model: attention projections as modules, fused experts as parameters.

In transformers 5 the experts are 3-D `nn.Parameter`s, not `nn.Linear`s, so PEFT reaches them only
through `LoraConfig(target_parameters=...)`. A recipe that asks for expert LoRA and silently gets
an attention-only adapter is a well-known failure of other tools; here it is an error (exit 2),
and every run prints what it really adapted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_finetune.errors import LoraTargetError
from moe_finetune.models.families import FamilySpec, find_routers
from moe_finetune.sections import LoraSection


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def router_module_names(model: Any, family: FamilySpec) -> list[str]:
    """Full names of the router modules in `model`'s own namespace, in layer order (a PEFT
    ModulesToSaveWrapper's two copies count as the one router at the wrapper's name)."""
    return find_routers(model, family, canonical=False)[0]


def attention_targets(lora: LoraSection, spec: FamilySpec, model: Any = None) -> list[str]:
    """The recipe's target_modules, else the family's attention projections that `model` has."""
    if not lora.attention:
        return []
    if lora.target_modules is not None:
        return list(lora.target_modules)
    if model is None:
        return list(spec.attention_modules)
    names = [name for name, _ in model.named_modules()]
    return [t for t in spec.attention_modules if any(_matches(name, t) for name in names)]


def layer_number(name: str) -> int | None:
    """The decoder-layer number in a module or parameter name (`model.layers.3.mlp.gate` -> 3): the key
    of `lora.experts: {layer: [experts]}` and of the routing profile's layers."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def expert_targets(lora: LoraSection, spec: FamilySpec) -> list[str]:
    if not lora.experts:
        return []
    return (
        list(lora.target_parameters)
        if lora.target_parameters is not None
        else spec.expert_target_parameters()
    )


def check_targets(model: Any, lora: LoraSection, spec: FamilySpec) -> None:
    """Every target must exist, and expert LoRA must reach the experts of every MoE layer.

    Works on a model built on the meta device, so `validate` can check a 46B-parameter recipe
    without its weights.
    """
    module_names = [name for name, _ in model.named_modules()]
    param_names = [name for name, _ in model.named_parameters()]
    if lora.attention and lora.target_modules is None and not attention_targets(lora, spec, model):
        raise LoraTargetError(
            f"lora.attention: none of the {spec.name} attention projections {list(spec.attention_modules)} exist "
            f"in {type(model).__name__}; set lora.target_modules"
        )
    for target in attention_targets(lora, spec, model):
        if not any(_matches(name, target) for name in module_names):
            leaves = sorted(
                {n.rsplit(".", 1)[-1] for n in module_names if "layers.0." in n or "blocks.0." in n}
            )
            raise LoraTargetError(
                f"lora.target_modules: {target!r} matches no module of {type(model).__name__}; "
                f"module names in its first layer: {', '.join(leaves)}"
            )
    experts = expert_targets(lora, spec)
    for target in experts:
        if not any(_matches(name, target) for name in param_names):
            raise LoraTargetError(
                f"lora.target_parameters: {target!r} matches no parameter of {type(model).__name__}; "
                f"this family's expert parameters are {', '.join(spec.expert_parameters)}"
            )
    if isinstance(lora.experts, dict):
        check_selection(model, lora.experts, spec)
    if experts:
        routers = router_module_names(model, spec)
        covered = {
            name.rsplit(".experts.", 1)[0] for name in param_names if any(_matches(name, t) for t in experts)
        }
        missing = [r for r in routers if r.rsplit(".", 1)[0] not in covered]
        if missing:
            raise LoraTargetError(
                f"lora.target_parameters {experts} leave the experts of {len(missing)} of {len(routers)} MoE "
                f"layers frozen (first: {missing[0].rsplit('.', 1)[0]}); set lora.experts: false to train "
                "attention only on purpose"
            )


def build_lora_config(model: Any, lora: LoraSection, spec: FamilySpec) -> Any:
    """The PEFT LoraConfig for this recipe section on this model (targets checked first)."""
    from peft import LoraConfig

    check_targets(model, lora, spec)
    modules = attention_targets(lora, spec, model)
    params = expert_targets(lora, spec)
    if not modules and not params and not lora.router:
        raise LoraTargetError("lora: attention, experts and router are all off: there is nothing to train")
    if not modules and not params:
        # PEFT trains modules_to_save only beside a LoRA target (get_peft_model raises NoMatchingPeftModuleError),
        # and the adapter format has no place for routers alone
        raise LoraTargetError(
            "lora.router: true with lora.attention and lora.experts both false gives LoRA nothing to adapt: PEFT "
            "trains the routers (modules_to_save) only beside at least one LoRA target. Set lora.attention: true "
            "as well (the smallest adapter beside the routers), or lora.experts"
        )
    # PEFT picks modules_to_save by a plain `key.endswith(name)` (peft/utils/other.py, _set_trainable), so
    # a leaf name would also catch its look-alikes: "gate" trains Qwen2-MoE's shared_expert_gate too. Full
    # paths match only the routers themselves (the PeftModel's names end with them; layer "1" cannot match
    # "11", the dot before it differs), and the adapter saved with them loads back onto the same architecture.
    routers = router_module_names(model, spec) if lora.router else None
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout if not params else 0.0,
        # PEFT cannot apply dropout inside a parameter wrapper; an empty list (not None) means "no modules".
        target_modules=modules,
        target_parameters=params or None,
        modules_to_save=routers,
        bias="none",
        task_type="CAUSAL_LM",
    )


@dataclass
class Coverage:
    """What the adapter really touches, counted on the wrapped model."""

    attention_modules: int
    attention_layers: int
    expert_layers: int
    moe_layers: int
    num_experts: int
    expert_parameters: list[str]
    router_trainable: bool
    trainable: int
    total: int
    # How expert LoRA runs: "peft" (ParamWrapper's merged stack) or "fast" (models/experts.py); when the
    # recipe asked for fast and the model cannot take it, why (the run falls back to peft and says so).
    expert_kernel: str = "peft"
    fast_kernel_fallback: str | None = None
    # lora.experts as {layer: [experts]} (auto resolves to one): the experts adapted in each MoE layer;
    # None = every expert of every adapted layer.
    expert_selection: dict[int, list[int]] | None = None

    def line(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        experts = (
            f"experts {self.expert_layers}/{self.moe_layers} MoE layers x {self.num_experts} experts "
            f"({', '.join(self.expert_parameters)}){self._kernel_note()}"
            if self.expert_parameters
            else f"experts frozen (0/{self.moe_layers} MoE layers)"
        )
        if self.expert_parameters and self.expert_selection is not None:
            chosen = sum(len(experts) for experts in self.expert_selection.values())
            layers = "; ".join(
                f"layer {layer}: {','.join(map(str, experts)) or 'none'}"
                for layer, experts in self.expert_selection.items()
            )
            experts = (
                f"experts {chosen} of {self.moe_layers * self.num_experts} ({layers}) "
                f"({', '.join(self.expert_parameters)}){self._kernel_note()}"
            )
        return (
            f"LoRA coverage: attention {self.attention_modules} modules in {self.attention_layers} layers; {experts}; "
            f"router {'trainable' if self.router_trainable else 'frozen'}; trainable parameters "
            f"{self.trainable:,} of {self.total:,} ({share:.2f}%)"
        )

    def _kernel_note(self) -> str:
        if self.expert_kernel == "fast":
            return " on the fast kernel"
        if self.fast_kernel_fallback:
            return f" on PEFT's kernel (fast kernel unavailable: {self.fast_kernel_fallback})"
        return ""


def _layer_of(name: str) -> str:
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return name


def coverage(peft_model: Any, spec: FamilySpec) -> Coverage:
    """Count adapted attention modules, expert layers and trainable parameters on a PEFT model."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    attention, attention_layers, expert_layers, expert_params = 0, set(), set(), set()
    for name, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper):
            expert_layers.add(_layer_of(name))
            expert_params.add(module.parameter_name)
        elif isinstance(module, LoraLayer):
            attention += 1
            attention_layers.add(_layer_of(name))
    routers = router_module_names(peft_model, spec)
    router_trainable = any(
        p.requires_grad
        for name, p in peft_model.named_parameters()
        if any(name.startswith(r) for r in routers)
    ) or any("modules_to_save" in name and p.requires_grad for name, p in peft_model.named_parameters())
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    selection, masked = _read_selection(peft_model, spec)
    trainable -= masked  # masked experts' slices are parameters PEFT keeps, but they never train
    from moe_finetune.models.quant4 import logical_numel

    total = sum(logical_numel(p) for p in peft_model.parameters())  # 4-bit storage counts its weights
    return Coverage(
        attention_modules=attention,
        attention_layers=len(attention_layers),
        expert_layers=len(expert_layers),
        moe_layers=len(routers),
        num_experts=spec.num_experts(peft_model.config),
        expert_parameters=sorted(expert_params),
        router_trainable=router_trainable,
        trainable=trainable,
        total=total,
        expert_selection=selection,
    )


def apply_lora(model: Any, lora: LoraSection, spec: FamilySpec) -> tuple[Any, Coverage]:
    """Wrap `model` with the recipe's LoRA adapter and verify that what was asked for was adapted."""
    from peft import get_peft_model

    if lora.experts == "auto":
        raise LoraTargetError(
            "lora.experts: auto is chosen from a routing profile of the training data, which `moe-finetune "
            "train` runs before LoRA is applied; in Python, resolve it first with "
            "moe_finetune.profile.choose_experts (or give {layer: [experts]})"
        )
    config = build_lora_config(model, lora, spec)
    peft_model = get_peft_model(model, config)
    if isinstance(lora.experts, dict):
        mask_experts(peft_model, lora.experts, spec)
    adapted = coverage(peft_model, spec)
    if lora.experts and adapted.expert_layers == 0:
        raise LoraTargetError(
            "lora.experts is true but PEFT adapted no expert parameter: the adapter would leave every expert "
            f"frozen. Targets were {expert_targets(lora, spec)}"
        )
    if lora.experts and adapted.expert_layers < adapted.moe_layers:
        raise LoraTargetError(
            f"lora.experts: only {adapted.expert_layers} of {adapted.moe_layers} MoE layers got expert LoRA"
        )
    from moe_finetune.models.quant4 import is_packed

    packed = any(is_packed(module) for module in peft_model.modules())
    if packed and adapted.expert_layers and lora.expert_kernel != "fast":
        raise LoraTargetError(
            "lora.expert_kernel: peft cannot adapt 4-bit experts (PEFT would merge B·A into the packed bytes): "
            "use lora.expert_kernel: fast, or model.quantization.experts: false"
        )
    if lora.expert_kernel == "fast" and adapted.expert_layers:
        from moe_finetune.models.experts import set_expert_lora_dropout, use_fast_expert_lora

        adapted.fast_kernel_fallback = use_fast_expert_lora(peft_model)
        if packed and adapted.fast_kernel_fallback is not None:
            raise LoraTargetError(
                f"model.quantization.experts: the 4-bit experts need the fast expert kernel, which cannot serve "
                f"this model ({adapted.fast_kernel_fallback}); set model.quantization.experts: false"
            )
        if adapted.fast_kernel_fallback is None:
            adapted.expert_kernel = "fast"
            # PEFT refuses dropout on parameter wrappers, so the config says 0 and dropout goes in here.
            if lora.dropout:
                set_expert_lora_dropout(peft_model, lora.dropout)
    return peft_model, adapted


# ------------------------------------------------------------------------------------------------
# Adapting only some experts: PEFT's full factors, the other experts' slices held at zero
#
# PEFT's `target_parameters` adapts a whole fused stack; it has no way to name single experts, and a slice
# of a parameter is no target. So the factors keep PEFT's shapes (the adapter saves, loads, merges and
# resumes as plain PEFT) and the experts left out have their slices of BOTH factors zeroed: their delta
# B_e·A_e is then zero, and so are both gradients (dB_e = g·(A_e x)ᵀ = 0, dA_e = B_eᵀ·g·xᵀ = 0), a fixed
# point of any gradient-based optimizer (Adam's moments stay 0, weight decay keeps 0 at 0). A gradient hook
# that zeroes those slices holds it against anything else (an optimizer that adds noise, a loaded state).
# Layout (peft 0.21, see models/experts.py): lora_A (r·E, in) expert-major, lora_B (out, r·E) expert-minor;
# the fast kernel reads the same tensors, so the mask holds on both kernels.

_SELECTED_ATTR = "_moe_adapted_experts"


def _expert_row_mask(experts: list[int], num_experts: int, rank: int) -> Any:
    """(E·r,) 1.0 on the rows of lora_A (expert-major) that belong to `experts`, 0.0 elsewhere; the same
    vector viewed as (r, E) transposed is the column mask of lora_B (expert-minor)."""
    import torch

    keep = torch.zeros(num_experts, rank)
    keep[experts] = 1.0
    return keep.reshape(-1)


def check_selection(model: Any, selection: dict[int, list[int]], spec: FamilySpec) -> None:
    """`lora.experts: {layer: [experts]}` must name MoE layers of this model and experts it has (exit 2).
    Works on a meta-device model, so `validate` checks it without weights."""
    num_experts = spec.num_experts(model.config)
    moe_layers = [layer_number(name) for name in router_module_names(model, spec)]
    unknown = sorted(set(selection) - set(moe_layers))
    if unknown:
        raise LoraTargetError(
            f"lora.experts: layer {unknown[0]} is not an MoE layer of this model; its MoE layers are "
            f"{', '.join(map(str, moe_layers))}"
        )
    for layer, experts in selection.items():
        outside = [e for e in experts if e >= num_experts]
        if outside:
            raise LoraTargetError(
                f"lora.experts: layer {layer} names expert {outside[0]}, but the model has {num_experts} experts "
                f"per layer (0..{num_experts - 1})"
            )


def mask_experts(peft_model: Any, selection: dict[int, list[int]], spec: FamilySpec) -> int:
    """Hold every expert not in `selection` ({decoder layer: [experts]}) at a zero LoRA delta, on every expert
    ParamWrapper; MoE layers left out of the mapping keep all their experts frozen. Returns the number of
    factor elements masked. Bad layer or expert numbers are the recipe's to fix (exit 2)."""
    import torch
    from peft.tuners.lora.layer import ParamWrapper

    check_selection(peft_model, selection, spec)
    num_experts = spec.num_experts(peft_model.config)
    masked = 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, ParamWrapper):
            continue
        experts = list(selection.get(layer_number(name), []))
        setattr(module, _SELECTED_ATTR, experts)
        for adapter in module.lora_A:
            weight_a = module.lora_A[adapter].weight  # (r·E, in)
            weight_b = module.lora_B[adapter].weight  # (out, r·E)
            rank = weight_a.shape[0] // num_experts
            rows = _expert_row_mask(experts, num_experts, rank).to(weight_a.device)  # (E·r,) expert-major
            columns = rows.view(num_experts, rank).t().reshape(-1).to(weight_b.device)  # (r·E,) expert-minor
            mask_a, mask_b = rows.to(weight_a.dtype)[:, None], columns.to(weight_b.dtype)[None, :]
            with torch.no_grad():
                weight_a.mul_(mask_a)
                weight_b.mul_(mask_b)
            weight_a.register_hook(lambda grad, mask=mask_a: grad * mask)
            weight_b.register_hook(lambda grad, mask=mask_b: grad * mask)
            dropped = num_experts - len(experts)
            masked += dropped * rank * (weight_a.shape[1] + weight_b.shape[0])
    return masked


def _read_selection(peft_model: Any, spec: FamilySpec) -> tuple[dict[int, list[int]] | None, int]:
    """The {layer: [experts]} `mask_experts` applied (None if it did not run) and the trainable factor
    elements it holds at zero."""
    selection: dict[int, list[int]] = {}
    masked = 0
    found = False
    num_experts = None
    for name, module in peft_model.named_modules():
        experts = getattr(module, _SELECTED_ATTR, None)
        if experts is None:
            continue
        found = True
        num_experts = num_experts or spec.num_experts(peft_model.config)
        layer = layer_number(name)
        if layer is not None:
            selection[layer] = sorted(set(selection.get(layer, [])) | set(experts))
        for adapter in module.lora_A:
            weight_a, weight_b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            if weight_a.requires_grad:
                rank = weight_a.shape[0] // num_experts
                masked += (num_experts - len(experts)) * rank * (weight_a.shape[1] + weight_b.shape[0])
    if not found:
        return None, 0
    routers = [layer_number(name) for name in router_module_names(peft_model, spec)]
    return {layer: selection.get(layer, []) for layer in routers if layer is not None}, masked

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

    def line(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        experts = (
            f"experts {self.expert_layers}/{self.moe_layers} MoE layers x {self.num_experts} experts "
            f"({', '.join(self.expert_parameters)}){self._kernel_note()}"
            if self.expert_parameters
            else f"experts frozen (0/{self.moe_layers} MoE layers)"
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
    )


def apply_lora(model: Any, lora: LoraSection, spec: FamilySpec) -> tuple[Any, Coverage]:
    """Wrap `model` with the recipe's LoRA adapter and verify that what was asked for was adapted."""
    from peft import get_peft_model

    config = build_lora_config(model, lora, spec)
    peft_model = get_peft_model(model, config)
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

"""Before training: is the load-balancing aux loss really on, who adds it, and what does it train?

Users (and tools) get this wrong silently: the aux loss is off unless `output_router_logits` is
set, TRL's SFTTrainer adds it itself (so a second addition would count it twice), DeepSeek-V3
has none in its model at all, and whether it can change anything depends on what is trainable.
This module reads the model, its config and the trainer arguments and says, in sentences:

1. whether the aux loss is added to the training loss, by whom, which one, and with which coefficient:
   - the per-layer loss (`PerLayerAuxLoss`, recipe `model.aux_loss: per_layer`) when it is attached:
     its coefficient, and that transformers' pooled term is off so the loss is counted once;
   - TRL's SFTTrainer (its args have `router_aux_loss_coef`): coef = args.router_aux_loss_coef, or
     the config's `router_aux_loss_coef` (0.0 when absent); on iff the config has
     `output_router_logits` and coef != 0. SFTTrainer then sets `config.output_router_logits`
     itself and adds `coef x aux` once in `compute_loss` (trl/trainer/sft_trainer.py ~1195-1215,
     ~1620-1650; the fused LM head computes `aux` with transformers' `load_balancing_loss_func`).
   - anything else (plain transformers Trainer, a hand-written loop): the model's own forward
     adds `config.router_aux_loss_coef x aux` when `config.output_router_logits` is true and
     labels are given, in families whose modeling code has an aux loss (not DeepSeek-V3).
2. which trainable parameters receive its gradient. The aux loss is a function of the router
   logits only, so its gradient reaches the router weights if they train, and every trainable
   parameter upstream of a router: attention (and its LoRA) of the same and earlier layers,
   experts of earlier layers, input embeddings. A frozen router does NOT make the aux loss a mere
   metric when attention or early-layer experts carry LoRA: it then pushes those adapters to
   reshape the hidden states the routers see. It is only a metric when nothing trainable lies
   upstream of any router, or
3. under gradient checkpointing with `use_reentrant=True`: the real forward runs without grad,
   so the router logits the aux loss is built from are detached and it trains nothing at all
   (shared/research/families.md, section A).

`check_aux_loss` answers from structure alone (no forward pass), so it runs on a 46B model before
training; `aux_gradient_receivers` measures the same thing with one small backward, for tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from moe_finetune.models.families import (
    FamilySpec,
    family_for_model,
    find_routers,
    strip_wrapper_names,
    unwrap_model,
)

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


@dataclass
class AuxLossCheck:
    """The aux-loss set-up of one model (and trainer), as facts and as sentences."""

    family: str
    in_loss: bool  # the aux loss is added to the training loss
    added_by: str | None  # "SFTTrainer" | "model" | None
    coefficient: float
    router_trainable: bool
    reentrant_checkpointing: bool
    receivers: list[str] = field(default_factory=list)  # trainable tensors its gradient reaches
    problems: list[str] = field(default_factory=list)  # set-ups that will fail or mislead
    lines: list[str] = field(default_factory=list)

    @property
    def trains_something(self) -> bool:
        """Whether the aux loss is in the loss AND some trainable parameter gets its gradient."""
        return self.in_loss and bool(self.receivers)


def _config(model: Any) -> Any:
    config = unwrap_model(model).config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _is_sft_args(trainer_args: Any) -> bool:
    return trainer_args is not None and hasattr(trainer_args, "router_aux_loss_coef")


def aux_loss_setting(model: Any, trainer_args: Any = None) -> tuple[bool, str | None, float]:
    """(in the loss?, added by whom, coefficient) for this model under these trainer arguments."""
    spec = family_for_model(model)
    config = _config(model)
    if _is_sft_args(trainer_args):
        coef = trainer_args.router_aux_loss_coef
        coef = float(getattr(config, "router_aux_loss_coef", 0.0) if coef is None else coef)
        enabled = hasattr(config, "output_router_logits") and coef != 0.0
        return enabled, ("SFTTrainer" if enabled else None), coef
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    enabled = spec.aux_loss_in_model and bool(getattr(config, "output_router_logits", False)) and coef != 0.0
    return enabled, ("model" if enabled else None), coef


def reentrant_checkpointing(model: Any, trainer_args: Any = None) -> bool:
    """Whether training will run gradient checkpointing with use_reentrant=True.

    Trainer arguments win when they enable checkpointing (the Trainer re-enables it at train() with
    their kwargs); otherwise the model's current set-up decides. transformers' default kwargs are
    {"use_reentrant": False}; torch's own default, when kwargs omit it, is True.
    """
    if trainer_args is not None:
        enabled = getattr(trainer_args, "activation_checkpointing", None)
        if enabled is None:
            enabled = getattr(trainer_args, "gradient_checkpointing", False)
        if enabled:
            kwargs = dict(
                getattr(trainer_args, "activation_checkpointing_kwargs", None)
                or getattr(trainer_args, "gradient_checkpointing_kwargs", None)
                or {}
            )
            kwargs.pop("every_n_layers", None)
            kwargs.pop("offload", None)
            return bool(kwargs.get("use_reentrant", True)) if kwargs else False
    for module in unwrap_model(model).modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            func = getattr(module, "_gradient_checkpointing_func", None)
            keywords = getattr(func, "keywords", None) or {}
            return bool(keywords.get("use_reentrant", True))
    return False


def _layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def trainable_upstream_of_routers(model: Any, spec: FamilySpec | None = None) -> tuple[list[str], bool]:
    """(trainable parameters whose change moves some router's logits, is any router itself trainable).

    Structural: a parameter is upstream of a router when it sits in an earlier layer, in the same
    layer outside the router's MoE block (attention, the pre-MoE norm), in the input embeddings,
    or in the router itself. Decoder stacks run their numbered layers in order, which is what
    makes the layer index a valid proxy for "computed before".
    """
    spec = spec or family_for_model(model)
    router_names, router_modules = find_routers(model, spec)
    router_params = {
        id(p) for modules in router_modules for module in modules for p in module.parameters(recurse=True)
    }
    # (layer index, the MoE block holding the router) per router
    blocks = [(_layer_index(name), name.rsplit(".", 1)[0] + ".") for name in router_names]
    embeddings = unwrap_model(model).get_input_embeddings()
    embedding_params = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    receivers: list[str] = []
    router_trainable = False
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = strip_wrapper_names(raw_name)
        if id(param) in router_params:
            router_trainable = True
            receivers.append(name)
            continue
        if id(param) in embedding_params:
            receivers.append(name)
            continue
        layer = _layer_index(name)
        if layer is None:
            continue  # final norm, LM head: downstream of every router
        if any(
            router_layer is not None
            and (layer < router_layer or (layer == router_layer and not name.startswith(block)))
            for router_layer, block in blocks
        ):
            receivers.append(name)
    return receivers, router_trainable


def check_aux_loss(model: Any, trainer_args: Any = None) -> AuxLossCheck:
    """The aux-loss set-up of `model` (PEFT-wrapped or not) under `trainer_args` (SFTConfig,
    TrainingArguments, or None for a hand-written loop), with the sentences that say so."""
    from moe_finetune.routing.load_balancing import installed_tap  # torch: only when a model is checked

    spec = family_for_model(model)
    per_layer = installed_tap(model)
    if per_layer is not None:
        in_loss, added_by, coef = True, "PerLayerAuxLoss", per_layer.coefficient
    else:
        in_loss, added_by, coef = aux_loss_setting(model, trainer_args)
    reentrant = reentrant_checkpointing(model, trainer_args)
    upstream, router_trainable = trainable_upstream_of_routers(model, spec)
    receivers = [] if reentrant else upstream
    check = AuxLossCheck(
        family=spec.name,
        in_loss=in_loss,
        added_by=added_by,
        coefficient=coef,
        router_trainable=router_trainable,
        reentrant_checkpointing=reentrant,
        receivers=receivers if in_loss else [],
    )
    lines = check.lines
    config = _config(model)

    # 1. is it in the loss, and who adds it
    if per_layer is not None:
        lines.append(
            f"aux loss: ON, per layer, added once by PerLayerAuxLoss: loss += {coef:g} x mean over the "
            f"{len(per_layer.layer_names)} MoE layers of each layer's own load-balancing loss ({spec.scores} scores, "
            "the router's own top-k counts, padding excluded; logged as `routing/aux_loss_per_layer`); "
            "transformers' pooled term is off"
            + (
                ""
                if not getattr(config, "output_router_logits", False)
                else " -- but config.output_router_logits is true, so the model's forward adds it too"
            )
        )
        if getattr(config, "output_router_logits", False):
            check.problems.append(
                "the per-layer aux loss is attached but config.output_router_logits is true: the model's own "
                "pooled aux loss would be added as well (counted twice); set it to False"
            )
    elif in_loss and added_by == "SFTTrainer":
        lines.append(
            f"aux loss: ON, added once by TRL's SFTTrainer: loss += {coef:g} x transformers' load-balancing loss "
            "(Switch/HF definition, pooled over all layers; logged by TRL as `aux_loss`; ours is `routing/aux_loss`)"
        )
    elif in_loss:
        lines.append(
            f"aux loss: ON, added by the model's forward: loss += config.router_aux_loss_coef {coef:g} x "
            "load-balancing loss (when labels are given)"
        )
    elif not spec.aux_loss_in_model and not _is_sft_args(trainer_args):
        lines.append(
            f"aux loss: OFF: {spec.name} models add no load-balancing loss (they balance with a routing "
            "bias updated outside the loss); routing/aux_loss is reported as a metric only"
        )
    elif _is_sft_args(trainer_args) and coef == 0.0:
        lines.append(
            "aux loss: OFF: SFTTrainer's router_aux_loss_coef resolves to 0 "
            f"({'set in the arguments' if trainer_args.router_aux_loss_coef is not None else 'the config declares none'}); "
            "routing/aux_loss is reported as a metric only"
        )
    else:
        reason = (
            "config.output_router_logits is false, so the model never computes it"
            if not getattr(config, "output_router_logits", False)
            else "config.router_aux_loss_coef is 0"
        )
        lines.append(
            f"aux loss: OFF: {reason}; routing/aux_loss is reported as a metric only "
            "(set output_router_logits=True, or train with TRL's SFTTrainer, to add it)"
        )

    # problems that fail or mislead
    if in_loss and added_by == "SFTTrainer" and not spec.aux_loss_in_model:
        check.problems.append(
            f"SFTTrainer would add transformers' softmax load-balancing loss to {spec.name}, whose own "
            f"routing ({spec.scores} scores) has no such loss"
            + (
                "; with transformers 5.24 / TRL 1.16 it fails at the first step "
                f"('{type(config).__name__}' object has no attribute 'num_experts'): set router_aux_loss_coef to 0"
                if not hasattr(config, "num_experts")
                else ""
            )
        )
    lines.extend(f"aux loss: WARNING: {problem}" for problem in check.problems)

    # 2./3. what its gradient reaches
    if not in_loss:
        return check
    if reentrant:
        lines.append(
            "aux gradient: NONE: gradient checkpointing with use_reentrant=True runs the forward without grad, "
            "so the router logits the aux loss is built from are detached; it is added to the loss but is only "
            "a metric. Use gradient_checkpointing_kwargs={'use_reentrant': False} to make it act"
        )
    elif router_trainable:
        lines.append(
            f"aux gradient: reaches the router weights (trainable) and {len(receivers)} trainable tensors in all"
        )
    elif receivers:
        lines.append(
            f"aux gradient: the routers are frozen, so it cannot change the router weights; it still reaches "
            f"{len(receivers)} trainable tensors upstream of the routers ({_describe(receivers)}), which it "
            "pushes to reshape the hidden states the routers see"
        )
    else:
        lines.append(
            "aux gradient: NONE: the routers are frozen and no trainable parameter lies upstream of any router; "
            "the aux loss is only a metric"
        )
    return check


def describe_aux_loss(model: Any, trainer_args: Any = None) -> list[str]:
    """The aux-loss check as sentences to print before training."""
    return check_aux_loss(model, trainer_args).lines


def _describe(names: list[str]) -> str:
    kinds = []
    if any(".experts" in n for n in names):
        kinds.append("experts of earlier layers")
    if any("attn" in n or "attention" in n for n in names):
        kinds.append("attention")
    if any("embed" in n for n in names):
        kinds.append("input embeddings")
    others = [n for n in names if not any(k in n for k in (".experts", "attn", "attention", "embed"))]
    if others:
        kinds.append(f"{len(others)} other")
    return ", ".join(kinds) if kinds else f"{len(names)} tensors"


def aux_gradient_receivers(model: Any, input_ids: Any, attention_mask: Any = None) -> list[str]:
    """Trainable parameters that get a nonzero gradient from the aux loss alone (measured).

    One forward with `output_router_logits=True` and one backward of transformers'
    `load_balancing_loss_func` over those logits; gradients are cleared before and after. For tests
    and for checking `check_aux_loss` on a new family; not for a 46B model.
    """
    import torch
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    spec = family_for_model(model)
    config = _config(model)
    model.zero_grad(set_to_none=True)
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True, use_cache=False
    )
    logits = tuple(outputs.router_logits)
    aux = load_balancing_loss_func(logits, spec.num_experts(config), spec.top_k(config), attention_mask)
    receivers: list[str] = []
    if isinstance(aux, torch.Tensor) and aux.requires_grad:
        aux.backward()
        receivers = [
            strip_wrapper_names(name)
            for name, param in model.named_parameters()
            if param.requires_grad and param.grad is not None and bool(param.grad.abs().sum() > 0)
        ]
    model.zero_grad(set_to_none=True)
    return receivers
